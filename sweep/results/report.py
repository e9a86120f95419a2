"""`sweep report DIR`: the study's tables, heat maps and findings as one self-contained HTML file (figures
embedded, no network), beside the figures as PNG and the tables as CSV and Parquet."""
from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import jinja2
import polars as pl
from markupsafe import Markup

from sweep.results.analysis_sections import analysis_sections
from sweep.results.comparisons import SignificanceSettings
from sweep.results.figures import heatmap_png
from sweep.results.reduce import (
    BEATEN_WITHIN_NOISE,
    BEST_WITHIN_NOISE,
    LOSS,
    TIE,
    UNTESTED,
    VERDICTS,
    WIN,
    StudyTables,
    calibration_matrix,
    load_tables,
)
from sweep.results.run_stats import RunStats, run_stats
from sweep.results.table_files import slug, table_html, write_table
from sweep.store.records import Event, PlanRecord, RunStarted
from sweep.store.study_store import StudyStore, study_state

PERPLEXITY_METRICS = ("bits_per_byte", "token_perplexity")
METRIC_NAMES = {"bits_per_byte": "bits per byte", "token_perplexity": "token perplexity", "acc": "accuracy",
                "acc_norm": "normalised accuracy"}


class ReportError(RuntimeError):
    pass


@dataclass
class Heatmap:
    title: str
    slug: str
    png: bytes
    matrix: pl.DataFrame


def build_report(study_dir: Path | str, out_dir: Path, extra_sections: list[str] | None = None) -> Path:
    store = StudyStore(study_dir)
    plan = store.read_plan()
    if plan is None:
        raise ReportError(f"{study_dir} is not a study directory (no plan.json): run `sweep run STUDY --out {study_dir}` first")
    events = store.read_events().events
    keys = plan.keys
    languages = list(plan.languages) or sorted({t.calibration for t in plan.trials if t.calibration})
    tables = load_tables(study_dir, plan, languages, significance_settings(plan), events)
    stats = run_stats(events, keys)
    study_text = _latest_study_text(store, events)

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "figures").mkdir(exist_ok=True)
    (out_dir / "tables").mkdir(exist_ok=True)
    for name in ("tidy", "seeds", "ranks", "tasks"):
        frame: pl.DataFrame = getattr(tables, name)
        write_table(frame, out_dir / "tables", name)
    for name in ("pairs", "chance"):
        write_table(getattr(tables.significance, name), out_dir / "tables", f"significance-{name}")
    heatmaps = draw_heatmaps(tables)
    for heatmap in heatmaps:
        (out_dir / "figures" / f"{heatmap.slug}.png").write_bytes(heatmap.png)
        heatmap.matrix.write_csv(out_dir / "tables" / f"matrix-{heatmap.slug}.csv")
    finished = set(tables.tidy.filter(pl.col("finished"))["key"].unique().to_list())
    analysis = analysis_sections(study_dir, plan, finished, tables, out_dir)
    page = render(plan, tables, stats, heatmaps, study_text, events, analysis + (extra_sections or []))
    (out_dir / "index.html").write_text(page, encoding="utf-8")
    return out_dir / "index.html"


def _latest_study_text(store: StudyStore, events: list[Event]) -> str:
    runs = [e for e in events if isinstance(e, RunStarted) and e.study_file]
    candidates = []
    if runs:
        candidates.append(str(runs[-1].study_file).rsplit("/", 1)[-1])
    candidates.append("study.yaml")
    for name in candidates:
        raw = store.location.read_bytes(name)
        if raw is not None:
            return raw.decode("utf-8", errors="replace")
    return ""


def trial_groups(tables: StudyTables) -> list[tuple[str, str, str]]:
    return tables.groups


def main_metrics(tables: StudyTables) -> list[tuple[str, str]]:
    """(task, metric) pairs drawn as heat maps: one perplexity metric, and downstream accuracy averaged."""
    present = set(tables.seeds.filter(pl.col("task") == "perplexity")["metric"].unique().to_list())
    out = [("perplexity", m) for m in PERPLEXITY_METRICS if m in present][:1]
    if tables.tasks.filter(pl.col("task") == "average").height:
        metric = "acc" if "acc" in set(tables.tasks["metric"]) else tables.tasks["metric"][0]
        out.append(("average", metric))
    return out


