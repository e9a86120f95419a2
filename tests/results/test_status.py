"""`sweep status`'s summary, the ETA per model, stage medians, the live progress line, and the command's
--json and --watch, from events alone."""
from __future__ import annotations

import argparse
import io
import json
import time

import pytest
import yaml

from sweep.cli.status import StudySeeds, WatchOptions, live_view, register, run_status, watch
from sweep.results.progress import (
    ESTIMATED,
    MEASURED,
    UNKNOWN,
    LiveProgress,
    ModelWork,
    Seed,
    Summary,
    format_duration,
    format_summary,
    model_eta,
    pool_eta,
    remaining_seconds,
    study_eta,
    trial_rate,
)
from sweep.results.status import format_status, read_status, status_json, summarize
from sweep.store.records import (
    ActorLost,
    ActorReleased,
    ActorStarted,
    ModelLoaded,
    PlannedTrial,
    PlanRecord,
    RunStarted,
    TrialFailed,
    TrialFinished,
    TrialStarted,
    parse_event,
)
from sweep.store.study_store import StudyStore

T0 = 1_700_000_000.0


def _event(kind, key=None, run="r2", at=None, **fields):
    return parse_event({"event": kind, "key": key, "run": run, "time": time.time() if at is None else at, **fields})


def _plan(models: dict[str, int], gpus: dict[str, int] | None = None) -> PlanRecord:
    """`models`: label -> trials; keys are <label><i>."""
    trials = tuple(PlannedTrial(model=m, pruner="wanda", sparsity="0.5", calibration="en", seed=0, dense=False,
                                key=f"{m}{i}", name=f"{m}.t{i}") for m, n in models.items() for i in range(n))
    return PlanRecord(study="s", trials=trials, gpus=gpus or {})


def test_status_summary_of_a_running_study():
    plan = PlanRecord.from_json({"trials": [{"key": k, "name": k, "model": "m" if k != "d" else "n"}
                                            for k in ("a", "b", "c", "d", "e")]})
    events = [
        _event("run_started", run="r1"), _event("started", "a", run="r1", actor=1, model="m"),
        _event("finished", "a", run="r1", actor=1, seconds=10.0),
        _event("started", "e", run="r1", actor=1, model="m"),  # in flight when that driver died
        _event("run_started"),
        _event("started", "b", actor=1, model="m"), _event("finished", "b", actor=1, seconds=20.0),
        _event("started", "c", actor=1, model="m"), _event("failed", "c", actor=1, final=True, error="boom"),
        _event("started", "d", actor=2, model="n"),
    ]
    progress = summarize(plan, events, driver_alive=True)
    summary = progress.summary
    assert (summary.total, summary.done, summary.running, summary.failed, summary.left) == (5, 2, 1, 1, 1)
    assert [(a["actor"], a["model"], a["busy"]) for a in summary.actors] == [(1, "m", False), (2, "n", True)]
    assert [f.key for f in progress.failed] == ["c"] and [r.key for r in progress.running] == ["d"]
    assert progress.running[0].loading  # actor 2 held no model: it loads "n" before the trial runs
    by_model = {m.model: m for m in progress.eta.models}
    # m: (10 + 20) / 2 = 15 s per trial, 1 left (e), on its one actor; n: no trial finished, no seed
    assert by_model["m"].rate.basis == MEASURED and by_model["m"].eta_s == pytest.approx(15.0)
    assert by_model["n"].rate.basis == UNKNOWN and summary.eta_s is None and progress.eta.unknown == ("n",)
    assert progress.eta.at_least_s == pytest.approx(15.0)
    stopped = summarize(plan, events, driver_alive=False)
    assert stopped.summary.running == 0 and stopped.summary.left == 2 and stopped.summary.actors == []
    assert stopped.summary.eta_s is None and {m.model: m.work_s for m in stopped.eta.models} == {"m": 15.0, "n": None}


