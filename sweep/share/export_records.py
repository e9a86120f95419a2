"""The translation behind `sweep export DIR --to wandb|mlflow` (pure: imports neither library): a study
directory's event log folded into typed records and tables, whichever tool receives them.

`read_export` / `build_export` fold plan.json and the event logs into typed records (the study's config, every
finished trial with its metrics and timings, the trials given up on, the progress series, the counts), and
`metrics_table`, `trials_table`, `failures_table`, `summary_values` and `progress_values` shape them for the
writers (sweep.share.to_wandb, sweep.share.to_mlflow), which import their library inside.

The event log is the truth: trials are folded with `study_state` (a trial finished twice counts once, with its
latest result; finished beats failed), so an export shows what `sweep status` and `sweep report` show.

A study directory is known to both tools by a hash of its location (`study_id`). See docs/dashboards.md.
"""
from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from sweep.store.records import (
    Event,
    PlannedTrial,
    PlanRecord,
    RunStarted,
    TrialFailed,
    TrialFinished,
    TrialStarted,
)
from sweep.store.study_store import StudyStore, forgotten_until, is_forgotten, study_state

# Bumped when what the writers put into a run changes: every run of an older export then differs in its digest
# and is replaced on the next export, instead of being kept with the old layout.
EXPORT_FORMAT = 1

EXTRAS = {"wandb": "wandb", "mlflow": "mlflow-skinny"}  # --to target -> the package its extra installs


class ExportError(RuntimeError):
    """Found before anything was sent (not a study directory, a library missing, no tracking URI): the
    message says what is wrong and how to fix it."""


class ExportFailed(RuntimeError):
    """The tool failed part-way through writing; exporting again replaces what this attempt left."""


# ---------------------------------------------------------------------------------------------------------------
# The records: what one export sends, whichever tool receives it.

@dataclass(frozen=True)
class TrialInfo:
    """What a trial is: its identity and the fields of the study grid it sits at."""

    key: str
    name: str
    model: str
    pruner: str
    sparsity: str
    calibration: str | None
    seed: int | None
    dense: bool
    current: bool  # in the latest plan.json; False for a trial of an earlier study version (an older suite)


@dataclass(frozen=True)
class MetricValue:
    language: str | None
    task: str
    metric: str
    value: float
    stderr: float | None = None


@dataclass(frozen=True)
class StageTime:
    stage: str
    seconds: float


@dataclass(frozen=True)
class FinishedTrial:
    trial: TrialInfo
    metrics: tuple[MetricValue, ...]
    timings: tuple[StageTime, ...]  # seconds per stage, as the worker measured them
    seconds: float  # the finishing attempt's wall time, seen by the driver
    attempts: int  # started events of this trial over every driver run
    finished_at: float  # unix time of the finished event
    run: str  # the driver run that logged it
    git: str | None


@dataclass(frozen=True)
class FailedTrial:
    """A trial given up on: its latest outcome is a final failure and it never finished."""

    trial: TrialInfo
    attempts: int
    error: str
    failed_at: float
    run: str

    @property
    def error_line(self) -> str:
        """The error's first non-empty line, short enough for a table cell."""
        line = next((part.strip() for part in self.error.splitlines() if part.strip()), "")
        return line if len(line) <= 300 else line[:297] + "..."


@dataclass(frozen=True)
class ProgressPoint:
    """The study's state right after one trial outcome (a finished or failed event)."""

    step: int  # the event's position in the study's log (all driver runs merged by time): stable as logs grow
    time: float  # unix time of the event
    hours: float  # since the log's first event
    done: int  # distinct trials finished so far (outcomes `sweep forget` forgot left out)
    failed: int  # distinct trials given up on so far, and not finished since (the same)
    attempts: int  # started events so far
    failed_attempts: int  # failed events so far, retried ones included


@dataclass(frozen=True)
class StudyConfig:
    """The study's facts, as a dashboard's run config shows them."""

    study: str
    study_dir: str  # the directory's location (absolute path or URL): the export's identity
    languages: tuple[str, ...]  # evaluation (target) languages
    calibration_languages: tuple[str, ...]
    trials: int  # planned, in the latest plan
    models: tuple[str, ...]
    pruners: tuple[str, ...]
    git: str | None  # the latest driver run's revision
    git_revisions: tuple[str, ...]  # every revision a driver ran, first to last
    versions: dict[str, str] = field(default_factory=dict)  # the latest driver run's library versions
    driver_runs: int = 0


@dataclass(frozen=True)
class StudySummary:
    """Counts over the latest plan's trials (as `sweep status` counts), and over the whole log."""

    planned: int
    done: int
    failed: int
    left: int
    exported: int  # finished trials exported, earlier study versions' included
    attempts: int
    failed_attempts: int
    trial_hours: float  # driver-seen hours of the finishing attempts


@dataclass(frozen=True)
class StudyExport:
    study_id: str
    config: StudyConfig
    summary: StudySummary
    trials: tuple[FinishedTrial, ...]
    failures: tuple[FailedTrial, ...]
    progress: tuple[ProgressPoint, ...]
    started_at: float  # the log's first and last event times
    ended_at: float
    warnings: tuple[str, ...] = ()


