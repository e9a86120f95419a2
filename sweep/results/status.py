"""`sweep status DIR`: the live summary, from the study directory alone (running or stopped).

`read_status` folds the event logs into one typed `StudyStatus`; `format_status` writes it as text and
`status_json` as the JSON object of `sweep status --json` (keys documented in docs/status.md). The
seconds per trial a model is seeded with before any of its trials finished come from the study file
(`sweep plan --estimate`), which this layer does not read: the caller passes them in (sweep/cli/status.py).
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from sweep.results.progress import (
    ModelEta,
    Seed,
    StudyEta,
    Summary,
    format_duration,
    format_summary,
    model_work,
    study_eta,
)
from sweep.results.run_stats import stage_medians
from sweep.store.records import (
    ActorLost,
    ActorReleased,
    Event,
    ModelLoaded,
    OnActor,
    PlanRecord,
    RunStarted,
    TrialAbandoned,
    TrialFailed,
    TrialFinished,
    TrialStarted,
)
from sweep.store.study_store import LogReading, StudyState, StudyStore, study_state

JSON_SCHEMA = 1  # bumped when a key of `status_json` changes meaning or goes away (new keys do not bump it)

# The seeds of a study's models, given its events (they name the frozen study file the latest run read).
SeedSource = Callable[[list[Event]], Mapping[str, Seed]]


@dataclass(frozen=True)
class RunningTrial:
    key: str
    name: str
    model: str
    attempt: int
    actor: int | None
    host: str | None
    started: float  # unix time of its TrialStarted
    seconds: float  # since it started, its model load included
    loading: bool  # its actor is still loading the model (the trial itself has not begun)


@dataclass(frozen=True)
class FailedTrial:
    """A trial whose latest attempt failed and that has not finished since; `final`: no retry follows."""

    key: str
    name: str
    model: str
    attempt: int
    final: bool
    error: str
    traceback: str


@dataclass
class _Actor:
    id: int
    model: str | None = None
    busy: bool = False
    gpus: int | None = None  # how many GPUs it holds, when an event said
    trial: str | None = None  # the key it works on
    trial_began: float | None = None  # when that trial itself began (after any model load)


@dataclass(frozen=True)
class Slice:
    """The latest run was `sweep run --only`: only its trials are that run's work (the rest of the plan waits)."""

    only: str | None  # the slice as typed
    selected: int  # planned trials in the slice
    planned: int  # trials in the plan


@dataclass(frozen=True)
class StudyProgress:
    """What the event logs say of the latest plan: counts, ETA, the trials running and failed."""

    summary: Summary
    eta: StudyEta
    runs: int  # driver runs so far
    latest_run: str | None
    running: tuple[RunningTrial, ...]
    failed: tuple[FailedTrial, ...]
    state: StudyState
    slice: Slice | None = None  # the latest run's --only, when it had one


def _pool(gpus: int) -> str:
    """Models that need as many GPUs per replica run on actors of one shape, which the scheduler moves
    between them; models of other GPU counts never share an actor with them."""
    return f"{gpus} GPU"


