"""A saved pruned model is the pruned model, and the stock `lm_eval` CLI evaluates it.

One Wanda trial of a demo model runs through `run_trial` with `save_model=True`, exactly as a sweep worker
runs it: pruned in memory, evaluated in memory by `lm_eval.simple_evaluate` (through `run_tasks`) on a
multiple-choice task and a `loglikelihood_rolling` (perplexity) task, then saved with
`engine.save.save_pruned_model`. The tests then check that

* the saved weights are the dense weights with exactly the pruning mask zeroed (50% of every pruned linear
  layer), everything else untouched, in the dtype the model was pruned in, readable by others;
* the model card (README.md) names the model, pruner, sparsity, calibration language, seed and metrics;
* `lm_eval --model hf --model_args pretrained=<saved dir>,...` run as a subprocess, offline, reports the
  same documents (task hashes) and the same metrics as the in-memory evaluation.

Three cases: demo-llama in float32 with `dtype=float32` given to the CLI,
demo-cohere (tied embeddings, logit scale) in bfloat16 with no dtype given, so the CLI's `dtype=auto`
must find bfloat16 in the saved config, and the real Gemma 3 270M in float32 (slow: built from the
package index).

Torch runs single-threaded on both sides (as in test_lm_eval_tasks.py): the same kernels over the same
batches then give bit-identical log-likelihoods, so the metrics are compared at 1e-9 relative.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from engine.data.sources import TextSourceConfig
from engine.demo.tasks import ensure_demo_tasks, task_name
from engine.evaluate.tasks import TaskRequest, run_tasks
from engine.models import ModelSource
from engine.save import save_pruned_model
from engine.trial import CalibrationConfig, EvaluationConfig, PruningConfig, TaskConfig, TrialConfig, load, run_trial
from tests.conftest import OFFLINE, environment

CALIBRATION_LANGUAGE = "sw"
SEED = 7
CHOICE_TASK = task_name("de")  # loglikelihood (multiple choice): acc, acc_norm
ROLLING_TASK = "demo_text_sw"  # loglikelihood_rolling: word/byte perplexity, bits per byte
# One limit for both tasks (the de task has 14 documents), so run_tasks makes one simple_evaluate call over
# both, as the CLI does: the same requests then meet in the same batches.
LIMIT = 12
BATCH_SIZE = 4
# (model, dtype it is loaded, pruned and saved in, dtype argument given to the CLI: None = lm-eval's "auto",
#  documents per task)
CASES = {"llama-fp32": ("demo-llama", "float32", "float32", LIMIT),
         "cohere-bf16": ("demo-cohere", "bfloat16", None, LIMIT),
         # the real Gemma 3 270M (sliding and full attention layers, tied embeddings, a 262k vocabulary that
         # makes every token cost as much as the 18 blocks together: fewer documents)
         "gemma3-fp32": ("gemma3-270m", "float32", "float32", 4)}
REAL = {"gemma3-270m": "gemma3_270m_dir"}  # model -> the fixture that gives its directory


def rolling_task_yaml(data_file: Path) -> str:
    """A wikitext-style perplexity task over the demo corpus' held-out `evaluation` split."""
    return yaml.safe_dump({
        "task": ROLLING_TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "text",
        "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")],
        "metadata": {"version": 1},
    }, sort_keys=False)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.fixture(scope="module")
def offline():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with environment(OFFLINE):
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def include(offline, tmp_path_factory):
    """The demo's de continuation task (its data path is absolute) and a perplexity task, in one folder."""
    from engine.demo import ensure_demo_assets

    assets = ensure_demo_assets()
    folder = tmp_path_factory.mktemp("tasks")
    demo_tasks = ensure_demo_tasks(assets)
    (folder / f"{CHOICE_TASK}.yaml").write_text((demo_tasks / f"{CHOICE_TASK}.yaml").read_text(encoding="utf-8"),
                                                encoding="utf-8")
    (folder / f"{ROLLING_TASK}.yaml").write_text(rolling_task_yaml(assets.split_path("sw", "evaluation")),
                                                 encoding="utf-8")
    return assets, folder


@pytest.fixture(scope="module", params=[pytest.param(case, marks=pytest.mark.slow) if CASES[case][0] in REAL else case
                                        for case in CASES])
