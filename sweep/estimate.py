"""`sweep plan STUDY --estimate`: parameters and GPU memory per worker actor, from each model's config.

Memory is weights plus the larger of two working sets on one GPU (pruning runs one decoder block at a
time; evaluation runs whole windows):
- pruning: the block's calibration inputs and outputs (samples x seq_len x hidden, in the model's dtype),
  plus for SparseGPT the float32 Hessian of the widest linear input, its Cholesky inverse and a
  workspace (3 x in^2 x 4 bytes);
- evaluation: a batch of windows' logits in float32 and their log-probabilities (2 x batch x window x
  vocab x 4 bytes).
Activations inside a block and the CUDA context are not counted: keep 10-20% headroom. GPU-hours are
not estimated until issue 9 measures GPU throughput.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sweep.study import Study

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
    def from_config(cls, config: dict) -> "ModelShape":
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
    evaluation = 2 * batch * window * shape.vocab * 4
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
