"""`sweep report DIR`: the study's tables, heat maps and findings as one self-contained HTML file (figures
embedded, no network), beside the figures as PNG and the tables as CSV and Parquet."""
from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import jinja2
import polars as pl
from markupsafe import Markup

from sweep.results.figures import heatmap_png
from sweep.results.reduce import StudyTables, calibration_matrix, load_tables, lower_is_better
from sweep.results.run_stats import RunStats, run_stats
from sweep.store.records import Event, PlanRecord, RunStarted, TrialFailed
from sweep.store.study_store import StudyStore

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
    tables = load_tables(study_dir, plan, languages)
    stats = run_stats(events, keys)
    study_text = _latest_study_text(store, events)

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "figures").mkdir(exist_ok=True)
    (out_dir / "tables").mkdir(exist_ok=True)
    for name in ("tidy", "seeds", "ranks", "tasks"):
        frame: pl.DataFrame = getattr(tables, name)
        write_table(frame, out_dir / "tables", name)
    heatmaps = draw_heatmaps(tables)
    for heatmap in heatmaps:
        (out_dir / "figures" / f"{heatmap.slug}.png").write_bytes(heatmap.png)
        heatmap.matrix.write_csv(out_dir / "tables" / f"matrix-{heatmap.slug}.csv")
    finished = set(tables.tidy.filter(pl.col("finished"))["key"].unique().to_list())
    analysis = analysis_sections(study_dir, plan, finished, tables, out_dir)
    page = render(plan, tables, stats, heatmaps, study_text, events, analysis + (extra_sections or []))
    (out_dir / "index.html").write_text(page, encoding="utf-8")
    return out_dir / "index.html"


# Tables longer than this are written as Parquet only: a CSV of a real study's per-matrix analyses runs to
# tens of megabytes (Gemma 3 270M's layer errors: 52,000 rows, 6.7 MB; an 8B model's about ten times that),
# which no one reads as text and a repository should not hold; Parquet keeps them at a sixteenth.
CSV_MAX_ROWS = 20_000


def write_table(frame: pl.DataFrame, folder: Path, stem: str) -> str:
    """`<stem>.parquet`, and `<stem>.csv` while the table is short enough to read as text; returns the
    name of the file to point a reader to (the CSV when there is one)."""
    frame.write_parquet(folder / f"{stem}.parquet")
    if frame.height > CSV_MAX_ROWS:
        (folder / f"{stem}.csv").unlink(missing_ok=True)  # an earlier report's, now out of date
        return f"{stem}.parquet"
    frame.write_csv(folder / f"{stem}.csv")
    return f"{stem}.csv"


