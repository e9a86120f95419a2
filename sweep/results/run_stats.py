"""What the event logs say about how a study ran: trials, failures, worker and GPU hours, model loads,
library versions."""
from __future__ import annotations

from dataclasses import dataclass, field

from sweep.store.records import (
    ActorLost,
    ActorStarted,
    Event,
    ModelLoaded,
    RunStarted,
    TrialFailed,
    TrialFinished,
    TrialsForgotten,
    TrialStarted,
)
from sweep.store.study_store import forgotten_until, is_forgotten


@dataclass
class RunStats:
    driver_runs: int = 0
    trials_finished: int = 0
    attempts: int = 0
    attempts_failed: int = 0
    trials_gave_up: int = 0
    trials_forgotten: int = 0  # named by `sweep forget` (each time)
    workers_lost: int = 0
    worker_hours: float = 0.0  # actor time spent in trials (finished and failed attempts)
    gpu_hours: float = 0.0  # the same, times the GPUs each actor held
    model_loads: int = 0
    load_hours: float = 0.0
    driver_versions: dict = field(default_factory=dict)  # of the latest driver run
    worker_versions: list[dict] = field(default_factory=list)  # each distinct set seen on workers
    git: list[str] = field(default_factory=list)  # revisions the runs were made with
    errors: dict[str, int] = field(default_factory=dict)  # first line of an error -> attempts


def run_stats(events: list[Event], current_keys: set[str] | None = None) -> RunStats:
    stats = RunStats()
    finished, gave_up = set(), set()
    until = forgotten_until(events)
    for event in events:
        if isinstance(event, RunStarted):
            stats.driver_runs += 1
            stats.driver_versions = event.versions or {}
            if event.git and event.git not in stats.git:
                stats.git.append(event.git)
        elif isinstance(event, ActorStarted):
            if event.versions and event.versions not in stats.worker_versions:
                stats.worker_versions.append(event.versions)
        elif isinstance(event, TrialStarted):
            stats.attempts += 1
        elif isinstance(event, ModelLoaded):
            stats.model_loads += 1
            stats.load_hours += float(event.seconds or 0) / 3600
        elif isinstance(event, (TrialFinished, TrialFailed)):
            hours = float(event.seconds or 0) / 3600
            stats.worker_hours += hours
            stats.gpu_hours += hours * len(event.gpus or [])
            counts = not is_forgotten(event, until)  # its compute was spent either way
            if isinstance(event, TrialFinished):
                if counts:
                    finished.add(event.key)
                    gave_up.discard(event.key)
            else:
                stats.attempts_failed += 1
                error = str(event.error or "unknown").splitlines()[0][:200]
                stats.errors[error] = stats.errors.get(error, 0) + 1
                if event.final and event.key not in finished and counts:
                    gave_up.add(event.key)
        elif isinstance(event, ActorLost):
            stats.workers_lost += 1
        elif isinstance(event, TrialsForgotten):
            stats.trials_forgotten += len(event.keys)
    if current_keys is not None:
        finished &= current_keys
        gave_up &= current_keys
    stats.trials_finished, stats.trials_gave_up = len(finished), len(gave_up)
    return stats


STAGES = ("calibration", "pruning", "perplexity", "tasks", "save_model", "restore")


def stage_medians(events: list[Event]) -> dict[str, dict[str, tuple[float, int]]]:
    """Per model and trial kind ("<model> dense" or "<model> <method>"): the median seconds of each stage
    of a finished trial (engine.trial timings), with how many trials it is over."""
    samples: dict[str, dict[str, list[float]]] = {}
    for event in events:
        if not isinstance(event, TrialFinished) or not isinstance(event.timings, dict) or not event.timings:
            continue
        timings = event.timings
        method = (event.pruning or {}).get("method") or "dense"
        group = samples.setdefault(f"{event.model or None} {method}", {})
        for stage, seconds in timings.items():
            if isinstance(seconds, (int, float)):
                group.setdefault(stage, []).append(float(seconds))
    out = {}
    for group, stages in samples.items():
        if not stages:
            continue
        out[group] = {stage: (sorted(values)[len(values) // 2], len(values))
                      for stage, values in sorted(stages.items(), key=lambda kv: _stage_order(kv[0]))}
    return out


def _stage_order(stage: str) -> int:
    return STAGES.index(stage) if stage in STAGES else len(STAGES)