def test_a_lost_or_released_actor_is_not_brought_back_by_its_trials_failure():
    """The scheduler logs `actor_lost` (or `actor_released` on a timeout) and then the trial's `failed` with
    the same actor id (sweep/execution/scheduler.py `_on_reply`, `_check_timeouts`): that actor is gone and
    must not count towards the ETA, or a lost-and-replaced actor counts twice."""
    for gone in (ActorLost, ActorReleased):
        events = [_event("run_started", at=T0 - 100)]
        for actor in (1, 2):
            events.append(_event("actor_started", at=T0 - 90, actor=actor, gpus=[str(actor)]))
        events += [_event("started", "m0", at=T0 - 80, actor=1, model="m", gpus=["1"]),
                   _event("finished", "m0", at=T0 - 70, actor=1, model="m", seconds=10.0, gpus=["1"]),
                   _event("started", "m1", at=T0 - 60, actor=1, model="m", gpus=["1"]),
                   gone(actor=1, model="m", time=T0 - 50, run="r2"),
                   _event("failed", "m1", at=T0 - 50, actor=1, model="m", final=False, gpus=["1"], error="died"),
                   _event("actor_started", at=T0 - 40, actor=3, gpus=["1"]),  # its replacement, not yet busy
                   _event("started", "m2", at=T0 - 5, actor=2, model="m", gpus=["2"])]
        progress = summarize(_plan({"m": 5}, gpus={"m": 1}), events, driver_alive=True, now=T0)
        # m1, m3, m4 left at 10 s and m2 whole (its actor still loads m): 40 actor-seconds over actors 2 and 3,
        # actor 1 being gone
        assert progress.eta.actors == 2, gone
        assert [a["actor"] for a in progress.summary.actors] == [2]
        assert progress.eta.eta_s == pytest.approx(40 / 2)
        assert [r.key for r in progress.running] == ["m2"]


def test_the_verified_scenario_of_a_lost_and_replaced_actor():
    """One actor lost and replaced, one live actor, 30 s of work left: one actor, 30 s (the review's case)."""
    events = [_event("run_started", at=T0 - 100),
              _event("actor_started", at=T0 - 90, actor=1, gpus=["0"]),
              _event("started", "m0", at=T0 - 80, actor=1, model="m", gpus=["0"]),
              _event("finished", "m0", at=T0 - 70, actor=1, model="m", seconds=10.0, gpus=["0"]),
              _event("started", "m1", at=T0 - 60, actor=1, model="m", gpus=["0"]),
              ActorLost(actor=1, model="m", gpus=["0"], time=T0 - 50, run="r2"),
              _event("failed", "m1", at=T0 - 50, actor=1, model="m", final=False, gpus=["0"], error="died"),
              _event("actor_started", at=T0 - 40, actor=2, gpus=["0"])]
    eta = summarize(_plan({"m": 4}, gpus={"m": 1}), events, driver_alive=True, now=T0).eta
    assert (eta.actors, eta.eta_s) == (1, pytest.approx(30.0))


def test_the_eta_of_a_slice_counts_only_its_trials():
    """`sweep run --only`: the run's `run_started` names its keys; the rest of the plan still counts as left,
    but it is not this run's work, so it stays out of the ETA (and a model outside the slice with no rate does
    not make the ETA unknown)."""
    plan = _plan({"a": 6, "b": 4})
    events = [_event("run_started", run="r1", at=T0 - 900),
              _event("started", "a0", run="r1", at=T0 - 850, actor=1, model="a"),
              _event("finished", "a0", run="r1", at=T0 - 800, actor=1, model="a", seconds=20.0),
              _event("run_started", at=T0 - 500, only="pruner=wanda,model=a", selected=["a1", "a2", "a3"]),
              _event("actor_started", at=T0 - 490, actor=1, gpus=["0"]),
              _event("started", "a1", at=T0 - 400, actor=1, model="a"),
              _event("finished", "a1", at=T0 - 360, actor=1, model="a", seconds=40.0),
              _event("started", "a2", at=T0 - 10, actor=1, model="a")]
    progress = summarize(plan, events, driver_alive=True, now=T0)
    summary = progress.summary
    assert (summary.total, summary.done, summary.running, summary.left) == (10, 2, 1, 7)  # the whole plan
    [a] = progress.eta.models  # b has no trial in the slice: not this run's work, and no rate needed
    assert (a.work.total, a.work.done, len(a.work.running), a.work.left) == (3, 1, 1, 1)
    assert (a.rate.seconds, a.rate.samples) == (30.0, 2)  # measured over every finished trial of the model
    assert a.work_s == pytest.approx(30 + (30 - 10)) and progress.eta.unknown == ()
    assert summary.eta_s == pytest.approx(50.0) and progress.eta.eta_s == pytest.approx(50.0)
    assert progress.slice is not None and (progress.slice.only, progress.slice.selected, progress.slice.planned) == (
        "pruner=wanda,model=a", 3, 10)
    # the full run before it was no slice: its status counts every planned trial
    whole = summarize(plan, events[:3], driver_alive=False, now=T0)
    assert whole.slice is None and [m.model for m in whole.eta.models] == ["a", "b"]


