"""`sweep plan --estimate`: parameter counts from configs, and the memory warnings."""
from __future__ import annotations

import pytest

from sweep.plan.estimate import ModelShape, estimate_memory, format_estimates

LLAMA3_8B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
             "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False}
LLAMA3_70B = {**LLAMA3_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
              "num_attention_heads": 64}


def test_parameter_counts_of_the_reference_models():
    # the published sizes of Meta-Llama-3-8B and -70B
    assert ModelShape.from_config(LLAMA3_8B).parameters == 8_030_261_248
    assert ModelShape.from_config(LLAMA3_70B).parameters == 70_553_706_496


@pytest.mark.slow
def test_parameter_counts_of_the_demo_models_match_the_loaded_models():
    import json

    from transformers import AutoModelForCausalLM

    from engine.demo import ensure_demo_assets

    assets = ensure_demo_assets(log=print)
    for name, folder in assets.model_dirs.items():
        config = json.loads((folder / "config.json").read_text())
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert ModelShape.from_config(config).parameters == sum(p.numel() for p in model.parameters()), name


def test_memory_warnings():
    shape = ModelShape.from_config(LLAMA3_70B)
    fits = estimate_memory("llama3-70b", shape, "bfloat16", 4, 128, 2048, 2048, 8, sparsegpt=True)
    assert 131 < fits.weights_gib < 132  # 70.55e9 x 2 bytes
    assert fits.pruning_gib == pytest.approx((2 * 128 * 2048 * 8192 * 2 + 3 * 28672**2 * 4) / 2**30)
    _, problems = format_estimates([fits], 80)
    assert problems == []
    squeezed = estimate_memory("llama3-70b", shape, "bfloat16", 1, 128, 2048, 2048, 8, sparsegpt=True)
    table, problems = format_estimates([squeezed], 80)
    assert "70,553,706,496" in table and "raise its gpus to 3" in problems[0]


def test_time_per_trial_reproduces_the_gpu_benchmark_it_comes_from():
    """The rates in sweep.plan.estimate.MEASURED, put through engine.flops, give back the seconds that
    benchmarks/gpu_trial.py measured (its recorded result), for every stage."""
    import json
    from pathlib import Path

    from sweep.plan.estimate import MEASURED, trial_seconds

    reports = Path(__file__).parents[2] / "reports/gpu"
    run = json.loads((reports / "gpu_trial_after.json").read_text())
    evaluation_run = json.loads((reports / "gpu_trial_perplexity.json").read_text())
    assert run["device"] in MEASURED.source and evaluation_run["device"] in MEASURED.source
    shape = ModelShape.from_config({**LLAMA3_8B, "vocab_size": run["config"]["vocab_size"]})
    tokens = run["samples"] * run["seq_len"]
    evaluation = run["eval_tokens_per_language"] * run["languages"]
    dense = trial_seconds(shape, None, tokens, run["seq_len"], evaluation, run["seq_len"], 989.0)
    assert dense == pytest.approx(evaluation_run["stages"]["perplexity"]["seconds"], rel=0.01)
    for method in ("wanda", "sparsegpt"):
        seconds = trial_seconds(shape, method, tokens, run["seq_len"], evaluation, run["seq_len"], 989.0)
        assert seconds - dense == pytest.approx(run["stages"][method]["seconds"], rel=0.01), method
    # half the GPU's peak: twice the time
    slow = trial_seconds(shape, "wanda", tokens, run["seq_len"], evaluation, run["seq_len"], 989.0 / 2)
    fast = trial_seconds(shape, "wanda", tokens, run["seq_len"], evaluation, run["seq_len"], 989.0)
    assert slow == pytest.approx(2 * fast)


def test_plan_estimate_gives_gpu_hours_per_model(tmp_path, capsys):
    """A kurz2024-like grid on a local Llama-3-8B config: trials counted per method, GPU-hours = trials x
    seconds x gpus, and bad --gpu-tflops refused."""
    import json

    import yaml

    from sweep.cli.main import main
    from sweep.plan.estimate import study_time_estimates
    from sweep.study.grid import expand
    from sweep.study.load import load_study

    folder = tmp_path / "llama3-8b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**LLAMA3_8B, "architectures": ["LlamaForCausalLM"]}))
    text = tmp_path / "text"
    for lang in ("en", "de"):
        (text / lang).mkdir(parents=True)
        (text / lang / "a.txt").write_text("words " * 1000)
    study = {"name": "sizing", "models": [{"name": "l8", "path": str(folder), "gpus": 2}],
             "calibration": {"source": {"kind": "local", "path": str(text)}, "languages": ["en", "de"],
                             "samples": 128, "seq_len": 2048, "seeds": [0, 1]},
             "pruners": [{"method": "wanda", "sparsity": [0.5, "2:4"]}, {"method": "sparsegpt", "sparsity": 0.5}],
             "evaluation": {"languages": ["en", "de"],
                            "perplexity": {"source": {"kind": "local", "path": str(text)}, "window": 2048,
                                           "max_tokens": 262144}}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    loaded = load_study(path)
    [estimate] = study_time_estimates(loaded, expand(loaded).trials, 989.0)
    assert estimate.trials == {"dense": 1, "wanda": 8, "sparsegpt": 4}
    assert estimate.seconds["sparsegpt"] > estimate.seconds["wanda"] > estimate.seconds["dense"] > 0
    expected = sum(estimate.trials[m] * estimate.seconds[m] for m in estimate.trials) * 2 / 3600
    assert estimate.gpu_hours == pytest.approx(expected)
    assert main(["plan", str(path), "--estimate", "--gpu-memory-gib", "80"]) == 0
    out = capsys.readouterr().out
    assert "GPU-hours" in out and "l8" in out and f"{expected:.1f}" in out
    assert main(["plan", str(path), "--estimate", "--gpu-tflops", "0"]) == 2
    refused = capsys.readouterr()
    assert "--gpu-tflops" in refused.err and refused.out == ""  # refused before the plan is printed
