"""The end-to-end benchmark's time accounting: every second of each mode lands in exactly one stage.

The benchmark itself (benchmarks/end_to_end.py) takes 15 minutes; these check its bookkeeping on
records shaped like what it reads: lm_eval 0.4's log lines and the study's event log.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import end_to_end  # noqa: E402
import one_trial_today  # noqa: E402


def stamped(*pairs: tuple[float, str]) -> list[tuple[float, str]]:
    return [(t, line if line.startswith("Loading") else f"2026-11-24:09:06:00 INFO     [{line}") for t, line in pairs]


LM_EVAL_RUN = stamped(
    (101.0, "_cli.run:391] Including path: /tmp/tasks"),
    (103.0, "evaluator:239] Initializing hf model, with arguments: {...}"),
    (103.5, "models.huggingface:289] Using device 'cpu'"),
    (104.0, "Loading weights: 100%|##########| 39/39"),
    (105.0, "evaluator_utils:472] Selected tasks:"),
    (105.2, "api.task:312] Building contexts for e2e_ppl_ar on rank 0..."),
    (106.0, "evaluator:589] Running loglikelihood_rolling requests"),
    (109.0, "evaluator:589] Running loglikelihood requests"),
    (117.0, "api.task:589] demo_continuation_ar: Evaluating on 20 examples"),
    (118.0, "loggers.evaluation_tracker:247] Saving results aggregated"),
)


def test_lm_eval_phases_split_its_wall_time():
    phases = one_trial_today.lm_eval_phases(LM_EVAL_RUN, started=100.0, ended=119.0)
    assert phases == pytest.approx({"startup": 3.0, "load": 2.0, "task_setup": 1.0, "rolling": 3.0,
                                    "loglikelihood": 8.0, "rest": 2.0})
    assert sum(phases.values()) == pytest.approx(19.0)


def test_lm_eval_phases_of_a_run_that_never_loaded_a_model():
    assert one_trial_today.lm_eval_phases(LM_EVAL_RUN[:1], started=100.0, ended=102.5) == {"startup": 2.5}


def today_record(name: str, spawn: float, dense: bool = False) -> dict:
    lm_wall = 19.0
    report = {"t_start": spawn + 0.5, "imports_s": 2.0, "dense": dense, "t_end": spawn + 0.5 + 2.0 + lm_wall + 0.25,
              "lm_eval": {"wall_s": lm_wall, "phases": one_trial_today.lm_eval_phases(LM_EVAL_RUN, 100.0, 119.0)},
              "metrics": []}
    if not dense:
        report.update(load_s=1.0, calibration_s=0.5, pruning_s=3.0, save_s=0.5)
        report["t_end"] += 5.0
    return {"name": name, "spawn": spawn, "exit": report["t_end"] + 0.1, "code": 0, "report": report}


def test_today_breakdown_adds_up_to_slots_times_wall():
    trials = [today_record("m.dense", 0.0, dense=True), today_record("m.wanda", 0.0), today_record("m.sgpt", 22.0)]
    run = {"spawn": 0.0, "exit": 60.0, "wall_s": 60.0, "trials": trials}
    out = end_to_end.breakdown_today(run, slots=2)
    stages = out["stages"]
    assert sum(stages.values()) == pytest.approx(2 * 60.0)
    assert out["model_loads"] == 1 + 2 + 2  # a dense trial loads once (lm_eval), a pruned one twice
    assert stages["pruning"] == pytest.approx(6.0) and stages["perplexity"] == pytest.approx(3 * 3.0)
    assert stages["loads"] == pytest.approx(3 * 2.0 + 2 * 1.0)
    busy = sum(t["exit"] - t["spawn"] for t in trials)
    assert stages["idle"] == pytest.approx(120.0 - busy)


def event(kind: str, at: float, **fields) -> dict:
    return {"event": kind, "time": at, **fields}


def test_sweep_breakdown_adds_up_to_slots_times_wall():
    timings = {"calibration": 0.5, "pruning": 2.0, "perplexity": 3.0, "tasks": 4.0}
    events = [event("run_started", 1.0),
              event("actor_started", 5.0, actor=1), event("actor_started", 6.0, actor=2),
              event("model_loaded", 8.0, actor=1, seconds=2.5, load={"seconds": 2.0}),
              event("model_loaded", 9.0, actor=2, seconds=3.0, load={"seconds": 2.0}),
              event("finished", 20.0, actor=1, name="a.dense", seconds=9.0, timings={"perplexity": 3.0, "tasks": 6.0}),
              event("finished", 30.0, actor=1, name="a.wanda", seconds=10.0, timings=timings),
              event("finished", 21.0, actor=2, name="b.wanda", seconds=10.0, timings=timings),
              event("run_finished", 35.0)]
    run = {"spawn": 0.0, "exit": 40.0, "wall_s": 40.0, "events": events}
    out = end_to_end.breakdown_sweep(run, slots=2)
    stages = out["stages"]
    assert sum(stages.values()) == pytest.approx(2 * 40.0)
    assert out["model_loads"] == 2 and out["trials_finished"] == 3
    # actor 1's first trial spent 2 s more in tasks than its later one: lm-eval's import, moved to start-up
    assert out["first_trial_tasks_excess_s"] == pytest.approx(2.0)
    assert stages["tasks"] == pytest.approx(6.0 + 4.0 + 4.0 - 2.0)
    assert stages["startup"] == pytest.approx(5.0 + 6.0 + 0.5 + 1.0 + 2.0 + 2 * 5.0)
    assert stages["other"] == pytest.approx(0.0 + 0.5 + 0.5)