def test_a_slice_is_shown_in_the_text_and_the_json(tmp_path):
    store = StudyStore(tmp_path / "sliced")
    store.write_plan(_plan({"m": 4}))
    with store:
        store.append(RunStarted(study="s", only="model=m,seed=0", selected=["m0", "m1"]))
        status = read_status(store)
        data = status_json(status)
    assert "  slice --only model=m,seed=0: 2 of 4 trials" in format_status(status).splitlines()
    assert data["slice"] == {"only": "model=m,seed=0", "selected": 2}
    assert data["models"][0]["total"] == 2 and data["counts"]["total"] == 4
    from rich.console import Console

    console = Console(file=io.StringIO(), width=160, record=True)
    console.print(live_view(status, 10.0))
    assert "slice --only model=m,seed=0: 2 of 4 trials" in console.export_text()


def _fast_and_slow_events(run="r1"):
    """A fast model (100 s a trial) and a slow one (1,000 s) on one actor each, two trials of each finished;
    at T0 the fast one's third has run 50 s, the slow one's 400 s (after a 50 s reload of its model)."""
    events = [_event("run_started", run=run, at=T0 - 5000)]
    for actor in (1, 2):
        events.append(_event("actor_started", run=run, at=T0 - 4000, actor=actor, gpus=[str(actor)]))
    clock = T0 - 3000
    for i in range(2):
        for actor, model, seconds in ((1, "fast", 100.0), (2, "slow", 1000.0)):
            events += [_event("started", f"{model}{i}", run=run, at=clock, actor=actor, model=model),
                       _event("finished", f"{model}{i}", run=run, at=clock + 1, actor=actor, model=model,
                              seconds=seconds)]
            clock += 2
    events += [_event("started", "fast2", run=run, at=T0 - 50, actor=1, model="fast"),
               _event("started", "slow2", run=run, at=T0 - 450, actor=2, model="slow"),
               _event("model_loaded", run=run, at=T0 - 400, actor=2, model="slow", seconds=50.0)]
    return events


def test_the_eta_of_each_model_is_its_own_rate_and_not_a_mix_of_both():
    plan = _plan({"fast": 10, "slow": 10})  # 2 done, 1 running and 7 left of each
    events = _fast_and_slow_events()
    progress = summarize(plan, events, driver_alive=True, now=T0)
    fast, slow = progress.eta.models
    assert (fast.rate.seconds, fast.rate.samples, slow.rate.seconds) == (100.0, 2, 1000.0)
    assert fast.work_s == pytest.approx(7 * 100 + (100 - 50)) and fast.eta_s == pytest.approx(750.0)
    assert slow.work_s == pytest.approx(7 * 1000 + (1000 - 400)) and slow.eta_s == pytest.approx(7600.0)
    # one GPU count for both: the actors pool, so the fast model's actor helps the slow one when it runs dry
    assert progress.eta.eta_s == pytest.approx(max((750 + 7600) / 2, 7600 / 2))
    # the old global mean (550 s) over both: the fast model's ETA would be 5.5x too long, the slow one's 1.8x
    # too short, and no per-model figure at all
    old = 550 * (14 + 2 / 2) / 2  # what the driver's bar used to say: the mean of all trials, all models
    assert old != pytest.approx(progress.eta.eta_s)
    # models of different GPU counts never share actors: each pool runs on its own, the study takes the longest
    apart = summarize(_plan({"fast": 10, "slow": 10}, gpus={"fast": 1, "slow": 2}), events, True, now=T0)
    assert apart.eta.eta_s == pytest.approx(7600.0)


