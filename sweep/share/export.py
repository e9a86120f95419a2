"""`sweep export DIR --to wandb|mlflow`: a study directory's event log replayed into the dashboards researchers use.

Two halves, kept apart so the first can be tested without either library:

- the translation (pure): `read_export` / `build_export` fold plan.json and the event logs into typed records
  (the study's config, every finished trial with its metrics and timings, the trials given up on, the progress
  series, the counts), and `metrics_table`, `trials_table`, `failures_table`, `mlflow_*` and `wandb_run_id`
  shape them the way each tool shows them well;
- two thin writers, `write_wandb` and `write_mlflow`, which import their library inside (both are optional
  extras, and importing mlflow alone takes about 2 s).

The event log is the truth: trials are folded with `study_state` (a trial finished twice counts once, with its
latest result; finished beats failed), so an export shows what `sweep status` and `sweep report` show.

Idempotence. A study directory is known to both tools by a hash of its location (`study_id`). W&B gets one run
whose id derives from it, resumed on each export. MLflow runs carry `sweep.study_id` and `sweep.trial_key` tags
and a digest of what they hold: a re-export keeps a run whose digest is unchanged and replaces (deletes, then
creates) one whose content changed, because MLflow can neither change a logged param nor rewrite a metric's
history. See docs/dashboards.md.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import posixpath
import re
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
from sweep.store.study_store import StudyStore, study_state

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
    done: int  # distinct trials finished so far
    failed: int  # distinct trials given up on so far, and not finished since
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
            finished.add(event.key)
            gave_up.discard(event.key)
        elif isinstance(event, TrialFailed) and event.key:
            failed_attempts += 1
            if event.key not in finished:  # finished beats failed, as in study_state
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


# ---------------------------------------------------------------------------------------------------------------
# Names each tool accepts.

def wandb_run_id(export: StudyExport) -> str:
    """A W&B run id fixed by the study directory, readable in URLs: '<study>-<study_id>'. W&B refuses ':;,#?/\\''
    in ids; the slug keeps lowercase letters, digits and dashes."""
    slug = re.sub(r"[^a-z0-9]+", "-", export.config.study.lower()).strip("-")[:40] or "study"
    return f"{slug}-{export.study_id}"


_MLFLOW_UNSAFE = re.compile(r"[^A-Za-z0-9_.\- ]")  # MLflow's rule, without the colon Windows refuses
MLFLOW_KEY_LIMIT = 250


def mlflow_segment(text: str) -> str:
    """One part of an MLflow metric or param name: unsafe characters become '_'; an empty part, '.' or '..'
    would make the name resolve to another path (MLflow refuses those), so they become '_' too."""
    clean = _MLFLOW_UNSAFE.sub("_", text).strip()
    return "_" if clean in ("", ".", "..") else clean


def mlflow_keys(wanted: Sequence[tuple[tuple[str, ...], float]]) -> dict[str, float]:
    """MLflow metric names for one run, from their parts: each part made safe, joined by '/', unique, within
    MLflow's length limit, and never both a name and the folder of another name (the file store keeps each
    metric as a file under its name, so 'a/b' and 'a/b/c' cannot coexist). A name that would clash, or is too
    long, is flattened to one part ('/' -> '_') ending in a short hash of its original parts."""
    out: dict[str, float] = {}
    folders: set[str] = set()

    def clashes(key: str) -> bool:
        parts = key.split("/")
        return key in out or key in folders or any("/".join(parts[:i]) in out for i in range(1, len(parts)))

    for parts, value in wanted:
        key = "/".join(mlflow_segment(p) for p in parts)
        if len(key) > MLFLOW_KEY_LIMIT or clashes(key):
            tag = hashlib.sha1("\0".join(parts).encode("utf-8")).hexdigest()
            base = key.replace("/", "_")[: MLFLOW_KEY_LIMIT - 9].rstrip(" ")
            for extra in range(0, 40, 8):
                key = f"{base}_{tag[extra:extra + 8]}"
                if not clashes(key):
                    break
            else:
                raise ValueError(f"no unique MLflow name for {parts!r}")
        if posixpath.normpath(key) != key:  # cannot happen with safe parts; MLflow would refuse it
            raise ValueError(f"MLflow name {key!r} resolves to another path")
        out[key] = value
        segments = key.split("/")
        folders.update("/".join(segments[:i]) for i in range(1, len(segments)))
    return out


def mlflow_trial_metrics(trial: FinishedTrial) -> dict[str, float]:
    """'<language>/<task>/<metric>' (and '..._stderr'), 'time/<stage>', 'seconds', 'attempts'."""
    wanted: list[tuple[tuple[str, ...], float]] = []
    for m in trial.metrics:
        where = (m.language or "all", m.task or "_")
        wanted.append((where + (m.metric,), m.value))
        if m.stderr is not None:
            wanted.append((where + (f"{m.metric}_stderr",), m.stderr))
    wanted += [(("time", s.stage), s.seconds) for s in trial.timings]
    wanted += [(("seconds",), trial.seconds), (("attempts",), float(trial.attempts))]
    return mlflow_keys(wanted)


def mlflow_trial_params(trial: TrialInfo) -> dict[str, str]:
    """The trial's fields as MLflow params (strings); an absent calibration or seed (a dense baseline) is left
    out rather than written as 'None'."""
    params = {"key": trial.key, "name": trial.name, "model": trial.model, "pruner": trial.pruner,
              "sparsity": trial.sparsity, "dense": str(trial.dense).lower(), "current": str(trial.current).lower()}
    if trial.calibration is not None:
        params["calibration"] = trial.calibration
    if trial.seed is not None:
        params["seed"] = str(trial.seed)
    return params


def mlflow_study_params(config: StudyConfig) -> dict[str, str]:
    """The config flattened to MLflow params: lists comma-joined, versions as 'versions.<library>'."""
    params = {"study": config.study, "study_dir": config.study_dir, "languages": ",".join(config.languages),
              "calibration_languages": ",".join(config.calibration_languages), "trials": str(config.trials),
              "models": ",".join(config.models), "pruners": ",".join(config.pruners), "git": config.git or "",
              "git_revisions": ",".join(config.git_revisions), "driver_runs": str(config.driver_runs)}
    for library, version in sorted(config.versions.items()):
        params[f"versions.{mlflow_segment(library)}"] = version
    return {k: v for k, v in params.items() if v != ""}


def study_note(export: StudyExport, limit: int = 8000) -> str:
    """The MLflow study run's description (markdown): the counts, and each trial given up on with its error."""
    s = export.summary
    lines = [f"Study **{export.config.study}** exported from `{export.config.study_dir}`: {s.done}/{s.planned} "
             f"trials done, {s.failed} failed, {s.left} left ({s.exported} finished trial runs)."]
    if export.failures:
        lines += ["", "Failed trials (retries used up):"]
        lines += [f"- `{f.trial.name}` ({f.trial.key}), {f.attempts} attempt(s): {f.error_line}" for f in export.failures]
    text = "\n".join(lines)
    return text if len(text) <= limit else text[: limit - 20] + "\n- ... (cut)"