def analysis_sections(study_dir, plan: PlanRecord, finished: set[str], tables: StudyTables, out_dir: Path) -> list[str]:
    """The mask, neuron and subspace analyses the study switched on, as report sections (tables written
    beside the report as analysis-*.parquet, and .csv while short; figures as PNG)."""
    from sweep.results.analyses import AnalysisSettings, run_analyses
    from sweep.results.figures import iou_png, lape_png, snr_png

    config = plan.analyses
    on = {name: plan.analysis_enabled(name) for name in ("masks", "lape", "subspace")}
    if not any(on.values()):
        return []
    lape_config, subspace_config = config.get("lape") or {}, config.get("subspace") or {}
    settings = AnalysisSettings(lape_quantile=lape_config.get("lape_quantile", 0.01),
                                activation_quantile=lape_config.get("activation_quantile", 0.95),
                                subspace_rank=subspace_config.get("rank"))
    result = run_analyses(study_dir, plan, finished, settings, on["masks"], on["lape"], on["subspace"])
    written = {name: write_table(getattr(result, name), out_dir / "tables", f"analysis-{name}")
               for name in ("mask_overlap", "neurons", "lape_hist", "snr", "layer_error")
               if getattr(result, name).height}
    sections: list[str] = []

    def figure(png: bytes, slug: str, title: str) -> str:
        (out_dir / "figures" / f"{slug}.png").write_bytes(png)
        data = base64.b64encode(png).decode("ascii")
        return (f"<figure><img alt=\"{html.escape(title)}\" src=\"data:image/png;base64,{data}\">"
                f"<figcaption>{html.escape(title)}</figcaption></figure>")

    if on["masks"]:
        sections += ["<h2>Pruning masks: overlap between calibration languages</h2>",
                     "<p>IoU of the pruned positions of two masks (1: identical, 0: disjoint), over each layer's "
                     f"matrices; per matrix in <code>tables/{written.get('mask_overlap', 'analysis-mask_overlap.parquet')}</code>.</p>"]
        overlap = result.mask_overlap.filter(pl.col("matrix") == "all") if result.mask_overlap.height else result.mask_overlap
        for model, pruner, sparsity in tables.groups:
            group = overlap.filter((pl.col("model") == model) & (pl.col("pruner") == pruner)
                                   & (pl.col("sparsity") == sparsity)) if overlap.height else overlap
            if group.height:
                title = f"{model} / {pruner} {sparsity}: mask overlap"
                sections.append(figure(iou_png(group, tables.languages, title),
                                       _slug(model, pruner, sparsity, "mask-iou"), title))
        if result.layer_error.height:
            sections += ["<h3>Layer-wise pruning error on held-out text</h3>",
                         "<p>||WX - W'X||^2 / ||WX||^2 of each linear layer on the first held-out tokens of each "
                         "target language, averaged over layers and matrices (lower keeps more); per layer and "
                         f"matrix in <code>tables/{written['layer_error']}</code>.</p>"]
            mean_error = (result.layer_error.group_by("model", "pruner", "sparsity", "calibration", "target")
                          .agg(pl.col("relative_error").mean().alias("mean"))
                          .with_columns(pl.lit("layer error").alias("task"), pl.lit("relative_error").alias("metric")))
            for model, pruner, sparsity in tables.groups:
                matrix = calibration_matrix(mean_error.lazy(), model, pruner, sparsity, "layer error",
                                            "relative_error", tables.languages)
                if matrix.height:
                    title = f"{model} / {pruner} {sparsity}: mean layer-wise pruning error"
                    sections.append(figure(heatmap_png(matrix, title, True),
                                           _slug(model, pruner, sparsity, "layer-error"), title))
        if result.without_masks:
            sections.append(f"<p class=note>No masks for {len(result.without_masks)} trial(s) (run with "
                            f"analyses.masks off): {html.escape(', '.join(result.without_masks[:10]))}</p>")
    if on["lape"] and result.neurons.height:
        sections += ["<h2>Language-specific neurons (LAPE)</h2>",
                     f"<p>A neuron is language-specific when its LAPE is in the lowest {settings.lape_quantile:g} "
                     f"quantile and its activation probability reaches the dense model's "
                     f"{settings.activation_quantile:g} quantile in some language. Against the dense model's "
                     "language-specific neurons: how many survive pruning, vanish and appear.</p>",
                     table_html(result.neurons.select("name", "dense", "pruned", "survive", "vanish", "appear",
                                                      "mean_lape", "active_neurons"), limit=300)]
        for model, pruner, sparsity in tables.groups:
            hist = result.lape_hist.filter((pl.col("model") == model) & ((pl.col("pruner") == "dense") | (
                (pl.col("pruner") == pruner) & (pl.col("sparsity") == sparsity))))
            if hist.filter(pl.col("pruner") != "dense").height:
                title = f"{model} / {pruner} {sparsity}: LAPE, dense vs pruned"
                sections.append(figure(lape_png(hist, title), _slug(model, pruner, sparsity, "lape"), title))
    if on["subspace"] and result.snr.height:
        sections += ["<h2>Latent subspaces: language-specific vs language-agnostic</h2>",
                     "<p>SNR (dB) of each pruned model's per-language mean hidden state against the dense one, "
                     "in the subspace spanned by the dense model's centred language means and in its complement; "
                     "higher keeps more. Mean over calibration x target pairs per layer; per pair in "
                     f"<code>tables/{written['snr']}</code>. Identical representations are +inf and left out of "
                     "means.</p>"]
        for model, pruner, sparsity in tables.groups:
            group = result.snr.filter((pl.col("model") == model) & (pl.col("pruner") == pruner)
                                      & (pl.col("sparsity") == sparsity))
            if group.height:
                title = f"{model} / {pruner} {sparsity}: SNR per layer"
                sections.append(figure(snr_png(group, title), _slug(model, pruner, sparsity, "snr"), title))
    if (on["lape"] or on["subspace"]) and result.without_statistics:
        sections.append(f"<p class=note>No neuron or hidden-state statistics for {len(result.without_statistics)} "
                        f"trial(s) (run with analyses.lape and analyses.subspace off): "
                        f"{html.escape(', '.join(result.without_statistics[:10]))}</p>")
    return sections


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