def test_eta_math():
    assert remaining_seconds(100.0, 3, [30.0, None, 150.0]) == pytest.approx(300 + 70 + 50 + 0)
    assert trial_rate([10.0, 20.0, 0.0]).seconds == 15.0  # 0: a record without `seconds`, not a measurement
    assert trial_rate([], Seed(40.0, "plan")).basis == ESTIMATED
    assert trial_rate([], Seed(None, "no config")) == trial_rate([], Seed(None, "no config"))
    assert trial_rate([], Seed(None, "no config")).note == "no config"
    # one model's last trial runs on one actor however many are idle
    last = model_eta(ModelWork("m", total=5, done=4, running=(0.0,), durations=(60.0,) * 4, actors=1))
    assert pool_eta([last], actors=8) == pytest.approx(60.0)
    many = model_eta(ModelWork("m", total=20, left=16, durations=(60.0,) * 4))
    assert pool_eta([many], actors=8) == pytest.approx(16 * 60 / 8) and many.eta_s is None  # no actor on it now
    assert pool_eta([many], actors=0) is None
    done = study_eta([ModelWork("m", total=2, done=2, durations=(5.0, 5.0))])
    assert done.eta_s == 0.0 and done.models[0].eta_s == 0.0
    seeded = study_eta([ModelWork("m", total=4, left=4, actors=2)], {"m": Seed(30.0)})
    assert seeded.eta_s == pytest.approx(60.0) and seeded.models[0].rate.basis == ESTIMATED


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
    stream = io.StringIO()
    live = LiveProgress(stream, every_s=3600)
    live.update(summary)
    live.update(summary)  # throttled on a pipe
    live.log("  done    x")
    assert stream.getvalue().count("4/10 done") == 1 and "  done    x\n" in stream.getvalue()


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_live_progress_on_a_terminal_redraws_in_place_with_event_lines_above():
    """On a terminal the driver's bar is a rich live region: each update redraws it (cursor moves up and
    erases the lines it took), event lines print above it, and the last summary stays on screen."""
    def summary(done: int) -> Summary:
        return Summary(total=10, done=done, running=1, failed=0, left=9 - done, eta_s=60.0 * (10 - done))

    screen = Terminal()
    live = LiveProgress(screen)
    live.update(summary(1))
    live.log("  done    m.wanda.s50.cal-de.seed0  (1.0 s, actor #1, attempt 1)")
    live.update(summary(2))
    live.update(summary(2))  # unchanged: nothing redrawn
    live.close()
    text = screen.getvalue()
    assert text.count("2/10 done") == 2 and "1/10 done" in text  # drawn by the first update and on close only
    assert "\x1b[" in text  # cursor control: redrawn in place, not appended
    event = text.index("  done    m.wanda.s50.cal-de.seed0")
    assert text.index("1/10 done") < event < text.rindex("2/10 done")  # the event above the newer bar
    assert text.replace("\x1b[?25h", "").endswith("\n")  # (the cursor shown again) the final summary left on its own line for what the driver prints next