def _digest(*parts: object) -> str:
    """What a run holds, hashed: an MLflow run with the same digest is left as it is on re-export."""
    return hashlib.sha256(json.dumps([EXPORT_FORMAT, *parts], sort_keys=True, default=str).encode()).hexdigest()[:20]


# ---------------------------------------------------------------------------------------------------------------
# The writers. Each imports its library here: both are optional extras and slow to import.

def _missing(target: str, err: ImportError) -> ExportError:
    return ExportError(f"--to {target}: {EXTRAS[target]} is not installed ({err}); "
                       f"pip install 'calibration-sweep[{target}]'")


def require_wandb():
    try:
        import wandb
    except ImportError as err:
        raise _missing("wandb", err) from err
    return wandb


def require_mlflow():
    try:
        import mlflow
    except ImportError as err:
        raise _missing("mlflow", err) from err
    return mlflow


@dataclass(frozen=True)
class WandbTarget:
    project: str
    entity: str | None
    run_name: str
    run_id: str | None = None  # default: wandb_run_id (W&B never reuses the id of a run deleted in its UI)


@dataclass(frozen=True)
class WandbOutcome:
    run_id: str
    url: str | None  # None when offline
    local_dir: str  # the run's folder under WANDB_DIR (what `wandb sync` uploads when offline)
    offline: bool


def wandb_config(export: StudyExport) -> dict[str, object]:
    config = asdict(export.config)
    config.update(study_id=export.study_id, export_format=EXPORT_FORMAT)
    return config


