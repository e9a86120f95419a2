"""`sweep export DIR --to wandb|mlflow`: the study directory's event log replayed into a W&B run or MLflow runs.

Everything that can be refused is refused before anything is sent (exit 2): not a study directory, the tool's
library not installed, no MLflow tracking URI, a store this install cannot open, W&B not logged in. A tool
that fails part-way exits 1; exporting again completes it. What lands where: docs/dashboards.md.
"""
from __future__ import annotations

import argparse
import os
import sys

from sweep.exit_codes import ExitCode
from sweep.share.export_records import ExportError, ExportFailed, StudyExport, read_export
from sweep.share.to_mlflow import MlflowTarget, open_mlflow, require_mlflow, write_mlflow
from sweep.share.to_wandb import WandbTarget, require_wandb, write_wandb

DEFAULT_WANDB_PROJECT = "calibration-sweep"
# Flags that mean something to one target only: given with the other, they are a mistake worth saying
_TARGET_FLAGS = {"wandb": ("project", "entity", "run_id"), "mlflow": ("tracking_uri", "experiment")}


def register(subparsers) -> None:
    """Adds `sweep export` to the `sweep` command's sub-commands."""
    p = subparsers.add_parser(
        "export", help="replay a study directory's results into a W&B run or MLflow runs (re-export updates them)",
        description="Replays the study directory's event log into one W&B run, or an MLflow study run with one "
                    "nested run per trial. Exporting the same directory again updates those runs in place of "
                    "adding new ones. Needs the tool's extra: pip install 'calibration-sweep[wandb]' or '[mlflow]'.")
    p.add_argument("directory", help="the study directory (a folder, or an s3:// / gs:// URL)")
    p.add_argument("--to", required=True, choices=("wandb", "mlflow"), help="the dashboard to export to")
    p.add_argument("--run-name", help="the study run's name (default: the study's name)")
    p.add_argument("--project", help=f"W&B project (default $WANDB_PROJECT, else {DEFAULT_WANDB_PROJECT})")
    p.add_argument("--entity", help="W&B entity (default $WANDB_ENTITY, else your default entity)")
    p.add_argument("--run-id", help="W&B run id (default: one derived from the study directory, the same on every "
                                    "export; W&B never reuses the id of a run deleted in its UI)")
    p.add_argument("--tracking-uri",
                   help="MLflow tracking URI (default $MLFLOW_TRACKING_URI): http(s)://server, sqlite:///file.db "
                        "(needs sqlalchemy and alembic) or file:DIR (needs MLFLOW_ALLOW_FILE_STORE=true)")
    p.add_argument("--experiment", help="MLflow experiment (default: the study's name)")
    p.add_argument("--dry-run", action="store_true",
                   help="read the study and say what would be exported; send nothing (needs neither library)")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    for flag in _TARGET_FLAGS["mlflow" if args.to == "wandb" else "wandb"]:
        if getattr(args, flag, None):
            print(f"error: --{flag.replace('_', '-')} is for --to {'wandb' if args.to == 'mlflow' else 'mlflow'}; "
                  "nothing was sent", file=sys.stderr)
            return ExitCode.INVALID
    try:
        export = read_export(args.directory)
        for warning in export.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        if args.dry_run:
            print(describe(export))
            print("dry run: nothing was sent")
            return ExitCode.OK
        run_name = args.run_name or export.config.study
        if args.to == "wandb":
            return _to_wandb(args, export, run_name)
        return _to_mlflow(args, export, run_name)
    except ExportError as err:
        print(f"error: {err}; nothing was sent", file=sys.stderr)
        return ExitCode.INVALID
    except ExportFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return ExitCode.FAILED_TRIALS  # the work the command was for failed part-way, as a failed trial does


def _to_wandb(args: argparse.Namespace, export: StudyExport, run_name: str) -> int:
    wandb = require_wandb()
    project = args.project or os.environ.get("WANDB_PROJECT") or DEFAULT_WANDB_PROJECT
    print(describe(export))
    outcome = write_wandb(export, WandbTarget(project=project, entity=args.entity or None, run_name=run_name,
                                                  run_id=args.run_id or None))
    # `finish` can return before wandb's service has flushed the run's file; stopping the service flushes it, so
    # the offline run is whole (ready for `wandb sync`) when this says so. A later wandb.init starts a new one.
    wandb.teardown()
    where = f"offline in {outcome.local_dir} (upload: wandb sync {outcome.local_dir})" if outcome.offline \
        else (outcome.url or project)
    print(f"exported to W&B run {outcome.run_id}: {where}")
    return ExitCode.OK


def _to_mlflow(args: argparse.Namespace, export: StudyExport, run_name: str) -> int:
    require_mlflow()
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ExportError("--to mlflow: no tracking URI; give --tracking-uri (http(s)://server, "
                          "sqlite:///mlflow.db, file:DIR) or set MLFLOW_TRACKING_URI")
    client = open_mlflow(uri)
    target = MlflowTarget(tracking_uri=uri, experiment=args.experiment or export.config.study, run_name=run_name)
    print(describe(export))
    outcome = write_mlflow(client, export, target)
    print(f"exported to MLflow experiment {target.experiment!r} ({outcome.experiment_id}) at {uri}: study run "
          f"{outcome.parent_run_id}; {outcome.created} run(s) created, {outcome.kept} unchanged kept, "
          f"{outcome.deleted} replaced or removed")
    return ExitCode.OK


def describe(export: StudyExport) -> str:
    s = export.summary
    values = sum(len(t.metrics) for t in export.trials)
    return (f"study {export.config.study} ({export.config.study_dir}): {s.done}/{s.planned} trials done, "
            f"{s.failed} failed, {s.left} left; exporting {s.exported} finished trial(s) with {values} metric "
            f"values, {len(export.failures)} failure(s), {len(export.progress)} progress point(s)")