# -- the command on study directories written with StudyStore ------------------------------------------------
LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32000, "hidden_size": 512,
         "intermediate_size": 1408, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8}


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    """A study directory as a driver leaves it after `sweep run`: its frozen study file (two local models
    on one GPU each, one hub model no cache holds, one on CPU), plan.json and a first run's events."""
    from sweep.study.grid import expand
    from sweep.study.load import load_study

    root = tmp_path_factory.mktemp("status")
    text = root / "text"
    for lang in ("en", "de"):
        (text / lang).mkdir(parents=True)
        (text / lang / "a.txt").write_text("words " * 1000)
    models = []
    for name, gpus, width in (("small", 1, 512), ("big", 1, 1024), ("cpu", 0, 256)):  # differing configs:
        folder = root / name  # equal model directories would make equal trial keys
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**LLAMA, "hidden_size": width}))
        models.append({"name": name, "path": str(folder), "gpus": gpus})
    models.append({"name": "hub", "hub": "calib-test/not-in-any-cache", "revision": "0123abcd", "gpus": 1})
    source = {"kind": "local", "path": str(text)}
    study = {"name": "watched", "models": models,
             "calibration": {"source": source, "languages": ["en", "de"], "samples": 8, "seq_len": 64, "seeds": [0]},
             "pruners": [{"method": "wanda", "sparsity": 0.5}, {"method": "sparsegpt", "sparsity": 0.5}],
             "evaluation": {"languages": ["en", "de"],
                            "perplexity": {"source": source, "window": 64, "max_tokens": 256}}}
    path = root / "watched.yaml"
    path.write_text(yaml.safe_dump(study))
    loaded = load_study(path)
    trials = expand(loaded).trials  # per model: 1 dense + 2 x 2 pruned
    directory = root / "runs" / "watched"
    store = StudyStore(directory)
    frozen = store.freeze_study(loaded.file_text)
    store.write_plan(PlanRecord(study="watched", gpus={m["name"]: m["gpus"] for m in models}, trials=tuple(
        PlannedTrial(model=t.model_label, pruner=t.pruner_label or "dense", sparsity="0.5", calibration=None,
                     seed=t.seed, dense=t.is_dense, key=t.key, name=t.name) for t in trials)))
    small = [t for t in trials if t.model_label == "small"]
    with store:
        store.append(RunStarted(study="watched", study_file=str(frozen), trials=len(trials), to_run=len(trials)))
        store.append(ActorStarted(actor=1, host="node-a", gpus=["0"]))
        for attempt, trial in enumerate(small[:2], 1):
            store.append(TrialStarted(key=trial.key, name=trial.name, model="small", actor=1, host="node-a"))
            if attempt == 1:
                store.append(ModelLoaded(model="small", actor=1, seconds=1.0))
            store.append(TrialFinished(key=trial.key, name=trial.name, model="small", actor=1, seconds=4.0 * attempt,
                                       timings={"perplexity": 1.5}))
        store.append(TrialStarted(key=small[2].key, name=small[2].name, model="small", actor=1, host="node-a"))
        store.append(TrialFailed(key=small[2].key, name=small[2].name, model="small", actor=1, final=True,
                                 error="RuntimeError: injected", traceback="Traceback (most recent call last): ..."))
    alone = root / "big-alone.yaml"
    alone.write_text(yaml.safe_dump({**study, "models": [models[1]]}))
    return {"directory": directory, "study": loaded, "trials": trials, "big_alone": load_study(alone)}


def _status_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sweep")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["status", *argv])


def test_models_are_seeded_from_the_plan_estimate_until_a_trial_finished(study_dir):
    from sweep.plan.estimate import study_time_estimates
    from sweep.study.grid import expand

    store = StudyStore(study_dir["directory"])
    seeds = StudySeeds(store, 989.0)(store.read_events().events)
    # what `sweep plan --estimate` says of the big model alone, averaged over its 1 dense + 4 pruned trials
    alone = study_dir["big_alone"]
    [big] = study_time_estimates(alone, expand(alone).trials, 989.0)
    assert big.trials == {"dense": 1, "wanda": 2, "sparsegpt": 2}
    expected = sum(n * big.seconds[m] for m, n in big.trials.items()) / 5
    assert seeds["big"].seconds == pytest.approx(expected) and "989 TFLOP/s" in seeds["big"].note
    assert seeds["hub"].seconds is None and "hub cache" in seeds["hub"].note  # offline: unknown, no crash
    assert seeds["cpu"].seconds is None and "CPU" in seeds["cpu"].note
    status = read_status(StudyStore(study_dir["directory"]), StudySeeds(StudyStore(study_dir["directory"])))
    basis = {m.model: (m.rate.basis, m.rate.samples) for m in status.progress.eta.models}
    assert basis == {"small": (MEASURED, 2), "big": (ESTIMATED, 0), "cpu": (UNKNOWN, 0), "hub": (UNKNOWN, 0)}
    text = format_status(status)
    assert "small  2/5 done, 0 running, 1 failed, 2 left" in text and "(measured, n=2)" in text
    assert "s/trial (estimated)" in text and "? s/trial (unknown: runs on CPU" in text