def study_id(location: str) -> str:
    """A study directory's identity in the dashboards: a hash of its location, so any name is safe in a tag
    filter or a run id. The same directory under another path or URL is another study to the tools."""
    return hashlib.sha256(location.encode("utf-8")).hexdigest()[:16]


def read_export(directory: str) -> StudyExport:
    """The export of a study directory (a folder or an fsspec URL) as its logs are now. Sends nothing."""
    try:
        store = StudyStore(directory)
        plan = store.read_plan()
        reading = store.read_events() if plan is not None else None
    except ImportError as err:  # an s3:// or gs:// directory without the cloud extra
        raise ExportError(f"{directory}: cannot read it ({err}); pip install 'calibration-sweep[cloud]'") from err
    except (ValueError, OSError) as err:
        raise ExportError(f"{directory}: unreadable: {err}") from err
    if plan is None or reading is None:
        raise ExportError(f"{directory} is not a study directory (no plan.json); `sweep run STUDY --out {directory}` "
                          "makes one")
    warnings = [f"{name}: its last line was cut off (a driver died mid-write); that event is left out"
                for name in reading.cut_off]
    if reading.unreadable:
        warnings.append(f"{len(reading.unreadable)} unreadable event line(s) left out: "
                        + ", ".join(reading.unreadable[:5]))
    return build_export(plan, reading.events, store.location.url, warnings)


def build_export(plan: PlanRecord, events: Sequence[Event], location: str, warnings: Sequence[str] = ()) -> StudyExport:
    """Folds plan.json and the events (in log order, as `StudyStore.read_events` returns them) into the export."""
    state = study_state(events)
    planned = {t.key: t for t in plan.trials}

    trials = tuple(sorted((_finished(event, planned, state.attempts.get(key, 0))
                           for key, event in state.finished.items()), key=lambda t: (t.trial.name, t.trial.key)))
    failures = tuple(sorted((_failed(event, planned, state.attempts.get(key, 0))
                             for key, event in state.failed.items() if state.gave_up(key)),
                            key=lambda f: (f.trial.name, f.trial.key)))

    runs = [e for e in events if isinstance(e, RunStarted)]
    revisions: list[str] = []
    for run in runs:
        if run.git and run.git not in revisions:
            revisions.append(run.git)
    latest = runs[-1] if runs else None
    config = StudyConfig(
        study=plan.study, study_dir=location, languages=tuple(plan.languages),
        calibration_languages=tuple(plan.calibration_languages), trials=len(plan.trials),
        models=_unique(t.model for t in plan.trials), pruners=_unique(t.pruner for t in plan.trials),
        git=latest.git if latest else None, git_revisions=tuple(revisions),
        versions={str(k): str(v) for k, v in (latest.versions if latest else {}).items()}, driver_runs=len(runs))

    progress = _progress(events)
    done = sum(1 for k in planned if state.is_done(k))
    failed = sum(1 for k in planned if not state.is_done(k) and state.gave_up(k))
    summary = StudySummary(
        planned=len(planned), done=done, failed=failed, left=len(planned) - done - failed, exported=len(trials),
        attempts=sum(state.attempts.values()), failed_attempts=sum(1 for e in events if isinstance(e, TrialFailed)),
        trial_hours=sum(t.seconds for t in trials) / 3600.0)

    notes = list(warnings)
    if not trials:
        notes.append("no trial has finished yet: only the config, the failures and the progress are exported")
    times = [e.time for e in events if e.time]
    return StudyExport(study_id=study_id(location), config=config, summary=summary, trials=trials,
                       failures=failures, progress=progress, started_at=min(times, default=plan.written),
                       ended_at=max(times, default=plan.written), warnings=tuple(notes))


def _unique(values) -> tuple[str, ...]:
    return tuple(dict.fromkeys(v for v in values if v))


def _trial_info(event: TrialFinished | TrialFailed, planned: dict[str, PlannedTrial]) -> TrialInfo:
    # The driver stamps each event with the trial's fields; logs from before it did fall back to plan.json
    fields = event.trial or (planned[event.key].fields if event.key in planned else None)
    plan_name = planned[event.key].name if event.key in planned else ""
    return TrialInfo(
        key=event.key, name=event.name or plan_name or event.key,
        model=(fields.model if fields else "") or event.model, pruner=fields.pruner if fields else "",
        sparsity=fields.sparsity if fields else "", calibration=fields.calibration if fields else None,
        seed=fields.seed if fields else None, dense=fields.dense if fields else False,
        current=event.key in planned)