def trial(request, include, tmp_path_factory):
    """The trial's result, the dense weights, the pruning masks and the dense model's task metrics."""
    from engine.prune.mask_io import load_masks

    assets, include_dir = include
    model_name, dtype, cli_dtype, limit = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    base = str(request.getfixturevalue(REAL[model_name]) if model_name in REAL else assets.model_dirs[model_name])
    loaded = load(ModelSource(base, dtype=dtype))
    dense = {name: p.detach().clone() for name, p in loaded.model.named_parameters()}
    corpus = lambda split: TextSourceConfig(kind="local", path=assets.corpus_dir, split=split)  # noqa: E731
    tasks = (TaskConfig(CHOICE_TASK, "de", 0, limit), TaskConfig(ROLLING_TASK, "sw", 0, limit))
    config = TrialConfig(
        key="v1-savedmodeltest0000", name=f"{model_name}.wanda.s50.cal-{CALIBRATION_LANGUAGE}.seed{SEED}",
        # lm-eval's own scorer: this checks the saved model against the CLI bit for bit (the shared-prefix
        # scorer's agreement with it is tests/engine/test_shared_prefix.py's).
        evaluation=EvaluationConfig(languages=("de", "sw"), perplexity=None, tasks=tasks, include_path=include_dir,
                                    batch_size=BATCH_SIZE, task_scorer="lm_eval"),
        pruning=PruningConfig("wanda", "0.5"),
        calibration=CalibrationConfig(corpus("calibration"), ((CALIBRATION_LANGUAGE, 1.0),), samples=8, seq_len=64,
                                      seed=SEED),
        artifacts_dir=root / "trial", save_masks=True, save_model=True, device="cpu", cache_dir=root / "cache")
    started = time.perf_counter()
    result = run_trial(config, loaded)
    print(f"\n[{request.param}] run_trial (prune, in-memory lm-eval, save): {time.perf_counter() - started:.1f} s "
          f"{ {k: round(v, 2) for k, v in result['timings'].items()} }")
    masks = load_masks(Path(result["pruning"]["masks_path"]))
    # run_trial restored the dense weights: the dense model's numbers, to show the pruned ones differ (on the
    # demo models; on Gemma, whose every token costs as much as its 18 blocks, they are left out).
    dense_metrics = {}
    if model_name not in REAL:
        dense_out = run_tasks(loaded.model, loaded.tokenizer, [TaskRequest(t.name, t.shots, t.limit) for t in tasks],
                              include_path=include_dir, batch_size=BATCH_SIZE)
        dense_metrics = {(name, metric): value for name, entry in dense_out["tasks"].items()
                         for metric, value in entry["metrics"].items()}
    return {"case": request.param, "dtype": dtype, "cli_dtype": cli_dtype, "result": result, "config": config,
            "base": base, "include": include_dir, "dense": dense, "masks": masks, "root": root,
            "dense_metrics": dense_metrics, "limit": limit}


def metric_rows(result: dict) -> dict[tuple[str, str], float]:
    return {(row["task"], row["metric"]): row["value"] for row in result["metrics"]}