def test_a_study_file_that_no_longer_loads_leaves_the_rates_unknown(tmp_path):
    store = StudyStore(tmp_path / "d")
    store.freeze_study("name: gone\nmodels: [{name: m, path: /nowhere/m}]\n")
    store.write_plan(_plan({"m": 2}))
    seeds = StudySeeds(store)([])
    assert seeds["m"].seconds is None and "does not load here" in seeds["m"].note
    assert StudySeeds(StudyStore(tmp_path / "empty"))([]) == {}


def test_status_json(study_dir, capsys):
    out = io.StringIO()
    assert run_status(_status_args(str(study_dir["directory"]), "--json"), out=out) == 0
    data = json.loads(out.getvalue())
    assert set(data) == {"schema", "as_of", "as_of_unix", "study", "directory", "state", "runs", "counts", "eta_s",
                         "eta", "models", "actors", "running", "failed", "stage_medians", "notes", "slice"}
    assert data["slice"] is None  # the run was not a `sweep run --only` slice
    assert data["study"] == "watched" and data["state"] == {"running": False, "finished": True, "driver": None,
                                                             "stale_lock": False}
    assert data["counts"] == {"total": 20, "done": 2, "running": 0, "failed": 1, "left": 17}
    assert data["eta_s"] is None and data["runs"]["count"] == 1
    small, big, cpu, hub = data["models"]
    assert (small["basis"], small["measured_trials"], small["seconds_per_trial"]) == ("measured", 2, 6.0)
    assert small["work_s"] == pytest.approx(12.0) and small["eta_s"] is None  # stopped: no actor to divide by
    assert big["basis"] == "estimated" and big["seconds_per_trial"] > 0 and big["work_s"] > 0
    assert (cpu["basis"], hub["basis"], hub["work_s"]) == ("unknown", "unknown", None)
    assert set(small) == {"model", "pool", "total", "done", "running", "failed", "left", "actors",
                          "seconds_per_trial", "basis", "measured_trials", "note", "work_s", "eta_s"}
    [failed] = data["failed"]
    assert failed["error"] == "RuntimeError: injected" and failed["final"] and failed["traceback"] is None
    assert data["stage_medians"] == {"small dense": {"perplexity": {"median_s": 1.5, "trials": 2}}}
    assert data["notes"] == {"cut_off": [], "unreadable": []}
    out = io.StringIO()
    assert run_status(_status_args(str(study_dir["directory"]), "--json", "--failures"), out=out) == 0
    assert json.loads(out.getvalue())["failed"][0]["traceback"].startswith("Traceback")


def test_status_json_of_a_running_driver(tmp_path):
    store = StudyStore(tmp_path / "live")
    store.write_plan(_plan({"m": 3}))
    with store:  # this process holds the lock: a live driver
        store.append(RunStarted(study="s"))
        store.append(TrialStarted(key="m0", name="m.t0", model="m", actor=3, host="node-b", attempt=2))
        out = io.StringIO()
        assert run_status(_status_args(str(tmp_path / "live"), "--json"), out=out) == 0
    data = json.loads(out.getvalue())
    assert data["state"]["running"] and data["state"]["driver"]["pid"] > 0 and not data["state"]["finished"]
    [running] = data["running"]
    assert (running["name"], running["key"], running["attempt"], running["actor"], running["host"]) == (
        "m.t0", "m0", 2, 3, "node-b")
    assert running["loading"] and running["seconds"] >= 0
    assert data["actors"] == [{"actor": 3, "model": "m", "busy": True}] and data["models"][0]["actors"] == 1


