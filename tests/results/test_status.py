"""`sweep status`'s summary, stage medians and the live progress line, from events alone."""
from __future__ import annotations

import io
import time

import pytest

from sweep.results.progress import LiveProgress, Summary, estimate_eta, format_duration, format_summary
from sweep.results.status import summarize
from sweep.store.records import PlanRecord, parse_event


def _event(kind, key=None, run="r2", **fields):
    return parse_event({"event": kind, "key": key, "run": run, "time": time.time(), **fields})


def test_status_summary_of_a_running_study():
    plan = PlanRecord.from_json({"trials": [{"key": k, "name": k} for k in ("a", "b", "c", "d", "e")]})
    events = [
        _event("run_started", run="r1"), _event("started", "a", run="r1", actor=1, model="m"),
        _event("finished", "a", run="r1", actor=1, seconds=10.0),
        _event("started", "e", run="r1", actor=1, model="m"),  # in flight when that driver died
        _event("run_started"),
        _event("started", "b", actor=1, model="m"), _event("finished", "b", actor=1, seconds=20.0),
        _event("started", "c", actor=1, model="m"), _event("failed", "c", actor=1, final=True, error="boom"),
        _event("started", "d", actor=2, model="n"),
    ]
    summary, extra = summarize(plan, events, driver_alive=True)
    assert (summary.total, summary.done, summary.running, summary.failed, summary.left) == (5, 2, 1, 1, 1)
    assert [(a["actor"], a["model"], a["busy"]) for a in summary.actors] == [(1, "m", False), (2, "n", True)]
    assert summary.eta_s == pytest.approx(20.0 * 1.5 / 2)
    assert extra["failed_keys"] == ["c"] and list(extra["running"]) == ["d"]
    stopped, _ = summarize(plan, events, driver_alive=False)
    assert stopped.running == 0 and stopped.left == 2 and stopped.actors == []


def test_stage_medians_per_model_and_method():
    from sweep.results.run_stats import stage_medians

    def finished(model, method, **timings):
        return _event("finished", "k", model=model, timings=timings, pruning={"method": method} if method else None)

    events = [finished("m", "wanda", calibration=1.0, pruning=4.0, perplexity=10.0),
              finished("m", "wanda", calibration=3.0, pruning=2.0, perplexity=30.0),
              finished("m", "wanda", calibration=2.0, pruning=3.0, perplexity=20.0, tasks=7.0),
              finished("m", None, perplexity=9.0, restore=0.1), _event("failed", "x", model="m"),
              _event("finished", "y", model="n"), finished("n", "magnitude", pruning="?")]
    medians = stage_medians(events)
    assert medians["m wanda"] == {"calibration": (2.0, 3), "pruning": (3.0, 3), "perplexity": (20.0, 3),
                                  "tasks": (7.0, 1)}
    assert list(medians["m dense"]) == ["perplexity", "restore"]
    assert not any(group.startswith("n ") for group in medians)  # no timings, or none that are numbers


def test_progress_lines():
    summary = Summary(total=10, done=4, running=2, failed=1, left=3, eta_s=125,
                      actors=[{"actor": 1, "model": "llama", "busy": True}, {"actor": 2, "model": None, "busy": False}])
    line = format_summary(summary)
    assert line.startswith("[#########") and "4/10 done, 2 running, 1 failed, 3 left, ETA 2m05s" in line
    assert line.endswith("| actors #1:llama* #2:-")
    assert format_duration(3 * 3600 + 120) == "3h02m" and format_duration(None) == "?"
    assert estimate_eta([], 5, 0, 2) is None and estimate_eta([], 0, 0, 2) == 0.0
    stream = io.StringIO()
    live = LiveProgress(stream, every_s=3600)
    live.update(summary)
    live.update(summary)  # throttled on a pipe
    live.log("  done    x")
    assert stream.getvalue().count("4/10 done") == 1 and "  done    x\n" in stream.getvalue()