def test_saved_weights_are_the_dense_weights_with_the_mask_zeroed(trial):
    from transformers import AutoModelForCausalLM

    folder = Path(trial["result"]["model_path"])
    assert folder == trial["config"].artifacts_dir / "model"
    files = {p.name: p for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "README.md", "trial.json"} <= set(files), sorted(files)
    assert json.loads((folder / "config.json").read_text())["dtype"] == trial["dtype"]
    readable = 0o666 & ~current_umask()
    assert {name: oct(stat.S_IMODE(p.stat().st_mode)) for name, p in files.items()} == \
        {name: oct(readable) for name in files}  # safetensors alone would write model.safetensors 0600

    saved = AutoModelForCausalLM.from_pretrained(folder)  # the dtype of its config
    assert saved.dtype == getattr(torch, trial["dtype"])
    parameters = dict(saved.named_parameters())
    masks, dense = trial["masks"], trial["dense"]
    assert len(masks) == 7 * saved.config.num_hidden_layers  # q k v o gate up down in every block
    for name, mask in masks.items():
        weight = parameters[f"{name}.weight"].detach()
        zeros = weight == 0
        assert float(zeros.float().mean()) == pytest.approx(0.5, abs=1e-3), name
        assert (zeros.sum(dim=1) >= weight.shape[1] // 2).all(), name  # Wanda: half of every row
        assert torch.equal(weight, dense[f"{name}.weight"].masked_fill(mask, 0.0)), name
    pruned = {f"{name}.weight" for name in masks}
    for name, value in parameters.items():  # embeddings, norms, LM head: as they were
        if name not in pruned:
            assert torch.equal(value.detach(), dense[name]), name


def test_model_card_names_how_the_model_was_made(trial):
    result = trial["result"]
    card = (Path(result["model_path"]) / "README.md").read_text(encoding="utf-8")
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == trial["base"] and "wanda" in front["tags"]
    assert f"`{trial['base']}` pruned with **wanda** to sparsity **0.5**" in card
    assert f"calibrated on\n**{CALIBRATION_LANGUAGE}** text (8 windows of 64 tokens, seed {SEED})" in card
    assert trial["config"].key in card and f"# {trial['config'].name}" in card
    rows = metric_rows(result)
    assert {metric for task, metric in rows if task == CHOICE_TASK} == {"acc", "acc_norm"}
    assert {metric for task, metric in rows if task == ROLLING_TASK} == {"word_perplexity", "byte_perplexity",
                                                                         "bits_per_byte"}
    for (task, metric), value in rows.items():
        language = "de" if task == CHOICE_TASK else "sw"
        assert f"| {language} | {task} | {metric} | {value:.6g} |" in card
    details = json.loads((Path(result["model_path"]) / "trial.json").read_text(encoding="utf-8"))
    assert details["calibration"] == {"languages": "sw", "samples": 8, "seq_len": 64, "seed": SEED}


@pytest.mark.slow
def test_the_stock_lm_eval_cli_gives_the_in_memory_numbers(trial):
    from lm_eval.models.utils import resolve_max_length
    from transformers import AutoConfig, AutoTokenizer

    folder = Path(trial["result"]["model_path"])
    # The in-memory HFLM is given no max_length and resolves it from the config; tell the CLI the same.
    max_length = resolve_max_length(AutoConfig.from_pretrained(folder), AutoTokenizer.from_pretrained(folder))
    model_args = f"pretrained={folder},max_length={max_length}"
    if trial["cli_dtype"]:
        model_args += f",dtype={trial['cli_dtype']}"
    output = trial["root"] / "cli"
    env = dict(os.environ, **OFFLINE, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    command = [
        str(Path(sys.executable).with_name("lm_eval")),
        "--model", "hf",
        "--model_args", model_args,
        "--tasks", f"{CHOICE_TASK},{ROLLING_TASK}",
        "--include_path", str(trial["include"]),
        "--limit", str(trial["limit"]),
        "--device", "cpu",
        "--batch_size", str(BATCH_SIZE),
        "--output_path", str(output),
        "--log_samples",
    ]
    started = time.perf_counter()
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    print(f"\n[{trial['case']}] lm_eval CLI: {time.perf_counter() - started:.1f} s; {model_args}")
    assert completed.returncode == 0, completed.stderr[-4000:]
    [results_file] = output.rglob("results_*.json")
    cli = json.loads(results_file.read_text(encoding="utf-8"))

    assert cli["config"]["model_args"]["pretrained"] == str(folder)
    assert cli["config"]["model_dtype"] == str(getattr(torch, trial["dtype"]))
    ours = {row["task"]: row for row in trial["result"]["metrics"]}
    for task in (CHOICE_TASK, ROLLING_TASK):
        assert cli["n-samples"][task]["effective"] == trial["limit"] == ours[task]["samples"]
        assert cli["task_hashes"][task] == ours[task]["task_hash"]  # the same documents, prompts and targets
    worst = 0.0
    for (task, metric), value in metric_rows(trial["result"]).items():
        theirs = cli["results"][task][f"{metric},none"]
        print(f"{task:>22} {metric:>16}  in memory {value!r:<22} CLI {theirs!r}")
        worst = max(worst, abs(value - theirs) / max(abs(theirs), 1e-12))
        assert value == pytest.approx(theirs, rel=1e-9, abs=0), (task, metric)
    print(f"largest relative difference: {worst:.3g}")
    # ... and they are the pruned model's numbers, not the base model's.
    dense = trial["dense_metrics"]
    if dense:
        print(f"dense model, in memory: {ROLLING_TASK} bits_per_byte {dense[(ROLLING_TASK, 'bits_per_byte')]!r}, "
              f"{CHOICE_TASK} acc {dense[(CHOICE_TASK, 'acc')]!r}")
        assert cli["results"][ROLLING_TASK]["bits_per_byte,none"] != dense[(ROLLING_TASK, "bits_per_byte")]


class _Tokenizer:
    def save_pretrained(self, directory):
        Path(directory, "tokenizer_config.json").write_text("{}\n", encoding="utf-8")


def test_saved_files_get_the_umask_mode_not_safetensors_0600(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                                         num_hidden_layers=1, num_attention_heads=2))
    for umask, mode in ((0o027, 0o640), (0o002, 0o664)):
        previous = os.umask(umask)
        try:
            folder = save_pruned_model(model, _Tokenizer(), tmp_path / f"m{umask:o}", "card", {"key": "k"})
        finally:
            os.umask(previous)
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
        assert "model.safetensors" in modes and set(modes.values()) == {mode}, {k: oct(v) for k, v in modes.items()}
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporaries left