def write_wandb(export: StudyExport, target: WandbTarget) -> WandbOutcome:
    """One W&B run per study, resumed on each export: config, the progress series (step = event position),
    the metrics / trials / failures tables and the counts in the summary. Honours WANDB_MODE and WANDB_DIR."""
    wandb = require_wandb()
    settings = wandb.Settings(
        console="off",  # the exporter's own output is not the study's
        x_disable_stats=True,  # nor are this machine's CPU and memory while exporting
        save_code=False, disable_git=True, disable_job_creation=True)
    try:
        run = wandb.init(project=target.project, entity=target.entity, id=target.run_id or wandb_run_id(export),
                         resume="allow",
                         name=target.run_name, job_type="sweep-export", settings=settings)
    except wandb.Error as err:  # not logged in, a bad project name, no server: nothing was sent
        raise ExportError(f"--to wandb: could not start the run: {err} (if not logged in: `wandb login`, or "
                          "WANDB_MODE=offline to write it locally and `wandb sync` it later)") from err
    try:
        # A resumed run's config holds the previous export's values: replacing them is the point
        run.config.update(wandb_config(export), allow_val_change=True)
        # An online resume starts after the steps the last export logged. The log only grows at its end, so
        # those steps are the same points; W&B would drop them with a warning each, so they are skipped here.
        first = run.step
        for point in export.progress:
            if point.step >= first:
                run.log(progress_values(point), step=point.step)
        tables = {"tables/metrics": metrics_table(export), "tables/trials": trials_table(export),
                  "tables/failures": failures_table(export)}
        run.log({key: wandb.Table(columns=list(t.columns), data=[list(r) for r in t.rows])
                 for key, t in tables.items()})
        run.summary.update(summary_values(export))
        outcome = WandbOutcome(run_id=run.id, url=run.url, local_dir=str(run.dir).removesuffix("/files"),
                               offline=bool(run.offline))
    except Exception as err:
        run.finish(exit_code=1)
        raise ExportFailed(f"--to wandb: the export stopped part-way: {err}; export again to complete it") from err
    run.finish()
    return outcome


@dataclass(frozen=True)
class MlflowTarget:
    tracking_uri: str
    experiment: str
    run_name: str


@dataclass(frozen=True)
class MlflowOutcome:
    experiment_id: str
    parent_run_id: str
    created: int  # runs created by this export
    kept: int  # runs an earlier export wrote that still hold the same (digest unchanged)
    deleted: int  # runs replaced, or of trials the log no longer holds as finished or failed


# Tags every run of an export carries: what finds it again, and what it is.
TAG_STUDY_ID = "sweep.study_id"
TAG_STUDY_DIR = "sweep.study_dir"
TAG_ROLE = "sweep.role"  # "study" (the parent) or "trial"
TAG_TRIAL_KEY = "sweep.trial_key"
TAG_OUTCOME = "sweep.outcome"  # "finished" or "failed"
TAG_DIGEST = "sweep.export_digest"
TAG_PARENT = "mlflow.parentRunId"  # MLflow's own: nests a run under another in its UI
TAG_NOTE = "mlflow.note.content"  # MLflow's own: a run's description
_DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")  # MLflow's SQLAlchemy stores


def open_mlflow(tracking_uri: str):
    """An MlflowClient on the tracking URI, its store opened (so a store this install cannot serve is refused
    here, before anything is sent)."""
    mlflow = require_mlflow()
    from mlflow.exceptions import MlflowException

    scheme = tracking_uri.split(":", 1)[0].split("+", 1)[0].lower()
    missing = [m for m in ("sqlalchemy", "alembic") if importlib.util.find_spec(m) is None]
    if scheme in _DATABASE_SCHEMES and missing:
        # mlflow-skinny leaves out what its database stores need, and its own error then blames the model registry
        raise ExportError(f"--tracking-uri {tracking_uri}: a database store needs {' and '.join(missing)}, which "
                          f"mlflow-skinny does not install: pip install {' '.join(missing)}; or use a tracking "
                          "server (http(s)://...) or a file store (file:DIR with MLFLOW_ALLOW_FILE_STORE=true)")
    try:
        return mlflow.MlflowClient(tracking_uri=tracking_uri)
    except MlflowException as err:
        raise ExportError(f"--tracking-uri {tracking_uri}: {err.message}") from err