def significance_settings(plan: PlanRecord) -> SignificanceSettings:
    """The study's `analyses.significance` (defaults for a plan written before it existed)."""
    given = plan.analyses.get("significance") or {}
    return SignificanceSettings(**{k: given[k] for k in ("alpha", "resamples", "seed") if k in given})


def draw_heatmaps(tables: StudyTables) -> list[Heatmap]:
    out = []
    for task, metric in main_metrics(tables):
        source = tables.tasks if task == "average" else tables.seeds
        for model, pruner, sparsity in trial_groups(tables):
            matrix = calibration_matrix(source.lazy(), model, pruner, sparsity, task, metric, tables.languages)
            if matrix.is_empty():
                continue
            low, high = (calibration_matrix(source.lazy(), model, pruner, sparsity, task, metric, tables.languages,
                                            value) for value in ("ci_low", "ci_high"))
            what = METRIC_NAMES.get(metric, metric) + (" (mean over tasks)" if task == "average" else "")
            title = f"{model} / {pruner} {sparsity}: {what}"
            out.append(Heatmap(title, slug(model, pruner, sparsity, task, metric),
                               heatmap_png(matrix, title, tables.lower_is_better(metric), (low, high)), matrix))
    return out


def findings(tables: StudyTables) -> list[str]:
    """One sentence per (model, pruner, sparsity, main metric): in how many target languages calibrating
    in that language was significantly best, best within noise, tied, beaten within noise, significantly
    beaten; downstream cells where the dense model is not above chance are counted apart, not judged."""
    settings = tables.significance.settings
    lines = []
    for task, metric in main_metrics(tables):
        ranks = tables.ranks.filter((pl.col("task") == task) & (pl.col("metric") == metric))
        what = METRIC_NAMES.get(metric, metric) + (" (mean over tasks)" if task == "average" else "")
        for model, pruner, sparsity in trial_groups(tables):
            group = ranks.filter((pl.col("model") == model) & (pl.col("pruner") == pruner)
                                 & (pl.col("sparsity") == sparsity) & pl.col("verdict").is_not_null())
            if group.is_empty():
                continue
            chance_level = group.filter(pl.col("informative").eq(False))
            judged = group.filter(pl.col("informative").ne(False) | pl.col("informative").is_null())
            counts = {v: judged.filter(pl.col("verdict") == v).height for v in VERDICTS}
            parts = [f"significantly best in {counts[WIN]}"] + [
                f"{words} in {counts[v]}" for v, words in ((BEST_WITHIN_NOISE, "best within noise"), (TIE, "tied"),
                                                           (BEATEN_WITHIN_NOISE, "beaten within noise"),
                                                           (LOSS, "significantly beaten")) if counts[v]]
            if counts[UNTESTED]:
                untested = judged.filter(pl.col("verdict") == UNTESTED)
                parts.append(f"untested in {counts[UNTESTED]} (best by the mean in {int(untested['own_is_best'].sum())}; "
                             "the trials kept no per-token or per-document scores to test with)")
            at_chance = (f"the dense model is not significantly above chance in {chance_level.height} target "
                         f"language(s) ({', '.join(chance_level['target'].to_list())}), so the task cannot tell "
                         "calibrations apart there")
            if judged.is_empty():
                lines.append(f"{model}, {pruner} {sparsity}, {what}: {at_chance}.")
                continue
            line = (f"{model}, {pruner} {sparsity}, {what}: of {judged.height} target languages, calibrating in "
                    f"the target language was " + ", ".join(parts))
            if chance_level.height:
                line += f"; {at_chance}"
            lines.append(line + ".")
    if lines:
        lines.append(f"Each verdict tests the own calibration against the best other one: a paired bootstrap over "
                     f"evaluation tokens (in blocks) or documents and over seeds, {settings.resamples} resamples, "
                     f"two-sided at {settings.alpha:g}. A tie is the same value, never a win.")
        cells = tables.significance.cells.filter(pl.col("pruner") != "dense")
        if cells.height and int(cells["seeds_tested"].max()) == 1:
            lines.append("Every calibration ran with one seed, so the variation between calibration draws is not "
                         "measured: the intervals and tests cover the evaluation text alone, and a difference they "
                         "call significant may still be within seed noise.")
    return lines


