"""A saved pruned model's card (README.md) is one the hub reads: huggingface_hub parses it back with the base
model's licence, the languages, the base model, the hub datasets read, and one model-index result per metric
the trial measured, with the trial's values; and it links to no page that does not exist.

One Wanda trial of the demo llama, through `run_trial` with `save_model=True` (as a sweep worker runs it),
on a copy of the model whose README.md says `license: apache-2.0`; the licence rules (provenance.json of
the GGUF-built models, licences the hub does not list, an unreachable hub) are checked on the functions.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from engine.data.sources import TextSourceConfig
from engine.models import ModelSource
from engine.save import (
    CardCalibration,
    CardInputs,
    CardMetric,
    Licence,
    base_licence,
    card_metrics,
    hub_licence,
    model_card,
)
from engine.trial import (
    CalibrationConfig,
    EvaluationConfig,
    PerplexityConfig,
    PruningConfig,
    TrialConfig,
    load,
    run_trial,
)
from tests.conftest import OFFLINE, environment

LANGUAGES = ("de", "sw")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(card text, the trial's result, its config, the base directory): a pruned demo llama saved."""
    from engine.demo import ensure_demo_assets

    assets = ensure_demo_assets()
    root = tmp_path_factory.mktemp("card")
    base = root / "base"
    shutil.copytree(assets.model_dirs["demo-llama"], base)
    (base / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: [en]\n---\n# a base model\n", encoding="utf-8")
    corpus = lambda split: TextSourceConfig(kind="local", path=assets.corpus_dir, split=split)  # noqa: E731
    config = TrialConfig(
        key="v1-modelcardtest00000", name="demo-llama.wanda.s50.cal-en.seed3",
        evaluation=EvaluationConfig(languages=LANGUAGES, perplexity=PerplexityConfig(corpus("evaluation"), 32, 64)),
        pruning=PruningConfig("wanda", "0.5"),
        calibration=CalibrationConfig(corpus("calibration"), (("en", 1.0),), samples=4, seq_len=32, seed=3),
        artifacts_dir=root / "trial", save_model=True, device="cpu", cache_dir=root / "cache")
    with environment(OFFLINE):
        result = run_trial(config, load(ModelSource(str(base), dtype="float32")))
    card = (Path(result["model_path"]) / "README.md").read_text(encoding="utf-8")
    return card, result, config, base


def test_the_card_parses_back_with_the_base_licence_languages_and_base_model(saved):
    from huggingface_hub import ModelCard

    card, result, config, base = saved
    data = ModelCard(card).data
    assert data.license == "apache-2.0"  # the base model's README.md says so
    assert data.base_model == str(base)
    assert data.language == ["en", "de", "sw"]  # calibration, then evaluation languages
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert data.tags == ["pruned", "wanda", "calibration-sweep"]
    assert data.datasets is None  # local text only: no hub dataset to name
    assert "base_model_relation" not in data  # the hub's relations do not include pruning
    pruning = data["pruning"]
    assert pruning["method"] == "wanda" and pruning["sparsity"] == "0.5" and pruning["trial_key"] == config.key
    assert pruning["calibration_languages"] == ["en"] and pruning["calibration_mix"] == "en"
    assert (pruning["calibration_samples"], pruning["calibration_seq_len"], pruning["seed"]) == (4, 32, 3)
    assert "pypi.org" not in card and "http" not in card.split("---", 2)[2]  # the body links nowhere
    assert "calibrated on\n**en** text (4 windows of 32 tokens, seed 3)" in card
    details = json.loads((Path(result["model_path"]) / "trial.json").read_text(encoding="utf-8"))
    assert details["calibration"] == {"languages": "en", "samples": 4, "seq_len": 32, "seed": 3}


def test_one_eval_result_per_measured_metric_with_the_trials_values(saved):
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    card, result, config, _ = saved
    data = ModelCard(card).data
    name, results = model_index_to_eval_results(data.to_dict()["model-index"])
    assert name == config.name
    assert len(data.eval_results) == len(results) == len(result["metrics"]) == 3 * len(LANGUAGES)
    measured = {(row["language"], row["metric"]): row["value"] for row in result["metrics"]}
    seen = {}
    for r in results:
        assert r.task_type == "text-generation" and r.dataset_type == "local-text" and r.dataset_split == "evaluation"
        seen[(r.dataset_config, r.metric_type)] = r.metric_value  # the language is the local text's config
    assert seen == pytest.approx(measured, rel=1e-12)
    for (language, metric), value in measured.items():
        assert f"| {language} | perplexity | {metric} | {value:.6g} |" in card


def test_hub_text_sources_name_their_datasets_and_configs():
    from huggingface_hub import ModelCard

    c4 = TextSourceConfig(kind="hub", dataset="allenai/c4", config="{mc4}", split="validation", revision="r1")
    metrics = card_metrics([{"language": "en", "task": "perplexity", "metric": "bits_per_byte", "value": 1.25},
                            {"language": "sw", "task": "perplexity", "metric": "bits_per_byte", "value": 1.5},
                            {"language": "de", "task": "belebele_deu_Latn", "metric": "acc", "value": 0.5},
                            {"language": "de", "task": "belebele_deu_Latn", "metric": "acc_stderr", "value": None}],
                           c4)
    inputs = CardInputs(name="m.wanda.s50.cal-en+sw.seed0", key="k", base="org/base", method="wanda", sparsity="0.5",
                        evaluation_languages=("en", "sw"), metrics=metrics,
                        calibration=CardCalibration((("en", 0.5), ("sw", 0.5)), 8, 64, 0, "packed", "allenai/c4"),
                        licence=hub_licence("Gemma Terms of Use", "https://ai.google.dev/gemma/terms"),
                        datasets=("allenai/c4",))
    data = ModelCard(model_card(inputs)).data
    assert data.license == "gemma" and data.datasets == ["allenai/c4"] and data.base_model == "org/base"
    assert data.language == ["en", "sw", "de"]
    assert data["pruning"]["calibration_mix"] == "en:0.5+sw:0.5"
    by_metric = {(r.dataset_type, r.dataset_config, r.metric_type): r.metric_value for r in data.eval_results}
    assert by_metric == {("allenai/c4", "en-multi", "bits_per_byte"): 1.25, ("allenai/c4", "sw", "bits_per_byte"): 1.5,
                         ("belebele_deu_Latn", None, "acc"): 0.5}  # the None value is left out


def test_licences_from_provenance_and_ones_the_hub_does_not_list(tmp_path):
    gguf_built = tmp_path / "gemma"
    gguf_built.mkdir()
    (gguf_built / "provenance.json").write_text(json.dumps(
        {"licence": "Gemma Terms of Use", "licence_url": "https://ai.google.dev/gemma/terms",
         "upstream": "google/gemma-3-270m (GGUF: someone/gemma-3-270m-GGUF)"}), encoding="utf-8")
    assert base_licence(str(gguf_built)) == Licence("gemma", source="the base model's provenance.json")
    assert hub_licence("Apache-2.0").id == "apache-2.0"
    odd = hub_licence("Acme Model Licence v2", "https://example.org/licence")
    assert (odd.id, odd.name, odd.link) == ("other", "acme-model-licence-v2", "https://example.org/licence")
    inputs = CardInputs(name="m", key="k", base=str(gguf_built), method="magnitude", sparsity="0.5",
                        evaluation_languages=("en",), licence=odd, base_hub_id="google/gemma-3-270m",
                        metrics=(CardMetric("en", "perplexity", "loss", 2.0),))
    from huggingface_hub import ModelCard

    card = model_card(inputs)
    data = ModelCard(card).data
    assert (data.license, data.license_name, data.license_link) == ("other", "acme-model-licence-v2",
                                                                    "https://example.org/licence")
    assert data["pruning"]["base_model_hub_id"] == "google/gemma-3-270m"
    assert "with no calibration text" in card and "calibration_languages" not in data["pruning"]
    with pytest.raises(ValueError, match="finite"):
        model_card(CardInputs(name="m", key="k", base="b", method="wanda", sparsity="0.5", evaluation_languages=("en",),
                              metrics=(CardMetric("en", "perplexity", "loss", float("nan")),)))


def test_a_hub_card_is_read_from_the_cache_and_an_unreachable_hub_leaves_the_licence_unknown(tmp_path, monkeypatch):
    """A hub base model's licence comes from its card in the hub cache; one whose card cannot be had (offline
    here, not in the cache) gives no licence and no error: the trial has run, and its card says so."""
    from huggingface_hub import constants

    # huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_CACHE when it is imported: set its constants instead.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    snapshot = tmp_path / "models--org--cached-model" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "README.md").write_text("---\nlicense: mit\n---\n", encoding="utf-8")
    (tmp_path / "models--org--cached-model" / "refs").mkdir()
    (tmp_path / "models--org--cached-model" / "refs" / "main").write_text("a" * 40, encoding="utf-8")
    assert base_licence("org/cached-model").id == "mit"
    assert base_licence("org/no-such-model-anywhere", "main") is None
    card = model_card(CardInputs(name="m", key="k", base="org/no-such-model-anywhere", method="wanda",
                                 sparsity="0.5", evaluation_languages=("en",)))
    assert "licence could not be read" in card and "license:" not in card


@pytest.mark.slow
def test_the_real_gemma_build_gives_its_licence_and_hub_origin(gemma3_270m_dir):
    """The provenance.json engine.pretrained.build really writes, not a hand-made one: the card of a model
    pruned from the GGUF-built Gemma 3 270M says `license: gemma` and names google/gemma-3-270m as the base
    the hub knows."""
    from engine.save import local_hub_id

    assert base_licence(str(gemma3_270m_dir)) == Licence("gemma", source="the base model's provenance.json")
    assert local_hub_id(Path(gemma3_270m_dir)) == "google/gemma-3-270m"