def summarize(plan: PlanRecord | None, events: list[Event], driver_alive: bool, now: float | None = None,
              seeds: Mapping[str, Seed] | None = None) -> StudyProgress:
    """The progress of the latest plan, from events: running trials and actors are those of the latest
    driver run (none once its driver is gone), counts and measured durations are over every run."""
    now = time.time() if now is None else now
    store_state = study_state(events)
    trials = plan.trials if plan is not None else ()
    runs = [e for e in events if isinstance(e, RunStarted)]
    latest = runs[-1].run if runs else None
    live = [e for e in events if e.run == latest] if latest else []
    started: dict[str, TrialStarted] = {}
    actors: dict[int, _Actor] = {}
    # Actors lost or released: the scheduler logs the failure of the trial they held after that, with their
    # id, which must not bring them back (a run never reuses an actor id).
    gone: set[int] = set()
    for event in live:
        actor = None
        if isinstance(event, (OnActor, ActorReleased)) and event.actor is not None and event.actor not in gone:
            if isinstance(event, (ActorReleased, ActorLost)):
                actors.pop(event.actor, None)
                gone.add(event.actor)
                continue
            actor = actors.setdefault(event.actor, _Actor(event.actor))
            if isinstance(event, OnActor) and isinstance(event.gpus, list):
                actor.gpus = len(event.gpus)
        if isinstance(event, TrialStarted):
            started[event.key] = event
            if actor is not None:
                # the scheduler loads a model the actor does not hold before the trial: time that as loading
                loads = bool(event.model) and actor.model != event.model
                actor.model, actor.busy, actor.trial = event.model or None, True, event.key
                actor.trial_began = None if loads else event.time
        elif isinstance(event, ModelLoaded):
            if actor is not None:
                actor.model = event.model or actor.model
                actor.trial_began = event.time
        elif isinstance(event, (TrialFinished, TrialFailed, TrialAbandoned)):
            started.pop(event.key, None)
            if actor is not None:
                actor.busy, actor.trial, actor.trial_began = False, None, None
    if not driver_alive:
        started, actors = {}, {}
    on_actor = {a.trial: a for a in actors.values() if a.trial}
    running = []
    for key, event in started.items():
        actor = on_actor.get(key)
        loading = actor is not None and actor.trial_began is None
        running.append(RunningTrial(key=key, name=event.name or key, model=event.model, attempt=event.attempt,
                                    actor=event.actor, host=event.host, started=event.time,
                                    seconds=max(now - event.time, 0.0) if event.time else 0.0, loading=loading))

    keys = [t.key for t in trials]
    in_flight = {r.key for r in running}
    gave_up = [k for k in keys if not store_state.is_done(k) and store_state.gave_up(k) and k not in in_flight]
    pools = {t.model: _pool(int((plan.gpus if plan else {}).get(t.model, 0) or 0)) for t in trials}
    elapsed: dict[str, float | None] = {}
    for r in running:
        actor = on_actor.get(r.key)
        if r.loading:
            elapsed[r.key] = 0.0
        elif actor is not None and actor.trial_began:
            elapsed[r.key] = max(now - actor.trial_began, 0.0)
        else:
            elapsed[r.key] = None  # started on no actor we know of, or without a time: half a trial
    per_model: dict[str, int] = {}
    pool_actors: dict[str, int] = {}
    for actor in actors.values():
        if actor.model:
            per_model[actor.model] = per_model.get(actor.model, 0) + 1
        pool = pools.get(actor.model) if actor.model else _pool(actor.gpus) if actor.gpus is not None else None
        if pool is not None:
            pool_actors[pool] = pool_actors.get(pool, 0) + 1
    planned = set(keys)
    done_s = {k: store_state.finished[k].seconds for k in keys if store_state.is_done(k)}
    chosen = _slice(runs[-1] if runs else None, keys)
    # Under a slice only its trials are the run's work: the rest of the plan stays out of the ETA
    mine = planned if chosen is None else set(chosen)
    works = model_work(((t.key, t.model) for t in trials if t.key in mine), done=done_s,
                       failed=gave_up, running={k: v for k, v in elapsed.items() if k in mine},
                       actors=per_model, pools=pools)
    if chosen is not None:  # but a model's rate is still measured on all its finished trials
        works = [replace(w, durations=tuple(done_s[t.key] for t in trials if t.model == w.model and t.key in done_s))
                 for w in works]
    eta = study_eta(works, seeds, pool_actors)
    in_plan = sum(1 for k in keys if k in in_flight)
    done = sum(1 for k in keys if store_state.is_done(k))
    summary = Summary(total=len(keys), done=done, running=in_plan, failed=len(gave_up),
                      left=len(keys) - done - len(gave_up) - in_plan,
                      eta_s=eta.eta_s if driver_alive else None,
                      # as before actor_started was read: actors that took a trial (the line others grep)
                      actors=[{"actor": a.id, "model": a.model, "busy": a.busy}
                              for a in sorted(actors.values(), key=lambda a: a.id) if a.model or a.busy])
    names = {t.key: t.name for t in trials}
    failed = tuple(FailedTrial(key=k, name=names.get(k, k), model=e.model, attempt=e.attempt, final=e.final,
                               error=e.error, traceback=e.traceback)
                   for k in keys if not store_state.is_done(k) and (e := store_state.failed.get(k)) is not None)
    return StudyProgress(summary=summary, eta=eta, runs=len(runs), latest_run=latest,
                         running=tuple(sorted(running, key=lambda r: (r.actor is None, r.actor or 0, r.key))),
                         failed=failed, state=store_state,
                         slice=None if chosen is None else Slice(only=runs[-1].only, selected=len(chosen),
                                                                 planned=len(keys)))


def _slice(run: RunStarted | None, keys: list[str]) -> list[str] | None:
    """The planned keys of the run's `--only` slice, in plan order; None when the run took the whole plan."""
    if run is None or run.selected is None:
        return None
    selected = {str(k) for k in run.selected}
    return [k for k in keys if k in selected]


@dataclass(frozen=True)
class DriverState:
    alive: bool
    pid: int | None = None
    host: str | None = None
    since: float | None = None  # unix time the driver took the directory
    stale_lock: bool = False  # a lock is left by a driver that is gone


