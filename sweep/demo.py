"""`sweep demo` (and `make demo`): build the offline demo assets, then run the demo study with
`sweep run` on an embedded Ray, and write reports/demo/ from its results (the full report is issue 6).
"""
from __future__ import annotations

import html
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from sweep.env import REPO_ROOT, apply_default_env, quiet_libraries
from sweep.grid import expand
from sweep.problems import StudyInvalid
from sweep.report import build_report
from sweep.study import load_study

if TYPE_CHECKING:
    from sweep.run import RunOptions

DEMO_STUDY = REPO_ROOT / "sweep" / "studies" / "demo.yaml"


def run_demo(force_assets: bool = False, report_dir: Path = Path("reports/demo"), study_path: Path = DEMO_STUDY,
             options: "RunOptions | None" = None) -> int:
    """Builds the assets, runs the demo study with `sweep run` (an embedded Ray on this machine), and
    writes the demo report from the study's results."""
    from engine.demo.build import ensure_demo_assets
    from engine.demo.tasks import ensure_demo_tasks
    from sweep.run import EXIT_FAILED_TRIALS, RunOptions, run_study

    apply_default_env()
    quiet_libraries()
    assets = ensure_demo_assets(force=force_assets)
    ensure_demo_tasks(assets)
    try:
        study = load_study(study_path)
    except StudyInvalid as err:
        print(err, file=sys.stderr)
        return 2
    plan = expand(study)
    from sweep.cli import format_plan

    print(format_plan(plan, show_trials=False))
    options = options or RunOptions()
    outcome = run_study(study_path, options)
    if outcome.code not in (0, EXIT_FAILED_TRIALS):
        return outcome.code
    report_dir = report_dir if report_dir.is_absolute() else Path.cwd() / report_dir
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "assets.json").write_text(json.dumps(assets.metadata, indent=1, sort_keys=True, default=str) + "\n")
    study_dir = options.out or study.output_location
    page = build_report(study_dir, report_dir, extra_sections=demo_sections(assets.metadata))
    print(f"report: {page}")
    return outcome.code


def demo_sections(meta: dict) -> list[str]:
    """The demo models and corpus, for the demo's report."""
    import polars as pl

    from sweep.report import table_html

    sections = []
    models = meta.get("models") or {}
    if models:
        rows = [[name, lang, n["loss"], n["unigram_loss"], n["margin"]]
                for name, info in models.items() for lang, n in info.get("heldout", {}).items()]
        sections += ["<h2>Demo models</h2>",
                     table_html(pl.DataFrame([[name, info["model_type"], f"{info['parameters']:,}",
                                               f"{info['training']['tokens']:,}", info["training"]["seconds"]]
                                              for name, info in models.items()],
                                             schema=["model", "architecture", "parameters", "training tokens",
                                                     "training seconds"], orient="row")),
                     "<h3>Held-out loss against a unigram baseline (nats per token)</h3>",
                     table_html(pl.DataFrame(rows, schema=["model", "language", "model loss", "unigram loss", "margin"],
                                             orient="row"))]
    sources = meta.get("sources") or []
    if sources:
        sections += ["<h2>Corpus sources</h2>",
                     table_html(pl.DataFrame([[s.get("name"), s.get("version"), s.get("licence"),
                                               ", ".join(s.get("languages", []))] for s in sources],
                                             schema=["source", "version", "licence", "languages"], orient="row"))]
    sections.append(f"<p class=note>Demo asset recipe {html.escape(str(meta.get('recipe_hash', '')))}.</p>")
    return sections
