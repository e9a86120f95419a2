"""What the event logs say about how a study ran: trials, failures, worker and GPU hours, model loads,
library versions."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RunStats:
    driver_runs: int = 0
    trials_finished: int = 0
    attempts: int = 0
    attempts_failed: int = 0
    trials_gave_up: int = 0
    workers_lost: int = 0
    worker_hours: float = 0.0  # actor time spent in trials (finished and failed attempts)
    gpu_hours: float = 0.0  # the same, times the GPUs each actor held
    model_loads: int = 0
    load_hours: float = 0.0
    driver_versions: dict = field(default_factory=dict)  # of the latest driver run
    worker_versions: list[dict] = field(default_factory=list)  # each distinct set seen on workers
    git: list[str] = field(default_factory=list)  # revisions the runs were made with
    errors: dict[str, int] = field(default_factory=dict)  # first line of an error -> attempts


def run_stats(events: list[dict], current_keys: set[str] | None = None) -> RunStats:
    stats = RunStats()
    finished, gave_up = set(), set()
    for event in events:
        kind = event.get("event")
        if kind == "run_started":
            stats.driver_runs += 1
            stats.driver_versions = event.get("versions") or {}
            if event.get("git") and event["git"] not in stats.git:
                stats.git.append(event["git"])
        elif kind == "actor_started":
            versions = event.get("versions") or {}
            if versions and versions not in stats.worker_versions:
                stats.worker_versions.append(versions)
        elif kind == "started":
            stats.attempts += 1
        elif kind == "model_loaded":
            stats.model_loads += 1
            stats.load_hours += float(event.get("seconds") or 0) / 3600
        elif kind in ("finished", "failed"):
            hours = float(event.get("seconds") or 0) / 3600
            stats.worker_hours += hours
            stats.gpu_hours += hours * len(event.get("gpus") or [])
            key = event.get("key")
            if kind == "finished":
                finished.add(key)
                gave_up.discard(key)
            else:
                stats.attempts_failed += 1
                error = str(event.get("error") or "unknown").splitlines()[0][:200]
                stats.errors[error] = stats.errors.get(error, 0) + 1
                if event.get("final") and key not in finished:
                    gave_up.add(key)
        elif kind == "actor_lost":
            stats.workers_lost += 1
    if current_keys is not None:
        finished &= current_keys
        gave_up &= current_keys
    stats.trials_finished, stats.trials_gave_up = len(finished), len(gave_up)
    return stats


STAGES = ("calibration", "pruning", "perplexity", "tasks", "save_model", "restore")


def stage_medians(events: list[dict]) -> dict[str, dict[str, tuple[float, int]]]:
    """Per model and trial kind ("<model> dense" or "<model> <method>"): the median seconds of each stage
    of a finished trial (engine.trial timings), with how many trials it is over."""
    samples: dict[str, dict[str, list[float]]] = {}
    for event in events:
        if event.get("event") != "finished":
            continue
        timings = event.get("timings") if isinstance(event.get("timings"), dict) else {}
        if not timings:
            continue
        method = (event.get("pruning") or {}).get("method") or "dense"
        group = samples.setdefault(f"{event.get('model')} {method}", {})
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