@dataclass(frozen=True)
class StudyStatus:
    study: str
    directory: str
    as_of: float  # unix time the logs were read
    driver: DriverState
    progress: StudyProgress
    stage_medians: dict[str, dict[str, tuple[float, int]]] = field(default_factory=dict)
    cut_off: tuple[str, ...] = ()  # logs whose last line was cut off (ignored)
    unreadable: tuple[str, ...] = ()  # "file:line" of lines that are not JSON events

    @property
    def finished(self) -> bool:
        """The driver is gone and nothing runs: nothing will change until someone runs the study again."""
        return not self.driver.alive and not self.progress.running


def read_status(store: StudyStore, seeds: SeedSource | None = None, now: float | None = None) -> StudyStatus | None:
    """The study directory's status now; None when it holds no plan.json (not a study directory)."""
    plan = store.read_plan()
    if plan is None:
        return None
    reading: LogReading = store.read_events()
    now = time.time() if now is None else now
    holder = store.lock_holder()
    alive = store.holder_alive(holder) if holder else False
    driver = DriverState(alive=alive, pid=_int(holder.get("pid")) if holder else None,
                         host=holder.get("host") if holder else None,
                         since=_float(holder.get("since")) if holder else None,
                         stale_lock=bool(holder) and not alive)
    progress = summarize(plan, reading.events, alive, now=now, seeds=seeds(reading.events) if seeds else None)
    return StudyStatus(study=plan.study, directory=store.location.url, as_of=now, driver=driver, progress=progress,
                       stage_medians=stage_medians(reading.events), cut_off=tuple(reading.cut_off),
                       unreadable=tuple(reading.unreadable))


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _clock(when: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when or 0))


def _iso(when: float | None) -> str | None:
    return None if when is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


# -- text -------------------------------------------------------------------------------------------------
def describe_state(driver: DriverState) -> str:
    if driver.alive:
        return f"running: driver pid {driver.pid} on {driver.host} since {_clock(driver.since)}"
    return "stopped" + (" (a stale lock of a dead driver is left; the next run takes it over)"
                        if driver.stale_lock else "")


def describe_rate(m: ModelEta) -> str:
    if m.rate.seconds is None:
        return f"? s/trial (unknown{': ' + m.rate.note if m.rate.note else ''})"
    return f"{seconds_text(m.rate.seconds)} s/trial ({m.rate.describe()})"


def seconds_text(seconds: float) -> str:
    """1,234.5 or 0.0021: a tiny model's estimated trial takes milliseconds on a GPU."""
    return f"{seconds:,.1f}" if seconds >= 1 else f"{seconds:.2g}"


def format_model_eta(m: ModelEta, width: int = 0) -> str:
    w = m.work
    actors = f"{w.actors} actor{'' if w.actors == 1 else 's'}"
    return (f"{m.model:<{width}}  {w.done}/{w.total} done, {len(w.running)} running, {w.failed} failed, "
            f"{w.left} left  ETA {format_duration(m.eta_s)}  {describe_rate(m)}, {actors}")


def describe_slice(chosen: Slice) -> str:
    """The latest run's slice; the per-model rows and the ETA count its trials only."""
    what = f"slice --only {chosen.only}" if chosen.only is not None else "slice"
    return f"{what}: {chosen.selected} of {chosen.planned} trials"


def describe_study_eta(eta: StudyEta, alive: bool) -> str:
    if not alive:
        left = sum(m.work_s or 0.0 for m in eta.models)
        known = f"{format_duration(left)} of actor time left" if left else "nothing left"
        return f"no driver running: {known}" + (f" (besides {', '.join(eta.unknown)}: no rate)" if eta.unknown else "")
    if eta.eta_s is not None:
        return f"ETA {format_duration(eta.eta_s)} over {eta.actors} actor(s)"
    if eta.unknown:
        bound = f"at least {format_duration(eta.at_least_s)}; " if eta.at_least_s else ""
        return f"ETA ? ({bound}no rate yet for {', '.join(eta.unknown)})"
    return "ETA ? (no actor holds the models with work left)"


