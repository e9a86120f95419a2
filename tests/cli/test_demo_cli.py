"""`make demo`'s path on the real demo assets (slow: builds them on a fresh machine)."""
from __future__ import annotations

import math

import polars as pl
import pytest
import yaml

from sweep.cli.main import main
from tests.conftest import STUDIES

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_assets():
    from engine.demo import ensure_demo_assets
    from engine.demo.tasks import ensure_demo_tasks

    assets = ensure_demo_assets(log=print)
    ensure_demo_tasks(assets)
    return assets


def test_demo_study_validates_and_plans(demo_assets, capsys):
    assert main(["validate", str(STUDIES / "demo.yaml")]) == 0
    assert "46 trials (44 pruned + 2 dense baselines)" in capsys.readouterr().out
    assert main(["plan", str(STUDIES / "demo.yaml"), "--json"]) == 0
    import json

    plan = json.loads(capsys.readouterr().out)
    assert plan["per_model"] == {"demo-llama": {"pruned": 22, "dense": 1}, "demo-cohere": {"pruned": 22, "dense": 1}}


def test_demo_runs_and_writes_its_report(demo_assets, tmp_path):
    """The demo's path on a smaller grid (two languages, Wanda and SparseGPT): every trial runs, and the
    report holds dense baselines, the calibration x target matrices and the task accuracies."""
    from sweep.cli.demo import run_demo

    study = yaml.safe_load((STUDIES / "demo.yaml").read_text())
    study["calibration"]["languages"] = ["en", "sw"]
    study["evaluation"]["languages"] = ["en", "sw"]
    study["evaluation"]["tasks"][0]["limit"] = 5
    study["pruners"] = [{"method": "wanda", "sparsity": 0.5}, {"method": "sparsegpt", "sparsity": 0.5}]
    study["execution"]["output_dir"] = str(tmp_path / "runs")
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(study))

    assert run_demo(report_dir=tmp_path / "report", study_path=path, tiny=True) == 0
    report = tmp_path / "report"
    html = (report / "index.html").read_text(encoding="utf-8")
    assert "Dense baselines" in html and "Calibration language x target language" in html
    assert "demo-cohere / wanda 0.5: bits per byte" in html and "Downstream tasks" in html
    assert "Demo models" in html and "Corpus sources" in html and "complete" in html
    figures = {p.name for p in (report / "figures").iterdir()}
    assert figures == {f"{m}-{p}-0.5-{what}.png" for m in ("demo-cohere", "demo-llama") for p in ("sparsegpt", "wanda")
                       for what in ("average-acc", "perplexity-bits-per-byte", "mask-iou", "layer-error", "lape", "snr")}
    tidy = pl.read_csv(report / "tables" / "tidy.csv")
    assert tidy["key"].n_unique() == 2 * (1 + 2 * 2)  # per model: dense + 2 pruners x 2 calibration languages
    bpb = tidy.filter((pl.col("task") == "perplexity") & (pl.col("metric") == "bits_per_byte"))
    assert bpb.height == 10 * 2 and bpb["value"].null_count() == 0
    for value in bpb["value"]:
        # uniform over bytes is 8 bits per byte; a trained model is far below it
        assert math.isfinite(value) and 0 < value < 4


def test_real_model_demo_assets_and_study(capsys):
    """`make demo`'s own parts (`run_demo` itself is exercised above on the tiny models): Gemma 3 270M
    built from the package index and the corpus, the report's model and licence sections, and the quick
    study, which validates against them and plans the dense model, magnitude and three Wanda trials."""
    from sweep.cli.demo import DEMO_STUDY, real_model_assets

    assets = real_model_assets()
    assert assets.metadata["model"]["name"] == "gemma3-270m"
    sections = "\n".join(assets.sections)
    assert "Gemma Terms of Use" in sections and "gemma-3-270m-q4_k_m.gguf" in sections
    assert "Corpus sources" in sections and "dataset-build" in sections
    assert main(["validate", str(DEMO_STUDY)]) == 0
    assert "5 trials (4 pruned + 1 dense baselines)" in capsys.readouterr().out
