"""`sweep status DIR`: the live summary, from the study directory alone (running or stopped)."""
from __future__ import annotations

import sys
import time

from sweep.results.progress import Summary, estimate_eta, format_duration, format_summary
from sweep.results.run_stats import stage_medians
from sweep.store.records import (
    ActorLost,
    ActorReleased,
    Event,
    PlanRecord,
    RunStarted,
    TrialAbandoned,
    TrialFailed,
    TrialFinished,
    TrialStarted,
)
from sweep.store.study_store import StudyStore, study_state


def summarize(plan: PlanRecord | None, events: list[Event], driver_alive: bool) -> tuple[Summary, dict]:
    """The summary of the latest plan, from events; `extra` holds the latest run's facts."""
    store_state = study_state(events)
    keys = [t.key for t in plan.trials] if plan is not None else []
    runs = [e for e in events if isinstance(e, RunStarted)]
    latest = runs[-1].run if runs else None
    live = [e for e in events if e.run == latest] if latest else []
    running: dict[str, TrialStarted] = {}
    actors: dict[int, dict] = {}
    durations = []
    for event in live:
        if isinstance(event, TrialStarted):
            running[event.key] = event
            actors[event.actor] = {"actor": event.actor, "model": event.model or None, "busy": True}
        elif isinstance(event, (TrialFinished, TrialFailed, TrialAbandoned)):
            running.pop(event.key, None)
            if event.actor in actors:
                actors[event.actor]["busy"] = False
            if isinstance(event, TrialFinished):
                durations.append(event.seconds)
        elif isinstance(event, (ActorReleased, ActorLost)):
            actors.pop(event.actor, None)
    if not driver_alive:
        running, actors = {}, {}
    done = sum(1 for k in keys if store_state.is_done(k))
    failed = sum(1 for k in keys if not store_state.is_done(k) and store_state.gave_up(k) and k not in running)
    in_flight = sum(1 for k in keys if k in running)
    left = len(keys) - done - failed - in_flight
    summary = Summary(total=len(keys), done=done, running=in_flight, failed=failed, left=left,
                      eta_s=estimate_eta(durations, left, in_flight, len(actors)) if driver_alive else None,
                      actors=sorted(actors.values(), key=lambda a: a["actor"]))
    extra = {"latest_run": latest, "runs": len(runs),
             "failed_keys": [k for k in keys if not store_state.is_done(k) and k in store_state.failed],
             "state": store_state, "running": running}
    return summary, extra


def print_status(directory: str, show_failures: bool = False, out=sys.stdout, err=sys.stderr) -> int:
    store = StudyStore(directory)
    plan = store.read_plan()
    if plan is None:
        print(f"error: {directory} is not a study directory (no plan.json); `sweep run STUDY --out {directory}` "
              "creates one", file=err)
        return 2
    reading = store.read_events()
    holder = store.lock_holder()
    alive = store.holder_alive(holder) if holder else False
    summary, extra = summarize(plan, reading.events, alive)
    if alive:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
        state = f"running: driver pid {holder.get('pid')} on {holder.get('host')} since {since}"
    else:
        state = "stopped" + (" (a stale lock of a dead driver is left; the next run takes it over)" if holder else "")
    print(f"study {plan.study} in {store.location.url}: {state}; {extra['runs']} driver run(s)", file=out)
    print(format_summary(summary), file=out)
    medians = stage_medians(reading.events)
    if medians:
        print("  median seconds per finished trial, by stage:", file=out)
        for group, stages in sorted(medians.items()):
            count = max(n for _, n in stages.values())
            parts = ", ".join(f"{stage} {seconds:.1f}" for stage, (seconds, _) in stages.items())
            print(f"    {group} ({count}): {parts}", file=out)
    for event in extra["running"].values():
        print(f"  running {event.name}  attempt {event.attempt} on actor #{event.actor} "
              f"({event.host}) for {format_duration(time.time() - (event.time or time.time()))}", file=out)
    names = {t.key: t.name for t in plan.trials}
    for key in extra["failed_keys"]:
        event = extra["state"].failed[key]
        verdict = "gave up" if event.final else "retrying"
        print(f"  failed  {names.get(key, key)}  attempt {event.attempt} ({verdict}): {event.error}", file=out)
        if show_failures and event.traceback:
            print("    " + event.traceback.rstrip().replace("\n", "\n    "), file=out)
    for name in reading.cut_off:
        print(f"  note: {name} ends in a cut-off line (a driver killed mid-write); that event is ignored", file=out)
    for where in reading.unreadable:
        print(f"  note: {where} is not a JSON event; ignored", file=out)
    return 0