def _finished(event: TrialFinished, planned: dict[str, PlannedTrial], attempts: int) -> FinishedTrial:
    metrics = []
    for raw in event.metrics:
        value = raw.get("value") if isinstance(raw, dict) else None
        if not _is_number(value):
            continue  # a missing or non-numeric value has nothing to plot
        stderr = raw.get("stderr")
        metrics.append(MetricValue(
            language=str(raw["language"]) if raw.get("language") is not None else None,
            task=str(raw.get("task") or ""), metric=str(raw.get("metric") or ""), value=float(value),
            stderr=float(stderr) if _is_number(stderr) else None))
    timings = tuple(StageTime(str(stage), float(seconds)) for stage, seconds in (event.timings or {}).items()
                    if _is_number(seconds))
    return FinishedTrial(trial=_trial_info(event, planned), metrics=tuple(metrics), timings=timings,
                         seconds=float(event.seconds or 0.0), attempts=max(attempts, 1), finished_at=event.time,
                         run=event.run, git=event.git)


def _failed(event: TrialFailed, planned: dict[str, PlannedTrial], attempts: int) -> FailedTrial:
    return FailedTrial(trial=_trial_info(event, planned), attempts=max(attempts, 1), error=event.error or "",
                       failed_at=event.time, run=event.run)


def _progress(events: Sequence[Event]) -> tuple[ProgressPoint, ...]:
    """One point per finished or failed event. Its done and failed counts fold the events as `study_state`
    does, so the series ends at the summary's counts: outcomes `sweep forget` forgot never count (wherever
    the forget event falls in the logs, as the forget names a time, not a position); the attempts count
    every event, as `StudySummary.attempts` and `failed_attempts` do."""
    until = forgotten_until(events)
    finished: set[str] = set()
    gave_up: set[str] = set()
    attempts = failed_attempts = 0
    first = next((e.time for e in events if e.time), 0.0)
    points = []
    for step, event in enumerate(events):
        if isinstance(event, TrialStarted):
            attempts += 1
            continue
        if isinstance(event, TrialFinished) and event.key:
            if not is_forgotten(event, until):
                finished.add(event.key)
                gave_up.discard(event.key)
        elif isinstance(event, TrialFailed) and event.key:
            failed_attempts += 1
            if event.key not in finished and not is_forgotten(event, until):  # finished beats failed
                if event.final:
                    gave_up.add(event.key)
                else:
                    gave_up.discard(event.key)
        else:
            continue
        points.append(ProgressPoint(step=step, time=event.time, hours=max(event.time - first, 0.0) / 3600.0,
                                    done=len(finished), failed=len(gave_up), attempts=attempts,
                                    failed_attempts=failed_attempts))
    return tuple(points)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN


# ---------------------------------------------------------------------------------------------------------------
# Tables (W&B shows each as a sortable, filterable panel) and the counts.

@dataclass(frozen=True)
class Table:
    columns: tuple[str, ...]
    rows: tuple[tuple[object, ...], ...]


TRIAL_COLUMNS = ("key", "name", "model", "pruner", "sparsity", "calibration", "seed", "dense", "current")


def _trial_cells(trial: TrialInfo) -> tuple[object, ...]:
    return (trial.key, trial.name, trial.model, trial.pruner, trial.sparsity, trial.calibration, trial.seed,
            trial.dense, trial.current)


def _iso(unix: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix)) if unix else ""


def metrics_table(export: StudyExport) -> Table:
    """One row per finished trial x (language, task, metric): the long form every filter and group-by wants."""
    rows = tuple(_trial_cells(t.trial) + (m.language, m.task, m.metric, m.value, m.stderr)
                 for t in export.trials for m in t.metrics)
    return Table(TRIAL_COLUMNS + ("language", "task", "metric", "value", "stderr"), rows)


def trials_table(export: StudyExport) -> Table:
    """One row per finished trial: attempts, wall time and seconds per stage (a column per stage seen)."""
    stages = list(dict.fromkeys(s.stage for t in export.trials for s in t.timings))
    rows = []
    for t in export.trials:
        per_stage = {s.stage: s.seconds for s in t.timings}
        rows.append(_trial_cells(t.trial) + (t.attempts, t.seconds, _iso(t.finished_at), t.run, t.git)
                    + tuple(per_stage.get(stage) for stage in stages))
    columns = TRIAL_COLUMNS + ("attempts", "seconds", "finished_at", "driver_run", "git")
    return Table(columns + tuple(f"time/{stage}" for stage in stages), tuple(rows))


def failures_table(export: StudyExport) -> Table:
    rows = tuple(_trial_cells(f.trial) + (f.attempts, f.error_line, _iso(f.failed_at), f.run)
                 for f in export.failures)
    return Table(TRIAL_COLUMNS + ("attempts", "error", "failed_at", "driver_run"), rows)


def summary_values(export: StudyExport) -> dict[str, float]:
    """The counts under the names both tools show them by (a W&B summary, the MLflow study run's metrics)."""
    return {f"trials/{name}": value for name, value in asdict(export.summary).items()}


def progress_values(point: ProgressPoint) -> dict[str, float]:
    values = asdict(point)
    del values["step"], values["time"]  # they are the series' axes: the step, and the timestamp in MLflow
    return {f"progress/{name}": value for name, value in values.items()}


def missing_library(target: str, err: ImportError) -> ExportError:
    """The error for `--to TARGET` when its optional library is not installed: which extra installs it."""
    return ExportError(f"--to {target}: {EXTRAS[target]} is not installed ({err}); "
                       f"pip install 'calibration-sweep[{target}]'")