def write_mlflow(client, export: StudyExport, target: MlflowTarget) -> MlflowOutcome:
    """One parent run per study (params = the config, metrics = the progress series and the counts, the
    failures in its description) and one nested run per trial: FINISHED with params = the trial's fields and
    metrics = its values, or FAILED with its error for a trial given up on. Runs of an earlier export of the
    same directory are found by their tags and kept when unchanged, else replaced."""
    from mlflow.entities import Metric, Param, ViewType
    from mlflow.exceptions import MlflowException

    def ms(unix: float) -> int:
        return int(round(unix * 1000))

    # Reads first: an unreachable server or a deleted experiment is refused before anything is written
    try:
        experiment = client.get_experiment_by_name(target.experiment)
        if experiment is not None and experiment.lifecycle_stage != "active":
            raise ExportError(f"MLflow experiment {target.experiment!r} is deleted; restore it "
                              "(`mlflow experiments restore`) or choose another with --experiment")
        existing = [] if experiment is None else _search_runs(client, experiment.experiment_id, export.study_id,
                                                             ViewType.ACTIVE_ONLY)
    except MlflowException as err:
        raise ExportError(f"--tracking-uri {target.tracking_uri}: {err.message}") from err

    base_tags = {TAG_STUDY_ID: export.study_id, TAG_STUDY_DIR: export.config.study_dir}
    params = mlflow_study_params(export.config)
    series = [Metric(key, float(value), ms(p.time), p.step)
              for p in export.progress for key, value in progress_values(p).items()]
    counts = [Metric(key, float(value), ms(export.ended_at), 0) for key, value in summary_values(export).items()]
    note = study_note(export)
    parent_digest = _digest(params, [asdict(p) for p in export.progress], asdict(export.summary), note,
                            target.run_name)

    created = kept = 0
    to_delete: list[str] = []
    try:
        experiment_id = experiment.experiment_id if experiment is not None else \
            client.create_experiment(target.experiment)

        parents = [r for r in existing if r.data.tags.get(TAG_ROLE) == "study"]
        parent = next((r for r in parents if r.data.tags.get(TAG_DIGEST) == parent_digest), None)
        to_delete += [r.info.run_id for r in parents if r is not parent]
        if parent is not None:
            parent_id = parent.info.run_id
            kept += 1
        else:
            tags = {**base_tags, TAG_ROLE: "study", TAG_DIGEST: parent_digest, TAG_NOTE: note}
            parent_id = client.create_run(experiment_id, start_time=ms(export.started_at), tags=tags,
                                          run_name=target.run_name).info.run_id
            client.log_batch(parent_id, metrics=series + counts, params=[Param(k, v) for k, v in params.items()])
            client.set_terminated(parent_id, status="FINISHED", end_time=ms(export.ended_at))
            created += 1

        wanted = {run.key: run for run in _trial_runs(export)}

        have: set[str] = set()
        for run in existing:
            if run.data.tags.get(TAG_ROLE) != "trial":
                continue
            key = run.data.tags.get(TAG_TRIAL_KEY, "")
            if key in wanted and key not in have and run.data.tags.get(TAG_DIGEST) == wanted[key].digest:
                have.add(key)
                kept += 1
                if run.data.tags.get(TAG_PARENT) != parent_id:  # the study run was replaced: nest under the new one
                    client.set_tag(run.info.run_id, TAG_PARENT, parent_id)
            else:  # changed, a duplicate, or no longer finished or failed in the log
                to_delete.append(run.info.run_id)

        for key, trial_run in wanted.items():
            if key in have:
                continue
            tags = {**base_tags, **{k: v for k, v in trial_run.tags.items() if v}, TAG_ROLE: "trial",
                    TAG_TRIAL_KEY: key, TAG_DIGEST: trial_run.digest, TAG_PARENT: parent_id}
            run_id = client.create_run(experiment_id, start_time=ms(trial_run.start), tags=tags,
                                       run_name=trial_run.params["name"]).info.run_id
            client.log_batch(run_id, metrics=[Metric(k, v, ms(trial_run.end), 0) for k, v in trial_run.metrics.items()],
                             params=[Param(k, v) for k, v in trial_run.params.items()])
            client.set_terminated(run_id, status=trial_run.status, end_time=ms(trial_run.end))
            created += 1

        # Last, so an export that stops part-way leaves the old runs beside the new (the next one tidies up)
        for run_id in to_delete:
            client.delete_run(run_id)
    except MlflowException as err:
        raise ExportFailed(f"--to mlflow: the export stopped part-way: {err.message}; export again to complete it "
                           "(unchanged runs are kept, the rest replaced)") from err
    return MlflowOutcome(experiment_id=experiment_id, parent_run_id=parent_id, created=created, kept=kept,
                         deleted=len(to_delete))


@dataclass(frozen=True)
class _TrialRun:
    """What one trial's MLflow run holds, and its digest."""

    key: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    status: str  # FINISHED, or FAILED for a trial given up on
    start: float
    end: float
    digest: str


def _trial_runs(export: StudyExport) -> list[_TrialRun]:
    runs = []
    for t in export.trials:
        params, metrics = mlflow_trial_params(t.trial), mlflow_trial_metrics(t)
        tags = {TAG_OUTCOME: "finished", "sweep.driver_run": t.run, "sweep.git": t.git or ""}
        runs.append(_TrialRun(t.trial.key, params, metrics, tags, "FINISHED", t.finished_at - t.seconds,
                              t.finished_at, _digest(params, metrics, tags, t.finished_at)))
    for f in export.failures:
        params, metrics = mlflow_trial_params(f.trial), {"attempts": float(f.attempts)}
        tags = {TAG_OUTCOME: "failed", "sweep.driver_run": f.run, "sweep.error": f.error[:5000]}
        runs.append(_TrialRun(f.trial.key, params, metrics, tags, "FAILED", f.failed_at, f.failed_at,
                              _digest(params, metrics, tags, f.failed_at)))
    return runs


def _search_runs(client, experiment_id: str, sid: str, view_type) -> list:
    """Every run of this study directory in the experiment (a study id is hex: safe in a filter string)."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=f"tags.`{TAG_STUDY_ID}` = '{sid}'",
                                  run_view_type=view_type, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs
