"""A study directory written by an earlier version of the sweep (tests/fixtures/study_dir_v1, made by
make_study_dir_v1.py on 2026-11-30) is still read and resumed by today's code: the same trial keys, its
finished trials kept, only the new ones run, and status, results and report read the old records.

The fixture holds everything its keys depend on (a tiny random Llama and a two-language corpus), so the
keys do not change from one machine to the next.
"""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import polars as pl
import pytest

from sweep.execution.driver import RunOptions, run_study
from sweep.results.report import build_report
from sweep.results.status import print_status
from sweep.store.records import UnknownEvent
from sweep.store.study_store import StudyStore
from sweep.study.grid import expand
from sweep.study.load import load_study

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "study_dir_v1"
OLD_NAMES = {"tiny.dense", "tiny.magnitude.s50", "tiny.wanda.s50.cal-en.seed0"}


@pytest.fixture
def old_study(tmp_path) -> Path:
    """A copy (the test writes into it), moved away from where it was written, as a user's would be."""
    copy = tmp_path / "moved"
    shutil.copytree(FIXTURE, copy)
    return copy


def test_old_records_read_as_they_were_written(old_study):
    store = StudyStore(old_study / "runs" / "compat-v1")
    plan = store.read_plan()
    reading = store.read_events()
    assert not reading.cut_off and not reading.unreadable
    assert not [e for e in reading.events if isinstance(e, UnknownEvent)]  # every kind written then is known
    state = store.state(reading.events)
    assert {t.name for t in plan.trials} == OLD_NAMES
    assert all(state.is_done(t.key) for t in plan.trials)
    assert plan.languages == ("en", "de") and plan.analysis_enabled("masks")
    out = io.StringIO()
    assert print_status(str(old_study / "runs" / "compat-v1"), out=out, err=io.StringIO()) == 0
    assert "3/3 done" in out.getvalue(), out.getvalue()


def test_trial_keys_are_those_the_old_code_wrote(old_study):
    old = {t.name: t.key for t in StudyStore(old_study / "runs" / "compat-v1").read_plan().trials}
    now = {t.name: t.key for t in expand(load_study(old_study / "study.yaml")).trials}
    assert {name: now[name] for name in OLD_NAMES} == old
    assert set(now) - set(old) == {"tiny.wanda.s50.cal-de.seed0"}


def test_an_old_study_directory_resumes_with_only_the_new_trial(old_study, tmp_path):
    directory = old_study / "runs" / "compat-v1"
    before = pl.read_parquet(directory / "results.parquet")
    out = io.StringIO()
    outcome = run_study(old_study / "study.yaml", RunOptions(num_cpus=1, progress=False), out=out)
    assert outcome.code == 0 and outcome.finished == 1, out.getvalue()
    assert "4 trials; 3 finished earlier" in out.getvalue()
    after = pl.read_parquet(directory / "results.parquet")
    assert set(after["name"].unique()) == OLD_NAMES | {"tiny.wanda.s50.cal-de.seed0"}
    # the old trials' rows are kept as they were, not recomputed
    order = ["name", "language", "task", "metric"]
    kept = after.filter(pl.col("name").is_in(sorted(OLD_NAMES))).sort(order)
    assert kept.select(before.columns).equals(before.sort(order))
    page = build_report(directory, tmp_path / "report")
    overlap = pl.read_csv(tmp_path / "report" / "tables" / "analysis-mask_overlap.csv")
    assert page.exists() and overlap.height > 0  # en (old artifacts) against de (new ones)
