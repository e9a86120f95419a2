"""The W&B writer of `sweep export DIR --to wandb`: one run per study, whose id derives from the study
directory (`wandb_run_id`), resumed on each export. wandb is imported inside (an optional extra, slow to import);
the records it sends come from sweep.share.export_records. See docs/dashboards.md.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from sweep.share.export_records import (
    EXPORT_FORMAT,
    ExportError,
    ExportFailed,
    StudyExport,
    failures_table,
    metrics_table,
    missing_library,
    progress_values,
    summary_values,
    trials_table,
)


def wandb_run_id(export: StudyExport) -> str:
    """A W&B run id fixed by the study directory, readable in URLs: '<study>-<study_id>'. W&B refuses ':;,#?/\\''
    in ids; the slug keeps lowercase letters, digits and dashes."""
    slug = re.sub(r"[^a-z0-9]+", "-", export.config.study.lower()).strip("-")[:40] or "study"
    return f"{slug}-{export.study_id}"


def require_wandb():
    try:
        import wandb
    except ImportError as err:
        raise missing_library("wandb", err) from err
    return wandb


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