def _slug(*parts: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", "-".join(parts).lower()).strip("-")


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


def draw_heatmaps(tables: StudyTables) -> list[Heatmap]:
    out = []
    for task, metric in main_metrics(tables):
        source = tables.tasks if task == "average" else tables.seeds
        for model, pruner, sparsity in trial_groups(tables):
            matrix = calibration_matrix(source.lazy(), model, pruner, sparsity, task, metric, tables.languages)
            if matrix.is_empty():
                continue
            what = METRIC_NAMES.get(metric, metric) + (" (mean over tasks)" if task == "average" else "")
            title = f"{model} / {pruner} {sparsity}: {what}"
            out.append(Heatmap(title, _slug(model, pruner, sparsity, task, metric),
                               heatmap_png(matrix, title, lower_is_better(metric)), matrix))
    return out


def findings(tables: StudyTables) -> list[str]:
    """Sentences computed from the rank table, one per (model, pruner, sparsity, main metric)."""
    lines = []
    for task, metric in main_metrics(tables):
        if task == "average":
            continue  # ranks are per task; the downstream summary is below
        ranks = tables.ranks.filter((pl.col("task") == task) & (pl.col("metric") == metric))
        for model, pruner, sparsity in trial_groups(tables):
            group = ranks.filter((pl.col("model") == model) & (pl.col("pruner") == pruner)
                                 & (pl.col("sparsity") == sparsity) & pl.col("rank").is_not_null())
            if group.is_empty():
                continue
            wins = int(group["own_is_best"].sum())
            ties = int(group["own_tied_best"].sum())
            best = "lowest" if lower_is_better(metric) else "highest"
            lines.append(f"{model}, {pruner} {sparsity}: calibrating in the target language gave the {best} "
                         f"{METRIC_NAMES.get(metric, metric)} in {wins} of {group.height} target languages"
                         f"{_tied(ties)} (mean rank {group['rank'].mean():.2f} among {int(group['ranked'].max())} "
                         "calibration languages)")
    accuracy = [m for t, m in main_metrics(tables) if t == "average"]
    averages = tables.tasks.filter((pl.col("task") == "average") & ~pl.col("dense")
                                   & pl.col("metric").is_in(accuracy))
    for model, pruner, sparsity in trial_groups(tables):
        group = averages.filter((pl.col("model") == model) & (pl.col("pruner") == pruner)
                                & (pl.col("sparsity") == sparsity) & pl.col("mean").is_not_null())
        own = group.filter(pl.col("calibration") == pl.col("target"))
        if own.is_empty():
            continue
        others = (group.filter(pl.col("calibration") != pl.col("target"))
                  .group_by("target").agg(pl.col("mean").max().alias("best_other")))
        compared = own.join(others, on="target")
        wins = compared.filter(pl.col("mean") > pl.col("best_other")).height
        ties = compared.filter(pl.col("mean") == pl.col("best_other")).height
        lines.append(f"{model}, {pruner} {sparsity}: calibrating in the target language gave the highest mean "
                     f"downstream accuracy in {wins} of {own.height} target languages{_tied(ties)}")
    return lines


def _tied(ties: int) -> str:
    """Ties are not wins: they are said apart."""
    return f" and tied for it in {ties} more" if ties else ""


# -- HTML ------------------------------------------------------------------------------------------

def _fmt(value: object) -> str:
    if value is None:
        return "missing"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def table_html(frame: pl.DataFrame, limit: int | None = None) -> Markup:
    rows = list(frame.iter_rows())[:limit] if limit else list(frame.iter_rows())
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(
        "<td class=missing>missing</td>" if v is None else f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>"
        for row in rows)
    more = f"<p class=note>{frame.height - len(rows)} more rows in the CSV.</p>" if limit and frame.height > limit else ""
    return Markup(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{more}")


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
        sections.append(Section("Rank of the target language's own calibration", table_html(
            ranks.select("model", "pruner", "sparsity", "metric", "target", "own_value", "rank", "ranked",
                         "best_calibration", "best_value")),
            note="1 is best among the single-language calibrations present."))
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
        written=datetime.now(UTC).isoformat(timespec="seconds"))


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
    out = {}
    for event in events:
        if isinstance(event, TrialFailed) and event.final and event.key not in finished:
            out[event.key] = f"failed: {str(event.error or '')[:200]}"
    return out