def format_status(status: StudyStatus, show_failures: bool = False) -> str:
    progress = status.progress
    lines = [f"study {status.study} in {status.directory}: {describe_state(status.driver)}; "
             f"{progress.runs} driver run(s)", format_summary(progress.summary)]
    if progress.slice is not None:
        lines.append(f"  {describe_slice(progress.slice)}")
    models = list(progress.eta.models)
    if models:
        lines.append(f"  {describe_study_eta(progress.eta, status.driver.alive)}; per model:")
        width = max(len(m.model) for m in models)
        lines += [f"    {format_model_eta(m, width)}" for m in models]
    if status.stage_medians:
        lines.append("  median seconds per finished trial, by stage:")
        for group, stages in sorted(status.stage_medians.items()):
            count = max(n for _, n in stages.values())
            parts = ", ".join(f"{stage} {seconds:.1f}" for stage, (seconds, _) in stages.items())
            lines.append(f"    {group} ({count}): {parts}")
    for r in progress.running:
        lines.append(f"  running {r.name}  attempt {r.attempt} on actor #{r.actor} ({r.host}) for "
                     f"{format_duration(r.seconds)}{' (loading the model)' if r.loading else ''}")
    for f in progress.failed:
        verdict = "gave up" if f.final else "retrying"
        lines.append(f"  failed  {f.name}  attempt {f.attempt} ({verdict}): {f.error}")
        if show_failures and f.traceback:
            lines.append("    " + f.traceback.rstrip().replace("\n", "\n    "))
    for name in status.cut_off:
        lines.append(f"  note: {name} ends in a cut-off line (a driver killed mid-write); that event is ignored")
    for where in status.unreadable:
        lines.append(f"  note: {where} is not a JSON event; ignored")
    return "\n".join(lines)


def not_a_study_directory(directory: str) -> str:
    return (f"error: {directory} is not a study directory (no plan.json); `sweep run STUDY --out {directory}` "
            "creates one")


def print_status(directory: str, show_failures: bool = False, out=sys.stdout, err=sys.stderr,
                 seeds: SeedSource | None = None) -> int:
    status = read_status(StudyStore(directory), seeds)
    if status is None:
        print(not_a_study_directory(directory), file=err)
        return 2  # ExitCode.INVALID (results/ imports only store/: tests/test_architecture.py)
    print(format_status(status, show_failures), file=out)
    return 0


# -- JSON -------------------------------------------------------------------------------------------------
def _seconds(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def model_json(m: ModelEta) -> dict[str, Any]:
    w = m.work
    return {"model": m.model, "pool": w.pool, "total": w.total, "done": w.done, "running": len(w.running),
            "failed": w.failed, "left": w.left, "actors": w.actors,
            "seconds_per_trial": _seconds(m.rate.seconds), "basis": m.rate.basis,
            "measured_trials": m.rate.samples, "note": m.rate.note or None,
            "work_s": _seconds(m.work_s), "eta_s": _seconds(m.eta_s)}


def status_json(status: StudyStatus, tracebacks: bool = False) -> dict[str, Any]:
    """The object `sweep status --json` prints: every key always present (null when unknown)."""
    progress, summary, eta, driver = status.progress, status.progress.summary, status.progress.eta, status.driver
    return {
        "schema": JSON_SCHEMA,
        "as_of": _iso(status.as_of),
        "as_of_unix": round(status.as_of, 3),
        "study": status.study,
        "directory": status.directory,
        "state": {"running": driver.alive, "finished": status.finished,
                  "driver": {"pid": driver.pid, "host": driver.host, "since": _iso(driver.since)}
                  if driver.alive else None,
                  "stale_lock": driver.stale_lock},
        "runs": {"count": progress.runs, "latest": progress.latest_run},
        "counts": {"total": summary.total, "done": summary.done, "running": summary.running,
                   "failed": summary.failed, "left": summary.left},
        "eta_s": _seconds(summary.eta_s),
        "eta": {"eta_s": _seconds(summary.eta_s), "at_least_s": _seconds(eta.at_least_s) if driver.alive else None,
                "actors": eta.actors, "unknown_models": list(eta.unknown)},
        "models": [model_json(m) for m in eta.models],
        "actors": [{"actor": a["actor"], "model": a["model"], "busy": a["busy"]} for a in summary.actors],
        "running": [{"name": r.name, "key": r.key, "model": r.model, "attempt": r.attempt, "actor": r.actor,
                     "host": r.host, "seconds": _seconds(r.seconds), "loading": r.loading}
                    for r in progress.running],
        "failed": [{"name": f.name, "key": f.key, "model": f.model, "attempt": f.attempt, "final": f.final,
                    "error": f.error, "traceback": f.traceback if tracebacks else None}
                   for f in progress.failed],
        "stage_medians": {group: {stage: {"median_s": _seconds(seconds), "trials": n}
                                  for stage, (seconds, n) in stages.items()}
                          for group, stages in sorted(status.stage_medians.items())},
        "notes": {"cut_off": list(status.cut_off), "unreadable": list(status.unreadable)},
        "slice": None if progress.slice is None else {"only": progress.slice.only,
                                                      "selected": progress.slice.selected},
    }

