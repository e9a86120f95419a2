"""`make demo`'s path on the real demo assets (slow: builds them on a fresh machine)."""
from __future__ import annotations

import math

import polars as pl
import pytest

from sweep.cli import main
from tests.conftest import STUDIES

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_assets():
    from engine.demo import ensure_demo_assets

    return ensure_demo_assets(log=print)


def test_demo_study_validates_and_plans(demo_assets, capsys):
    assert main(["validate", str(STUDIES / "demo.yaml")]) == 0
    assert "46 trials (44 pruned + 2 dense baselines)" in capsys.readouterr().out
    assert main(["plan", str(STUDIES / "demo.yaml"), "--summary"]) == 0
    out = capsys.readouterr().out
    assert "demo-llama         22 pruned   1 dense" in out.replace("  ", " ").replace(" ", " ") or "demo-llama" in out


def test_demo_runs_and_writes_its_report(demo_assets, tmp_path):
    from sweep.demo import run_demo

    assert run_demo(report_dir=tmp_path / "report") == 0
    html = (tmp_path / "report" / "index.html").read_text(encoding="utf-8")
    assert "Dense baselines" in html and "demo-cohere" in html and "dataset-build" in html
    frame = pl.read_csv(tmp_path / "report" / "dense_perplexity.csv")
    assert frame.height == 2 * 7
    assert set(frame["language"]) == {"ar", "de", "en", "es", "ru", "sw", "zh"}
    for bpb in frame["bits_per_byte"]:
        # uniform over bytes is 8 bits per byte; a trained model is far below it
        assert math.isfinite(bpb) and 0 < bpb < 4
