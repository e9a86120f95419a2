"""run_trial on a real (tiny, freshly built) demo model: results, restore, failures."""
from __future__ import annotations

import math

import pytest
import torch

from engine.data.calibration import NotEnoughText
from engine.data.sources import TextSourceConfig
from engine.models import ModelSource
from engine.trial import (
    CalibrationConfig,
    EvaluationConfig,
    PerplexityConfig,
    PruningConfig,
    TrialConfig,
    TrialFailed,
    load,
    run_trial,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from engine.demo import DemoRecipe, ensure_demo_assets

    assets = ensure_demo_assets(tmp_path_factory.mktemp("tiny") / "demo", DemoRecipe.tiny(), log=lambda _m: None)
    loaded = load(ModelSource(str(assets.model_dirs["demo-llama"]), dtype="float32"))
    return assets, loaded


def config(assets, pruning=None, samples=8, tmp=None):
    corpus = TextSourceConfig(kind="local", path=assets.corpus_dir, split="evaluation")
    evaluation = EvaluationConfig(languages=("en", "sw"), perplexity=PerplexityConfig(corpus, window=64, max_tokens=512))
    calibration = CalibrationConfig(TextSourceConfig(kind="local", path=assets.corpus_dir, split="calibration"),
                                    (("sw", 1.0),), samples=samples, seq_len=32, seed=0)
    return TrialConfig(key="k", name="n", evaluation=evaluation, pruning=pruning,
                       calibration=calibration if pruning else None, cache_dir=tmp, save_masks=tmp is not None,
                       artifacts_dir=tmp)


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_pruned_trial_reports_and_restores(tiny, tmp_path):
    assets, loaded = tiny
    before = weights(loaded.model)
    result = run_trial(config(assets, PruningConfig("wanda", "0.5"), tmp=tmp_path), loaded)
    assert result["pruning"]["mean_layer_sparsity"] == 0.5
    assert result["pruning"]["statistics_computed"] < result["pruning"]["layers_pruned"]
    assert result["pruning"]["calibration_sampling"] == "packed"  # what joined the documents, recorded
    assert result["pruning"]["calibration_separator"] == {"token": loaded.tokenizer.eos_token,
                                                          "id": loaded.tokenizer.eos_token_id, "rule": "eos"}
    assert (tmp_path / "masks.safetensors").is_file()
    bpb = {r["language"]: r["value"] for r in result["metrics"] if r["metric"] == "bits_per_byte"}
    assert set(bpb) == {"en", "sw"} and all(math.isfinite(v) for v in bpb.values())
    assert all(r["window"] == 64 for r in result["metrics"])
    after = weights(loaded.model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    dense = run_trial(config(assets), loaded)
    dense_bpb = {r["language"]: r["value"] for r in dense["metrics"] if r["metric"] == "bits_per_byte"}
    assert dense["dense"] and "pruning" not in dense
    assert dense_bpb != bpb  # the pruned model was measured pruned, the dense one dense


def test_failure_mid_trial_still_restores(tiny):
    assets, loaded = tiny
    before = weights(loaded.model)
    with pytest.raises(NotEnoughText):
        run_trial(config(assets, PruningConfig("sparsegpt", "2:4"), samples=100_000), loaded)
    after = weights(loaded.model)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_non_finite_perplexity_fails_the_trial_with_a_reason(tiny):
    assets, loaded = tiny
    block = loaded.model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        block.weight[0, 0] = float("nan")  # the snapshot holds the finite value; run_trial restores it
    with pytest.raises(TrialFailed, match="non-finite perplexity in en"):
        run_trial(config(assets), loaded)
    assert torch.isfinite(block.weight).all()


def test_evaluation_text_is_read_once_per_loaded_model(tiny, monkeypatch):
    assets, loaded = tiny
    first = run_trial(config(assets), loaded)

    def no_reading(*_args, **_kwargs):
        raise AssertionError("evaluation text must be read and tokenized once per loaded model")

    monkeypatch.setattr("engine.trial.documents", no_reading)
    monkeypatch.setattr("engine.trial.language_tokens", no_reading)
    second = run_trial(config(assets), loaded)
    assert [r["value"] for r in first["metrics"]] == [r["value"] for r in second["metrics"]]
