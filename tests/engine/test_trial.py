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


def test_the_units_of_every_mean_are_kept_for_paired_tests(tiny, tmp_path):
    """Every evaluation token's NLL and every task document's own score reach units.safetensors, and
    they average to the trial's reported numbers; lm-eval's stderr and direction stay on the rows."""
    from engine.demo.tasks import ensure_demo_tasks
    from engine.evaluate.units import load_units
    from engine.trial import TaskConfig

    assets, loaded = tiny
    base = config(assets, tmp=tmp_path)
    evaluation = EvaluationConfig(languages=("en", "sw"), perplexity=base.evaluation.perplexity,
                                  tasks=(TaskConfig("demo_continuation_en", "en", limit=6),),
                                  include_path=ensure_demo_tasks(assets))
    result = run_trial(TrialConfig(key="k", name="n", evaluation=evaluation, artifacts_dir=tmp_path), loaded)
    units = load_units(result["units_path"])
    rows = {(r["language"], r["task"], r["metric"]): r for r in result["metrics"]}
    for language in ("en", "sw"):
        bpb = rows[(language, "perplexity", "bits_per_byte")]
        losses = units.perplexity[language]
        assert losses.token_nll.size == bpb["tokens"] and losses.bytes == bpb["bytes"]
        assert float(losses.token_nll.astype("float64").sum()) / math.log(2) / losses.bytes == pytest.approx(bpb["value"], rel=1e-5)
        assert bpb["higher_is_better"] is False
    scores = units.tasks["demo_continuation_en"]
    acc = rows[("en", "demo_continuation_en", "acc")]
    assert scores.language == "en" and scores.doc_id.tolist() == list(range(6)) and set(scores.choices) == {4}
    assert float(scores.metrics["acc"].mean()) == pytest.approx(acc["value"])
    assert float(scores.metrics["acc_norm"].mean()) == pytest.approx(rows[("en", "demo_continuation_en", "acc_norm")]["value"])
    # lm-eval's own stderr of a mean of n 0/1 scores: sqrt(p (1 - p) / (n - 1))
    p = acc["value"]
    assert acc["stderr"] == pytest.approx(math.sqrt(p * (1 - p) / 5)) and acc["higher_is_better"] is True