def test_watch_on_a_pipe_prints_whole_summaries(study_dir):
    out, naps = io.StringIO(), []
    args = _status_args(str(study_dir["directory"]), "--watch", "--every", "0.01", "--count", "2")
    assert run_status(args, out=out, sleep=naps.append) == 0
    text = out.getvalue()
    assert text.count("--- ") == 2 and text.count("2/20 done") == 2 and naps == [0.01]


def test_watch_json_gives_one_object_per_line(study_dir):
    out = io.StringIO()
    assert run_status(_status_args(str(study_dir["directory"]), "--watch", "--json", "--count", "3"),
                      out=out, sleep=lambda _s: None) == 0
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["counts"]["done"] == 2 for line in lines)


def test_watch_ends_on_ctrl_c_until_done_or_a_bad_directory(study_dir, tmp_path):
    def interrupt(_seconds):
        raise KeyboardInterrupt

    assert run_status(_status_args(str(study_dir["directory"]), "--watch"), out=io.StringIO(), sleep=interrupt) == 0
    # the driver is gone and nothing runs, with a failed trial and trials never run: exit 1 at once
    out = io.StringIO()
    assert run_status(_status_args(str(study_dir["directory"]), "--watch", "--until-done"), out=out,
                      sleep=interrupt) == 1
    assert out.getvalue().count("--- ") == 1
    err = io.StringIO()
    assert run_status(_status_args(str(tmp_path / "nothing"), "--watch"), out=io.StringIO(), err=err) == 2
    assert "not a study directory" in err.getvalue()
    assert run_status(_status_args(str(study_dir["directory"]), "--count", "2"), err=io.StringIO()) == 2
    shown = []
    assert watch(lambda: None, shown.append, WatchOptions(every_s=1)) == 2 and shown == []


def test_watch_is_a_flag_and_every_sets_its_seconds(study_dir):
    """`sweep status --watch DIR` once read DIR as the seconds (`--watch` took an optional value)."""
    args = _status_args("--watch", str(study_dir["directory"]), "--count", "1")
    assert args.directory == str(study_dir["directory"]) and args.watch is True and args.every is None
    out, naps = io.StringIO(), []
    assert run_status(_status_args("--watch", str(study_dir["directory"]), "--count", "2"), out=out,
                      sleep=naps.append) == 0
    assert naps == [10.0] and out.getvalue().count("--- ") == 2  # the default: every 10 s
    for argv, why in ((("--every", "5"), "--every SECONDS goes with --watch"),
                      (("--watch", "--every", "0"), "--every SECONDS must be positive"),
                      (("--watch", "--every", "-3"), "--every SECONDS must be positive")):
        err = io.StringIO()
        assert run_status(_status_args(str(study_dir["directory"]), *argv), out=io.StringIO(), err=err) == 2
        assert why in err.getvalue(), argv


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_watch_on_a_terminal_draws_a_rich_table(study_dir):
    from rich.console import Console

    status = read_status(StudyStore(study_dir["directory"]), StudySeeds(StudyStore(study_dir["directory"])))
    console = Console(file=io.StringIO(), width=160, record=True)
    console.print(live_view(status, 10.0))
    text = console.export_text()
    for expected in ("per model", "small", "2/5", "measured, n=2", "estimated", "failed (1", "RuntimeError: injected",
                     "hub: ? s/trial (unknown: config.json of calib-test/not-in-any-cache"):
        assert expected in text, text
    terminal = _Terminal()
    assert run_status(_status_args(str(study_dir["directory"]), "--watch", "--every", "1", "--count", "1"),
                      out=terminal) == 0
    assert "small" in terminal.getvalue() and "\x1b[" in terminal.getvalue()  # drawn with rich, not plain lines


def test_status_of_json_matches_the_plain_text(study_dir):
    status = read_status(StudyStore(study_dir["directory"]))
    data = status_json(status)
    assert data["counts"]["done"] == status.progress.summary.done
    assert f"{data['counts']['done']}/{data['counts']['total']} done" in format_status(status)
