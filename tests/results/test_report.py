"""`sweep report` on a synthetic study directory (partly finished), and the HTML in a real headless browser."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest

from sweep.cli.main import main
from sweep.results.report import build_report
from sweep.store.records import PlanRecord, TrialsForgotten, parse_event
from sweep.store.study_store import StudyStore


def trial(key, pruner="dense", calibration=None, seed=None):
    return {"key": key, "name": f"m.{pruner}.{calibration}.{seed}", "model": "m", "pruner": pruner,
            "sparsity": "0" if pruner == "dense" else "0.5", "calibration": calibration, "seed": seed,
            "dense": pruner == "dense"}


TRIALS = [trial("d"), trial("we0", "wanda", "en", 0), trial("wd0", "wanda", "de", 0),
          trial("we1", "wanda", "en", 1),  # never run
          trial("se0", "sparsegpt", "en", 0)]  # failed twice: gave up
VALUES = {  # key -> (bpb en, bpb de, acc en, acc de)
    "d": (1.0, 2.0, 0.8, 0.6), "we0": (1.2, 2.6, 0.7, 0.5), "wd0": (1.5, 2.2, 0.6, 0.55)}


def metrics(values):
    bpb_en, bpb_de, acc_en, acc_de = values
    return [{"language": "en", "task": "perplexity", "metric": "bits_per_byte", "value": bpb_en},
            {"language": "de", "task": "perplexity", "metric": "bits_per_byte", "value": bpb_de},
            {"language": "en", "task": "t_en", "metric": "acc", "value": acc_en},
            {"language": "de", "task": "t_de", "metric": "acc", "value": acc_de},
            # a second accuracy metric, as lm-eval reports acc_norm beside acc: not counted twice
            {"language": "en", "task": "t_en", "metric": "acc_norm", "value": acc_en},
            {"language": "de", "task": "t_de", "metric": "acc_norm", "value": acc_de}]


@pytest.fixture
def study_dir(tmp_path) -> Path:
    root = tmp_path / "study"
    with StudyStore(root) as store:
        store.freeze_study("name: synthetic\n")
        store.write_plan(PlanRecord.from_json({"study": "synthetic", "languages": ["en", "de"], "trials": TRIALS}))
        store.append(parse_event({"event": "run_started", "study_file": str(root / "study.yaml"), "git": "abc123",
                      "versions": {"python": "3.11.7", "torch": "2.13.0"}}))
        store.append(parse_event({"event": "actor_started", "actor": 1, "versions": {"torch": "2.13.0", "ray": "2.60.0"}}))
        store.append(parse_event({"event": "model_loaded", "model": "m", "seconds": 36.0, "actor": 1, "gpus": ["0"]}))
        for t in TRIALS:
            if t["key"] in VALUES:
                store.append(parse_event({"event": "started", "key": t["key"], "attempt": 1, "actor": 1}))
                store.append(parse_event({"event": "finished", "key": t["key"], "name": t["name"], "seconds": 360.0, "gpus": ["0"],
                              "trial": {k: t[k] for k in ("model", "pruner", "sparsity", "calibration", "seed")},
                              "metrics": metrics(VALUES[t["key"]])}))
        for attempt in (1, 2):
            store.append(parse_event({"event": "started", "key": "se0", "attempt": attempt, "actor": 1}))
            store.append(parse_event({"event": "failed", "key": "se0", "name": "m.sparsegpt.en.0", "attempt": attempt,
                          "final": attempt == 2, "error": "RuntimeError: boom", "seconds": 36.0, "gpus": ["0"]}))
        store.append(parse_event({"event": "run_finished", "model_loads": 1}))
    StudyStore(root).compact({t["key"] for t in TRIALS})
    return root


def visible_text(page: str) -> str:
    page = re.sub(r"<style>.*?</style>", " ", page, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page))


def test_report_of_a_partial_study(study_dir, tmp_path):
    page_path = build_report(study_dir, tmp_path / "report")
    page = page_path.read_text(encoding="utf-8")
    text = visible_text(page)
    assert "partial: 3 of 5 trials finished, 1 failed, 1 not run yet" in text
    # These synthetic trials kept no per-token or per-document scores: best by the mean, never "significant",
    # and the report names them.
    assert "3 trial(s) kept no per-token or per-document scores" in text
    assert ("m, wanda 0.5, bits per byte: of 2 target languages, calibrating in the target language was "
            "significantly best in 0, untested in 2 (best by the mean in 2;") in text
    assert ("m, wanda 0.5, accuracy (mean over tasks): of 2 target languages, calibrating in the target language "
            "was significantly best in 0, untested in 2 (best by the mean in 2;") in text
    assert "m.sparsegpt.en.0 failed: RuntimeError: boom" in text and "m.wanda.en.1 not run yet" in text
    assert "GPU hours in trials 0.320" in text  # 3 x 360 s + 2 x 36 s on one GPU
    assert "model loads 1" in text and "abc123" in text and "worker set 1 ray 2.60.0" in text
    assert "RuntimeError: boom 2" in text  # the error table: two attempts
    # self-contained: every image embedded, nothing fetched
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    assert page.count('src="data:image/png;base64,') == 4  # (bpb, mean accuracy) x (wanda, sparsegpt)
    figures = sorted(p.name for p in (page_path.parent / "figures").iterdir())
    assert figures == ["m-sparsegpt-0.5-average-acc.png", "m-sparsegpt-0.5-perplexity-bits-per-byte.png",
                       "m-wanda-0.5-average-acc.png", "m-wanda-0.5-perplexity-bits-per-byte.png"]
    matrix = pl.read_csv(page_path.parent / "tables" / "matrix-m-wanda-0.5-perplexity-bits-per-byte.csv")
    assert matrix.rows() == [("en", 1.2, 2.6), ("de", 1.5, 2.2)]
    failed = pl.read_csv(page_path.parent / "tables" / "matrix-m-sparsegpt-0.5-perplexity-bits-per-byte.csv")
    assert failed.rows() == [("en", None, None)]  # missing, not dropped
    seeds = pl.read_parquet(page_path.parent / "tables" / "seeds.parquet")
    row = seeds.filter((pl.col("pruner") == "wanda") & (pl.col("calibration") == "en") & (pl.col("target") == "en")
                       & (pl.col("metric") == "bits_per_byte")).row(0, named=True)
    assert (row["mean"], row["seeds"], row["seeds_expected"]) == (1.2, 1, 2)


def test_report_cli_and_a_study_with_nothing_finished(tmp_path, capsys):
    root = tmp_path / "empty"
    with StudyStore(root) as store:
        store.write_plan(PlanRecord.from_json({"study": "empty", "languages": ["en"], "trials": TRIALS[:2]}))
    assert main(["report", str(root), "--out", str(tmp_path / "r")]) == 0
    text = visible_text((tmp_path / "r" / "index.html").read_text())
    assert "partial: 0 of 2 trials finished" in text and "No finished pruned trials yet" in text
    assert main(["report", str(tmp_path / "nothing-here")]) == 2
    assert "not a study directory" in capsys.readouterr().err


# -- in a real browser -------------------------------------------------------------------------------

def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def open_in_browser(page: Path, out: Path) -> tuple[list[str], list[str], Path]:
    """Loads `page` in headless chromium with a network log; returns (URLs requested, console lines,
    screenshot)."""
    browser = chromium()
    if browser is None:
        pytest.skip("no chromium here (make test installs Debian's where it can: scripts/install_browser.sh)")
    out.mkdir(parents=True, exist_ok=True)
    shot, netlog = out / "shot.png", out / "netlog.json"
    result = subprocess.run(
        [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
         # the browser's own traffic (updates, network time), so that what is logged is the page's
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-features=NetworkTimeServiceQuerying,OptimizationHints,MediaRouter",
         f"--user-data-dir={out / 'profile'}", "--window-size=1400,2400", "--virtual-time-budget=5000",
         "--enable-logging=stderr", "--v=0", f"--log-net-log={netlog}", "--net-log-capture-mode=Everything",
         f"--screenshot={shot}", page.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert shot.is_file(), result.stderr[-2000:]
    urls = page_requests(json.loads(netlog.read_text(errors="replace")))
    console = [line for line in result.stderr.splitlines() if "CONSOLE" in line]
    return urls, console, shot


def page_requests(netlog: dict) -> list[str]:
    """URLs the page asked for. The browser's own calls (updates, clock, accounts) carry the initiator
    "not an origin" and are left out."""
    names = {number: name for name, number in netlog["constants"]["logEventTypes"].items()}
    return sorted({e["params"]["url"] for e in netlog["events"]
                   if names.get(e["type"]) == "URL_REQUEST_START_JOB" and "url" in (e.get("params") or {})
                   and e["params"].get("initiator") != "not an origin"})


def colourful_share(png: Path) -> float:
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)
    return float(((pixels.max(axis=2) - pixels.min(axis=2)) > 80).mean())


@pytest.mark.slow
def test_report_in_a_headless_browser(study_dir, tmp_path):
    page = build_report(study_dir, tmp_path / "report")
    urls, console, shot = open_in_browser(page, tmp_path / "browser")
    outside = [u for u in urls if not u.startswith(("file://", "data:"))]
    assert not outside, outside
    assert console == []
    assert colourful_share(shot) > 0.02  # the heat maps are drawn

    # the same checks do catch what they look for
    bad = tmp_path / "bad.html"
    bad.write_text('<!doctype html><html><body><p>plain</p><script>console.error("x")</script>'
                   '<img src="http://127.0.0.1:9/none.png"></body></html>')
    urls, console, shot = open_in_browser(bad, tmp_path / "browser-bad")
    assert any(u.startswith("http://127.0.0.1:9/") for u in urls) and console
    assert colourful_share(shot) < 0.001


def test_long_tables_are_written_as_parquet_only(tmp_path, monkeypatch):
    from sweep.results import table_files as report

    monkeypatch.setattr(report, "CSV_MAX_ROWS", 3)
    short, long = pl.DataFrame({"a": [1, 2, 3]}), pl.DataFrame({"a": [1, 2, 3, 4]})
    assert report.write_table(short, tmp_path, "short") == "short.csv"
    (tmp_path / "long.csv").write_text("stale\n")  # from an earlier report
    assert report.write_table(long, tmp_path, "long") == "long.parquet"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.parquet", "short.csv", "short.parquet"]
    assert pl.read_parquet(tmp_path / "long.parquet").equals(long)


def test_the_report_reads_the_event_logs_and_writes_nothing_into_the_study(study_dir, tmp_path):
    """results.parquet is a cache the driver rewrites when a run ends: mid-run, or after a killed driver,
    it lags. The report folds the logs instead, and leaves the study directory as it found it."""
    stale = StudyStore(study_dir)
    with StudyStore(study_dir) as store:  # a trial finishes after the last compaction
        store.append(parse_event({"event": "started", "key": "we1", "attempt": 1, "actor": 1}))
        store.append(parse_event({"event": "finished", "key": "we1", "name": "m.wanda.en.1", "seconds": 1.0,
                                  "trial": {"model": "m", "pruner": "wanda", "sparsity": "0.5", "calibration": "en",
                                            "seed": 1}, "metrics": metrics((1.4, 2.4, 0.5, 0.5))}))
    assert "we1" not in set(pl.read_parquet(study_dir / "results.parquet")["key"])  # the cache lags
    (study_dir / "results.parquet").unlink()
    before = {p: p.stat().st_mtime_ns for p in study_dir.rglob("*")}
    text = visible_text(build_report(study_dir, tmp_path / "report").read_text(encoding="utf-8"))
    assert "m.wanda.en.1 not run yet" not in text and "partial: 4 of 5 trials finished" in text
    latest = max(e.time for e in StudyStore(study_dir).read_events().events)
    as_of = datetime.fromtimestamp(latest, UTC).isoformat(timespec="seconds")
    assert f"Results as of {as_of} (the latest event in the study directory's logs)" in text, text[:600]

    assert {p: p.stat().st_mtime_ns for p in study_dir.rglob("*")} == before  # nothing written, nothing created
    assert stale.results_frame().filter(pl.col("key") == "we1").height == 6

    # A forgotten trial is no longer a result: the report says it is to run again.
    with StudyStore(study_dir) as store:
        done = max(e.time for e in store.read_events().events if e.KIND == "finished" and e.key == "we1")
        store.append(TrialsForgotten(keys=["we1"], until={"we1": done}, selection="m.wanda.en.1"))
    text = visible_text(build_report(study_dir, tmp_path / "report2").read_text(encoding="utf-8"))
    assert "m.wanda.en.1 not run yet" in text and "trials forgotten (sweep forget) 1" in text, text
