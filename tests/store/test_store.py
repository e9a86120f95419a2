"""The study directory: durable events, a tolerated cut-off line, the driver lock, atomic artifacts, compaction."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import polars as pl
import pytest

from sweep.store.records import parse_event
from sweep.store.study_store import StoreLocked, StudyStore
from tests.conftest import REPO


def finished(key, value, name=None):
    return parse_event({"event": "finished", "key": key, "name": name or key,
                        "metrics": [{"language": "en", "task": "perplexity", "metric": "bits_per_byte", "value": value}]})


def test_events_state_and_compaction(tmp_path):
    with StudyStore(tmp_path / "s") as store:
        store.append(parse_event({"event": "started", "key": "a", "attempt": 1}))
        store.append(parse_event({"event": "failed", "key": "a", "attempt": 1, "error": "boom"}))
        store.append(parse_event({"event": "started", "key": "a", "attempt": 2}))
        store.append(finished("a", 2.5))
        store.append(parse_event({"event": "started", "key": "b", "attempt": 1}))
        store.append(parse_event({"event": "failed", "key": "b", "attempt": 1, "error": "nan"}))
        store.append(parse_event({"event": "started", "key": "c", "attempt": 1}))  # the driver died here
    state = StudyStore(tmp_path / "s").state()
    assert set(state.finished) == {"a"} and set(state.failed) == {"b"} and state.attempts == {"a": 2, "b": 1, "c": 1}
    frame = pl.read_parquet(StudyStore(tmp_path / "s").compact())
    assert frame.select("key", "metric", "value").rows() == [("a", "bits_per_byte", 2.5)]


def test_a_second_driver_run_gets_its_own_log_and_nothing_is_counted_twice(tmp_path):
    with StudyStore(tmp_path / "s") as store:
        store.append(finished("a", 1.0))
    with StudyStore(tmp_path / "s") as store:
        store.append(finished("a", 1.0))  # a retried duplicate after a crash between run and record
        store.append(finished("b", 2.0))
    assert len(list((tmp_path / "s" / "events").glob("*.jsonl"))) == 2
    frame = pl.read_parquet(StudyStore(tmp_path / "s").compact())
    assert sorted(frame["key"].to_list()) == ["a", "b"]


def test_cut_off_last_line_is_tolerated_and_reported(tmp_path):
    with StudyStore(tmp_path / "s") as store:
        store.append(finished("a", 1.0))
        store.append(finished("b", 2.0))
    log = next((tmp_path / "s" / "events").glob("*.jsonl"))
    data = log.read_bytes()
    log.write_bytes(data[: len(data) - 15])  # killed mid-write of the second event
    reading = StudyStore(tmp_path / "s").read_events()
    assert reading.cut_off == [log.name]
    assert [e.key for e in reading.events] == ["a"]


def test_second_driver_refuses(tmp_path):
    first = StudyStore(tmp_path / "s")
    first.acquire()
    try:
        with pytest.raises(StoreLocked, match=f"in use by another driver \\(pid {os.getpid()}"):
            StudyStore(tmp_path / "s").acquire()
    finally:
        first.release()
    StudyStore(tmp_path / "s").acquire()  # free again once released


def test_stale_lock_of_a_dead_driver_is_taken_over(tmp_path):
    code = ("import sys; from sweep.store.records import parse_event; from sweep.store.study_store import StudyStore; s = StudyStore(sys.argv[1]); s.acquire(); "
            "s.append(parse_event({'event': 'started', 'key': 'x'})); import os; os._exit(0)")  # dies holding the lock
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "s")], check=True, cwd=REPO)
    holder = json.loads((tmp_path / "s" / "driver.lock").read_text())
    assert holder["pid"] != os.getpid()
    store = StudyStore(tmp_path / "s")
    store.acquire()
    assert json.loads((tmp_path / "s" / "driver.lock").read_text())["pid"] == os.getpid()
    store.release()


def test_frozen_study_keeps_each_version(tmp_path):
    store = StudyStore(tmp_path / "s")
    first = store.freeze_study("name: a\n")
    assert store.freeze_study("name: a\n") == first
    grown = store.freeze_study("name: a\nmore: 1\n")
    assert grown != first and first.read_text() == "name: a\n" and grown.read_text() == "name: a\nmore: 1\n"


def test_forgetting_does_not_hang_on_the_clock_of_the_machine_that_forgot():
    """`sweep forget` names, per key, the time of the latest finished or failed event it forgot: those
    events stop counting wherever the forget event sorts (a laptop's clock behind or ahead of the head's),
    and a later run's finish counts again."""
    from sweep.results.run_stats import run_stats
    from sweep.store.records import TrialFailed, TrialFinished, TrialsForgotten
    from sweep.store.study_store import study_state

    first = TrialFinished(key="k", name="m.wanda", time=100.0, run="a")
    other = TrialFinished(key="j", name="m.sparsegpt", time=101.0, run="a")
    gave_up = TrialFailed(key="f", name="m.magnitude", time=102.0, run="a", final=True, error="boom")
    for forget_time in (50.0, 150.0):  # the forgetting machine's clock behind, or ahead
        forgot = TrialsForgotten(keys=["k", "f"], until={"k": 100.0, "f": 102.0}, time=forget_time, run="laptop")
        events = sorted([first, other, gave_up, forgot], key=lambda e: e.time)
        state = study_state(events)
        assert set(state.finished) == {"j"} and not state.failed, forget_time
        stats = run_stats(events)
        assert (stats.trials_finished, stats.trials_gave_up, stats.trials_forgotten) == (1, 0, 2)
        again = TrialFinished(key="k", name="m.wanda", time=120.0, run="b")  # the rerun, on the head's clock
        assert set(study_state(sorted([*events, again], key=lambda e: e.time)).finished) == {"j", "k"}
