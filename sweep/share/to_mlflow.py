"""The MLflow writer of `sweep export DIR --to mlflow`: one parent run per study and one nested run per trial,
with names and params MLflow accepts. mlflow is imported inside (an optional extra; importing it alone takes
about 2 s); the records it sends come from sweep.share.export_records.

Idempotence: runs carry `sweep.study_id` and `sweep.trial_key` tags and a digest of what they hold; a re-export
keeps a run whose digest is unchanged and replaces (deletes, then creates) one whose content changed, because
MLflow can neither change a logged param nor rewrite a metric's history. See docs/dashboards.md.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import posixpath
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from sweep.share.export_records import (
    EXPORT_FORMAT,
    ExportError,
    ExportFailed,
    FinishedTrial,
    StudyConfig,
    StudyExport,
    TrialInfo,
    missing_library,
    progress_values,
    summary_values,
)

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


def require_mlflow():
    try:
        import mlflow
    except ImportError as err:
        raise missing_library("mlflow", err) from err
    return mlflow


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
