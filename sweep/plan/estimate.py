"""`sweep plan STUDY --estimate`: parameters and GPU memory per worker actor, from each model's config.

Memory is weights plus the larger of two working sets on one GPU (pruning runs one decoder block at a
time; evaluation runs whole windows):
- pruning: the block's calibration inputs and outputs (samples x seq_len x hidden, in the model's dtype),
  plus for SparseGPT the float32 Hessian of the widest linear input, its Cholesky inverse and a
  workspace (3 x in^2 x 4 bytes);
- evaluation: a batch of windows' logits in the model's dtype, and one window's logits and
  log-probabilities in float32 (batch x window x vocab x dtype bytes + 2 x window x vocab x 4 bytes).
Activations inside a block and the CUDA context are not counted: keep 10-20% headroom.

Time is each stage's matrix-product FLOPs (engine/flops.py) over the rate benchmarks/gpu_trial.py
achieved for that stage on one H100 (MEASURED below), scaled by the GPU's bf16 peak over the H100's.
A model spread over several GPUs runs one block at a time, so it takes as long as on one fast enough
GPU while holding all of its GPUs: GPU-hours are seconds x gpus. lm-eval tasks are included only with
`--tasks` (engine/evaluate/task_cost.py counts the positions the study's task scorer makes the model compute, from
each task's data and the model's tokenizer: the shared-prefix scorer's prefix and continuation passes, or
lm-eval's own batches with `task_scorer: lm_eval`; they run at the perplexity rate, so with lm-eval's scorer
its per-request Python and full-vocabulary log-softmax come on top, and with the shared-prefix scorer the
rate charges context positions for an output layer they skip). Not included: model loads (once per actor and
model) and queueing.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from engine import flops
from engine.evaluate.task_cost import task_cost
from engine.evaluate.tasks import TaskRequest
from sweep.study.load import Study

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GIB = 2**30


@dataclass(frozen=True)
class ModelShape:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    norms_per_block: int = 2  # Cohere (Aya) runs attention and MLP in parallel off one norm

    @classmethod
    def from_config(cls, config: dict) -> ModelShape:
        text = config.get("text_config") or config
        heads = int(text["num_attention_heads"])
        hidden = int(text["hidden_size"])
        return cls(vocab=int(text["vocab_size"]), hidden=hidden, intermediate=int(text["intermediate_size"]),
                   layers=int(text["num_hidden_layers"]), heads=heads,
                   kv_heads=int(text.get("num_key_value_heads") or heads),
                   head_dim=int(text.get("head_dim") or hidden // heads),
                   tied=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
                   norms_per_block=1 if config.get("model_type") in ("cohere", "cohere2") else 2)

    @property
    def block_parameters(self) -> int:
        attention = self.hidden * self.heads * self.head_dim * 2 + self.hidden * self.kv_heads * self.head_dim * 2
        return attention + 3 * self.hidden * self.intermediate + self.norms_per_block * self.hidden

    @property
    def parameters(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return embeddings + self.layers * self.block_parameters + self.hidden  # final norm

    @property
    def dims(self) -> flops.Dims:
        return flops.Dims(hidden=self.hidden, intermediate=self.intermediate, layers=self.layers,
                          q_width=self.heads * self.head_dim, kv_width=self.kv_heads * self.head_dim, vocab=self.vocab)

    @property
    def widest_input(self) -> int:
        return max(self.hidden, self.intermediate, self.heads * self.head_dim)


@dataclass(frozen=True)
class MemoryEstimate:
    model: str
    parameters: int
    gpus: int
    weights_gib: float
    pruning_gib: float
    evaluation_gib: float

    @property
    def peak_gib(self) -> float:
        return self.weights_gib + max(self.pruning_gib, self.evaluation_gib)


def estimate_memory(label: str, shape: ModelShape, dtype: str, gpus: int, samples: int, seq_len: int,
                    window: int, batch: int, sparsegpt: bool) -> MemoryEstimate:
    size = DTYPE_BYTES[dtype]
    calibration = 2 * samples * seq_len * shape.hidden * size
    hessian = 3 * shape.widest_input**2 * 4 if sparsegpt else shape.widest_input * 8
    evaluation = batch * window * shape.vocab * size + 2 * window * shape.vocab * 4
    return MemoryEstimate(label, shape.parameters, gpus, shape.parameters * size / GIB,
                          (calibration + hessian) / GIB, evaluation / GIB)


def model_config(study: Study, index: int) -> dict:
    spec = study.spec.models[index]
    if spec.path is not None:
        return json.loads((Path(study.model_paths[index]) / "config.json").read_text(encoding="utf-8"))
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(spec.hub, "config.json", revision=spec.revision)
    except Exception as err:  # noqa: BLE001 - offline, gated, missing: all say the same to the user
        raise RuntimeError(f"models[{index}] ({spec.hub}): cannot read its config.json ({type(err).__name__}: "
                           f"{str(err).splitlines()[0][:200]}); the estimate needs the hub (and HF_TOKEN for "
                           "gated models) or a local path") from None
    return json.loads(Path(path).read_text(encoding="utf-8"))


def study_estimates(study: Study) -> list[MemoryEstimate]:
    spec = study.spec
    window = spec.evaluation.perplexity.window if spec.evaluation.perplexity else spec.calibration.seq_len
    sparsegpt = any(p.method == "sparsegpt" for p in spec.pruners)
    out = []
    for i, model in enumerate(spec.models):
        shape = ModelShape.from_config(model_config(study, i))
        out.append(estimate_memory(model.label, shape, model.dtype, model.gpus, spec.calibration.samples,
                                   spec.calibration.seq_len, window, spec.evaluation.batch_size, sparsegpt))
    return out


def format_estimates(estimates: list[MemoryEstimate], gpu_memory_gib: float) -> tuple[str, list[str]]:
    lines = [f"  memory per worker actor (GPUs of {gpu_memory_gib:g} GiB; estimates, keep 10-20% headroom):",
             f"    {'model':<24} {'parameters':>15} {'weights':>9} {'pruning':>9} {'evaluation':>10} {'peak':>8}  gpus"]
    problems = []
    for e in estimates:
        lines.append(f"    {e.model:<24} {e.parameters:>15,} {e.weights_gib:>7.1f} G {e.pruning_gib:>7.1f} G "
                     f"{e.evaluation_gib:>8.1f} G {e.peak_gib:>6.1f} G  {e.gpus}")
        working = max(e.pruning_gib, e.evaluation_gib)
        if e.gpus and e.weights_gib / e.gpus + working > gpu_memory_gib:
            # weights spread over the GPUs; one block's working set lands on one of them
            if working >= gpu_memory_gib:
                advice = "lower evaluation.batch_size or calibration.samples: one block's working set alone fills a GPU"
            else:
                advice = f"raise its gpus to {int(-(-e.weights_gib // (gpu_memory_gib - working)))}"
            problems.append(f"{e.model}: {e.weights_gib / e.gpus:.0f} GiB of weights per GPU plus a {working:.0f} GiB "
                            f"working set exceed one {gpu_memory_gib:g} GiB GPU with gpus: {e.gpus}; {advice}")
    return "\n".join(lines), problems


@dataclass(frozen=True)
class Throughput:
    """Rates achieved per stage, in matrix-product TFLOP/s, and where they were measured."""
    source: str
    datasheet_tflops: float
    calibration: dict  # method -> TFLOP/s of calibration + pruning
    perplexity: float


# benchmarks/gpu_trial.py, 2026-11-24: Llama-3-8B shapes in bf16, 128 x 2048 calibration tokens, 7 x 262,144
# evaluation tokens in windows of 2048, batch 8 (reports/gpu/gpu_trial_after.json for calibration and
# pruning, reports/gpu/gpu_trial_perplexity.json for perplexity after its one-window-at-a-time scoring;
# reports/benchmarks.md).
MEASURED = Throughput(source="benchmarks/gpu_trial.py on one NVIDIA H100 80GB HBM3 (reports/gpu/)",
                      datasheet_tflops=989.0, calibration={"wanda": 406.5, "sparsegpt": 218.1}, perplexity=454.4)
MAGNITUDE_SECONDS_PER_BILLION = 0.5  # sorting weights: no calibration; a bound, not a measurement


@dataclass(frozen=True)
class TimeEstimate:
    model: str
    gpus: int
    trials: dict  # method ("dense" for the baseline) -> trial count
    seconds: dict  # method -> seconds per trial
    evaluation_known: bool  # False when evaluation.perplexity.max_tokens is unset (time then excludes it)
    tasks: object = None  # engine.evaluate.task_cost.TaskCost, when counted
    tasks_note: str | None = None  # why the tasks are not counted, when they were asked for

    @property
    def gpu_hours(self) -> float:
        return sum(self.trials[m] * self.seconds[m] for m in self.trials) * self.gpus / 3600


def trial_seconds(shape: ModelShape, method: str | None, calibration_tokens: int, seq_len: int,
                  evaluation_tokens: int, window: int, gpu_tflops: float,
                  measured: Throughput = MEASURED, tasks=None) -> float:
    """Seconds for one trial (`method` None: the dense baseline, evaluation only); `tasks` a
    engine.evaluate.task_cost.TaskCost, run at the perplexity rate."""
    scale = gpu_tflops / measured.datasheet_tflops
    seconds = flops.evaluation(shape.dims, evaluation_tokens, window) / (measured.perplexity * scale * 1e12)
    if tasks is not None and tasks.positions:
        seconds += flops.evaluation(shape.dims, tasks.positions, tasks.mean_length) / (
            measured.perplexity * scale * 1e12)
    if method == "magnitude":
        seconds += MAGNITUDE_SECONDS_PER_BILLION * shape.parameters / 1e9
    elif method is not None:
        rate = measured.calibration.get(method, min(measured.calibration.values()))
        seconds += flops.pruning(shape.dims, method, calibration_tokens, seq_len) / (rate * scale * 1e12)
    return seconds


def model_task_cost(study: Study, index: int):
    """(TaskCost, None) for model `index`, or (None, why not): its tokenizer and every task's data must
    be readable (local, cached by `sweep prefetch`, or on the hub)."""
    from transformers import AutoConfig, AutoTokenizer

    from sweep.study.trials import evaluation_config

    spec = study.spec.models[index]
    source = str(study.model_paths[index]) if spec.path is not None else spec.hub
    ev = evaluation_config(study)
    requests = [TaskRequest(t.name, t.shots, t.limit) for t in ev.tasks]
    try:
        config = AutoConfig.from_pretrained(source, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(source, revision=spec.revision,
                                                  trust_remote_code=spec.trust_remote_code)
        return task_cost(config, tokenizer, requests, ev.include_path, ev.batch_size, ev.task_scorer), None
    except Exception as err:  # noqa: BLE001 - offline, gated, a dataset not cached: all say the same
        return None, (f"not counted ({type(err).__name__}: {str(err).splitlines()[0][:160]}); "
                      f"`sweep prefetch STUDY` fills the caches this reads")


def study_time_estimates(study: Study, trials, gpu_tflops: float, count_tasks: bool = False) -> list[TimeEstimate]:
    """Per model: trials by method and seconds per trial, for the planned `trials` (sweep.study.grid.TrialSpec);
    with `count_tasks`, the lm-eval tasks' work counted in (engine/evaluate/task_cost.py)."""
    spec = study.spec
    methods = {p.label: p.method for p in spec.pruners}
    perplexity = spec.evaluation.perplexity
    window = perplexity.window if perplexity else spec.calibration.seq_len
    per_language = perplexity.max_tokens if perplexity and perplexity.max_tokens else 0
    evaluation_tokens = per_language * len(spec.evaluation.languages)
    calibration_tokens = spec.calibration.samples * spec.calibration.seq_len
    out = []
    for i, model in enumerate(spec.models):
        shape = ModelShape.from_config(model_config(study, i))
        counts: dict[str, int] = {}
        for trial in trials:
            if trial.model_index == i:
                method = "dense" if trial.is_dense else methods[trial.pruner_label]
                counts[method] = counts.get(method, 0) + 1
        tasks = note = None
        if count_tasks and study.tasks:
            tasks, note = model_task_cost(study, i)
        seconds = {m: trial_seconds(shape, None if m == "dense" else m, calibration_tokens, spec.calibration.seq_len,
                                    evaluation_tokens, window, gpu_tflops, tasks=tasks) for m in counts}
        out.append(TimeEstimate(model.label, model.gpus, counts, seconds,
                                perplexity is None or perplexity.max_tokens is not None, tasks, note))
    return out


def format_time_estimates(estimates: list[TimeEstimate], gpu_tflops: float, measured: Throughput = MEASURED) -> str:
    rates = ", ".join(f"{m} {r:g}" for m, r in measured.calibration.items())
    counted = any(e.tasks is not None for e in estimates)
    left_out = "model loads and queueing" if counted else "lm-eval tasks (--tasks counts them), model loads and queueing"
    lines = [f"  time on GPUs of {gpu_tflops:g} bf16 TFLOP/s ({left_out} not included):",
             f"    rates: {measured.source}: calibration + {rates}, perplexity {measured.perplexity:g} TFLOP/s achieved,",
             f"    scaled by {gpu_tflops:g}/{measured.datasheet_tflops:g}",
             f"    {'model':<24} {'gpus':>4} {'trials':>6}  {'seconds per trial':<44} {'GPU-hours':>9}"]
    total = 0.0
    for e in estimates:
        task_line = (f"      tasks per trial ({e.tasks.scorer} scorer): {e.tasks.summary()}" if e.tasks is not None else
                     f"      tasks: {e.tasks_note}" if e.tasks_note else None)
        if e.gpus == 0:
            lines.append(f"    {e.model:<24} {'cpu':>4} {sum(e.trials.values()):>6}  (runs on CPU: GPU rates do not apply)")
            lines += [task_line] if task_line else []
            continue
        per_trial = ", ".join(f"{m} {e.seconds[m]:,.0f}" if e.seconds[m] >= 10 else f"{m} {e.seconds[m]:.2g}"
                              for m in sorted(e.trials))
        lines.append(f"    {e.model:<24} {e.gpus:>4} {sum(e.trials.values()):>6}  {per_trial:<44} {e.gpu_hours:>9.1f}")
        if not e.evaluation_known:
            lines.append("      (evaluation.perplexity.max_tokens is unset: evaluation time not included)")
        lines += [task_line] if task_line else []
        total += e.gpu_hours
    lines.append(f"    {'total':<24} {'':>4} {sum(sum(e.trials.values()) for e in estimates):>6}  {'':<44} {total:>9.1f}")
    return "\n".join(lines)
