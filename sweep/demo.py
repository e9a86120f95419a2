"""`sweep demo` (and `make demo`): build the offline demo assets, then run the demo study with
`sweep run` on an embedded Ray, and write reports/demo/ from its results (the full report is issue 6).
"""
from __future__ import annotations

import html
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from sweep.env import REPO_ROOT, apply_default_env
from sweep.grid import Plan, expand
from sweep.problems import StudyInvalid
from sweep.study import Study, load_study

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

    started = time.perf_counter()
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
    results = results_rows(Path(options.out) if options.out else study.output_dir)
    report_dir = report_dir if report_dir.is_absolute() else Path.cwd() / report_dir
    write_demo_report(report_dir, study, plan, assets.metadata, results, time.perf_counter() - started)
    print(f"report: {report_dir / 'index.html'}")
    return outcome.code


def quiet_libraries() -> None:
    """One line per trial instead of datasets' and transformers' progress bars and notices."""
    import logging
    import os

    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    for name in ("lm_eval", "lm-eval", "transformers", "datasets", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def results_rows(study_dir: Path) -> list[dict]:
    """The current study version's results (results.parquet, written by `sweep run`), one row per trial
    and metric, in the demo report's columns."""
    import polars as pl

    frame = pl.read_parquet(study_dir / "results.parquet").filter(pl.col("current"))
    frame = frame.select("key", pl.col("name").alias("trial"), "model", "pruner", "sparsity",
                         pl.col("calibration").fill_null(""), "seed", pl.col("language").alias("target"), "task",
                         "metric", "value")
    return frame.to_dicts()


def write_demo_report(out: Path, study: Study, plan: Plan, asset_metadata: dict, rows: list[dict], seconds: float) -> None:
    import polars as pl

    out.mkdir(parents=True, exist_ok=True)
    frame = pl.DataFrame(rows)
    frame.write_csv(out / "results.csv")
    plan_rows = [{"key": t.key, "name": t.name, "dense": t.is_dense} for t in plan.trials]
    (out / "plan.json").write_text(json.dumps(plan_rows, indent=1) + "\n")
    (out / "assets.json").write_text(json.dumps(asset_metadata, indent=1, sort_keys=True, default=str) + "\n")
    (out / "index.html").write_text(_html(study, plan, asset_metadata, frame, seconds), encoding="utf-8")


def calibration_matrices(frame, task: str, metric: str, languages: list[str]) -> list[tuple[str, object]]:
    """Per (model, pruner, sparsity): calibration language x target language, with the change against
    the same model's dense baseline; single-language calibrations only, rows in `languages` order."""
    import polars as pl

    values = frame.filter((pl.col("task") == task) & (pl.col("metric") == metric))
    dense = values.filter(pl.col("pruner") == "dense").select("model", "target", pl.col("value").alias("dense"))
    pruned = values.filter((pl.col("pruner") != "dense") & pl.col("calibration").is_in(languages))
    out = []
    for (model, pruner, sparsity), group in sorted(pruned.group_by(["model", "pruner", "sparsity"]), key=lambda g: g[0]):
        matrix = (group.join(dense, on=["model", "target"], how="left")
                  .with_columns((pl.col("value") - pl.col("dense")).alias("delta"))
                  .pivot(on="target", index="calibration", values="value")
                  .with_columns(pl.col("calibration").cast(pl.Enum(languages))).sort("calibration")
                  .select(["calibration", *[c for c in languages if c in group["target"].unique().to_list()]]))
        out.append((f"{model} / {pruner} / {sparsity}", matrix))
    return out


def diagonal_wins(matrix, lower_is_better: bool = True) -> tuple[int, int]:
    """In how many target columns the target's own calibration language is the best row."""
    wins, columns = 0, 0
    calibrations = matrix["calibration"].cast(str).to_list()
    for target in matrix.columns[1:]:
        if target not in calibrations:
            continue
        column = matrix[target].to_list()
        best = min(column) if lower_is_better else max(column)
        columns += 1
        wins += column[calibrations.index(target)] == best
    return wins, columns


def _table(headers: list[str], rows: list[list[object]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _html(study: Study, plan: Plan, meta: dict, frame, seconds: float) -> str:
    import polars as pl

    languages = study.spec.evaluation.languages
    sections = [
        f"<h1>Demo study: {html.escape(study.name)}</h1>",
        f"<p>{html.escape(study.spec.description)}</p>",
        "<h2>Grid</h2>",
        f"<p>{len(plan.trials)} trials: {len(plan.pruned)} pruned + {len(plan.dense)} dense baselines, "
        f"{frame['key'].n_unique() if frame.height else 0} finished.</p>",
        _table(["model", "pruned", "dense"], [[m, c["pruned"], c["dense"]] for m, c in plan.per_model().items()]),
    ]
    bpb = frame.filter((pl.col("task") == "perplexity") & (pl.col("metric") == "bits_per_byte"))
    dense = bpb.filter(pl.col("pruner") == "dense").pivot(on="target", index="model", values="value")
    sections += ["<h2>Dense baselines: bits per byte on held-out text</h2>",
                 "<p>Bits per byte compare across languages and tokenizers; token perplexity does not.</p>",
                 _table(list(dense.columns), [list(r) for r in dense.iter_rows()])]
    findings, matrices = [], []
    for title, matrix in calibration_matrices(frame, "perplexity", "bits_per_byte", languages):
        wins, columns = diagonal_wins(matrix)
        findings.append(f"{title}: calibrating in the target language gave the lowest bits per byte in {wins} of {columns} languages")
        matrices += [f"<h3>{html.escape(title)}</h3>",
                     _table(["calibration \\ target", *matrix.columns[1:]], [list(r) for r in matrix.iter_rows()])]
    if findings:
        sections += ["<h2>Findings</h2>", "<ul>" + "".join(f"<li>{html.escape(f)}</li>" for f in findings) + "</ul>",
                     "<h2>Bits per byte: calibration language x target language</h2>", *matrices]
    tasks = frame.filter((pl.col("task") != "perplexity") & (pl.col("metric") == "acc"))
    if tasks.height:
        accuracy = (tasks.with_columns(pl.concat_str([pl.col("pruner"), pl.col("sparsity"), pl.col("calibration")], separator=" ").alias("trial"))
                    .pivot(on="target", index=["model", "trial"], values="value", aggregate_function="mean"))
        sections += ["<h2>Downstream accuracy (demo continuation task)</h2>",
                     _table(list(accuracy.columns), [list(r) for r in accuracy.iter_rows()])]
    models = meta.get("models") or {}
    if models:
        rows = [[name, lang, n["loss"], n["unigram_loss"], n["margin"]]
                for name, info in models.items() for lang, n in info.get("heldout", {}).items()]
        sections += ["<h2>Demo models</h2>",
                     _table(["model", "architecture", "parameters", "training tokens", "training seconds"],
                            [[name, info["model_type"], f"{info['parameters']:,}", f"{info['training']['tokens']:,}",
                              info["training"]["seconds"]] for name, info in models.items()]),
                     "<h3>Held-out loss against a unigram baseline (nats per token)</h3>",
                     _table(["model", "language", "model loss", "unigram loss", "margin"], rows)]
    sources = meta.get("sources") or []
    if sources:
        sections += ["<h2>Corpus sources</h2>",
                     _table(["source", "version", "licence", "languages"],
                            [[s.get("name"), s.get("version"), s.get("licence"), ", ".join(s.get("languages", []))]
                             for s in sources])]
    sections += [
        "<h2>Run</h2>",
        _table(["field", "value"], [
            ["written", datetime.now(timezone.utc).isoformat(timespec="seconds")],
            ["seconds", seconds],
            ["python", platform.python_version()],
            ["polars", pl.__version__],
            ["assets recipe", meta.get("recipe_hash", "")],
        ]),
    ]
    style = ("body{font-family:system-ui,sans-serif;max-width:64rem;margin:2rem auto;padding:0 1rem;color:#222}"
             "table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ccc;padding:.25rem .6rem;text-align:right}"
             "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}")
    return ("<!doctype html><html lang=en><head><meta charset=utf-8><title>demo study</title>"
            f"<style>{style}</style></head><body>" + "\n".join(sections) + "</body></html>\n")