# -- HTML ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Section:
    """One titled table of the report; `note` may hold markup (it is the report's own text)."""

    heading: str
    table: Markup
    note: Markup | str = ""
    level: int = 2


@dataclass(frozen=True)
class Figure:
    title: str
    data: str  # base64 PNG


def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.PackageLoader("sweep.results", "templates"), autoescape=True,
                              trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)


def render(plan: PlanRecord, tables: StudyTables, stats: RunStats, heatmaps: list[Heatmap], study_text: str,
           events: list[Event], extra_sections: list[str]) -> str:
    total = len(plan.trials)
    finished_keys = set(tables.tidy.filter(pl.col("finished"))["key"].unique().to_list())
    failed = _failed_trials(events, finished_keys)
    missing = [t for t in plan.trials if t.key not in finished_keys]
    state = ("complete" if not missing else
             f"partial: {len(finished_keys)} of {total} trials finished, {len(failed)} failed, "
             f"{len(missing) - len(failed)} not run yet; missing cells are marked, never filled")
    sections: list[Section] = []
    dense = tables.seeds.filter(pl.col("dense") & (pl.col("task") == "perplexity")
                                & pl.col("metric").is_in(PERPLEXITY_METRICS)).sort("metric", "model")
    if dense.height:
        wide = dense.pivot(on="target", index=["metric", "model"], values="mean", aggregate_function="first")
        wide = wide.select("metric", "model", *[t for t in tables.languages if t in wide.columns])
        sections.append(Section("Dense baselines", table_html(wide)))
    order = {g: i for i, g in enumerate(tables.groups)}
    ranks = (tables.ranks.filter((pl.col("task") == "perplexity") & pl.col("metric").is_in(PERPLEXITY_METRICS[:1]))
             .with_columns(pl.struct("model", "pruner", "sparsity").map_elements(
                 lambda r: order.get((r["model"], r["pruner"], r["sparsity"]), len(order)), return_dtype=pl.Int64).alias("_g"),
                 pl.col("target").map_elements(lambda t: tables.languages.index(t) if t in tables.languages else 99,
                                               return_dtype=pl.Int64).alias("_t"))
             .sort("_g", "_t"))
    if ranks.height:
        sections.append(Section("The target language's own calibration against the best other", table_html(
            ranks.select("model", "pruner", "sparsity", "metric", "target", "own_value", "rank", "ranked",
                         "best_other", "best_other_value", "margin", "margin_low", "margin_high", "p_value",
                         "verdict")),
            note=Markup(f"Rank 1 is best among the single-language calibrations present (ties share it). "
                        f"<code>margin</code> is how much better the own calibration is than the best other one "
                        f"(negative: worse), with its {1 - tables.significance.settings.alpha:.0%} bootstrap "
                        f"interval and two-sided p-value; every calibration pair in "
                        f"<code>tables/significance-pairs.csv</code>.{_untested_note(tables)}")))
    chance = tables.significance.chance
    if chance.height:
        sections.append(Section("Downstream tasks against chance", table_html(
            chance.sort("model", "task", "target", "metric"), limit=300),
            note="The dense model's accuracy against chance (1 / answer options): the exact one-sided p-value of "
                 "getting as many right by guessing. Where it is not significantly above chance, a task cannot "
                 "tell calibrations apart: those cells are left out of the findings."))
    tasks = tables.tasks.filter(pl.col("task") == "average")
    if tasks.height:
        wide = tasks.pivot(on="target", index=["model", "pruner", "sparsity", "calibration", "metric"],
                           values="mean", aggregate_function="first")
        wide = wide.select("model", "pruner", "sparsity", "calibration", "metric",
                           *[t for t in tables.languages if t in wide.columns])
        sections.append(Section("Downstream tasks", table_html(_in_plan_order(wide, tables), limit=300),
                                note=Markup("Mean over seeds, averaged over the tasks measured in each target "
                                            "language; per task in <code>tables/tasks.csv</code>. Dense rows are "
                                            "the unpruned models.")))
    seeds = tables.seeds.filter(~pl.col("dense") & (pl.col("seeds_expected") > 1))
    if seeds.height:
        sections.append(Section("Spread over seeds", table_html(seeds.select(
            "model", "pruner", "sparsity", "calibration", "target", "task", "metric", "mean", "std", "seeds",
            "seeds_expected"), limit=200)))
    if missing:
        rows = [[t.name, failed.get(t.key, "not run yet")] for t in missing]
        sections.append(Section("Missing trials", table_html(
            pl.DataFrame(rows, schema=["trial", "status"], orient="row"), limit=500)))
    sections.append(Section("Run statistics", table_html(pl.DataFrame([
        ["trials in the plan", str(total)], ["finished", str(len(finished_keys))],
        ["failed (retries used up)", str(stats.trials_gave_up)], ["driver runs", str(stats.driver_runs)],
        ["trials forgotten (sweep forget)", str(stats.trials_forgotten)],
        ["attempts", str(stats.attempts)], ["failed attempts", str(stats.attempts_failed)],
        ["workers lost", str(stats.workers_lost)], ["model loads", str(stats.model_loads)],
        ["worker hours in trials", f"{stats.worker_hours:.3f}"], ["GPU hours in trials", f"{stats.gpu_hours:.3f}"],
        ["hours loading models", f"{stats.load_hours:.3f}"], ["git revisions", ", ".join(stats.git) or "unknown"],
    ], schema=["statistic", "value"], orient="row"))))
    if stats.errors:
        sections.append(Section("Errors", table_html(pl.DataFrame(
            [[e, n] for e, n in sorted(stats.errors.items(), key=lambda x: -x[1])], schema=["error", "attempts"],
            orient="row")), level=3))
    versions = [["driver", k, v] for k, v in stats.driver_versions.items()]
    versions += [[f"worker set {i + 1}", k, v] for i, vs in enumerate(stats.worker_versions) for k, v in vs.items()]
    if versions:
        sections.append(Section("Library versions", table_html(
            pl.DataFrame(versions, schema=["where", "library", "version"], orient="row"))))
    return _environment().get_template("report.html.j2").render(
        study=plan.study, state=state, findings=findings(tables),
        heatmaps=[Figure(h.title, base64.b64encode(h.png).decode("ascii")) for h in heatmaps],
        sections=sections, extra_sections=[Markup(s) for s in extra_sections], study_text=study_text,
        written=datetime.now(UTC).isoformat(timespec="seconds"),
        as_of=datetime.fromtimestamp(max((e.time for e in events), default=0.0), UTC).isoformat(timespec="seconds"))


def _untested_note(tables: StudyTables) -> Markup:
    """Which trials the tests could not use, and why (markup-escaped names)."""
    notes = []
    for names, why in ((tables.significance.without_units, "kept no per-token or per-document scores (they ran "
                        "before those were kept), so comparisons with them are untested"),
                       (tables.significance.misaligned, "were evaluated on other tokens or documents than the rest "
                        "of their model's trials, so they cannot be paired")):
        if names:
            shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
            notes.append(Markup(" {} trial(s) {}: {}.").format(len(names), why, shown))
    return Markup("").join(notes)


def _in_plan_order(frame: pl.DataFrame, tables: StudyTables) -> pl.DataFrame:
    groups = {g: i for i, g in enumerate(tables.groups)}
    languages = tables.languages

    def order(row: dict) -> tuple:
        group = groups.get((row["model"], row["pruner"], row["sparsity"]), -1)  # dense first
        calibration = row.get("calibration") or ""
        return (group, languages.index(calibration) if calibration in languages else len(languages), calibration)

    rows = sorted(frame.iter_rows(named=True), key=order)
    return pl.DataFrame(rows, schema=frame.schema) if rows else frame


def _failed_trials(events: list[Event], finished: set[str]) -> dict[str, str]:
    """Trials that gave up (and were neither finished since nor forgotten): key -> why."""
    return {key: f"failed: {str(event.error or '')[:200]}" for key, event in study_state(events).failed.items()
            if event.final and key not in finished}
