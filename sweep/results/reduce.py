"""The reducer: Polars lazy queries from a study's results to its tables.

Every table starts from the *expected* cells (the plan's trials x the (target, task, metric) combinations
the study measures), left-joined with what finished, so a failed or unfinished trial shows as a missing
value: never dropped, never filled. Seeds are averaged over the values present, with the count beside.

Tables (one row per ...):
- tidy:     trial x target x task x metric; value, dense value, change and relative change vs dense
- seeds:    (model, pruner, sparsity, calibration) x target x task x metric; mean, std, seeds present/expected
- ranks:    (model, pruner, sparsity) x target x task x metric; the target language's own calibration's
            rank among the single-language calibrations (1 = best), how many were ranked, the best one
- tasks:    downstream accuracy per task and averaged over tasks, per calibration and target
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from sweep.store.records import PlanRecord
from sweep.store.study_store import StudyStore

CELL = ["target", "task", "metric"]
GROUP = ["model", "pruner", "sparsity", "calibration"]
# Metrics where lower is better; every other metric (accuracy and the like) is higher-is-better.
LOWER_IS_BETTER = frozenset({"bits_per_byte", "token_perplexity", "loss", "perplexity", "word_perplexity",
                             "byte_perplexity"})
DOWNSTREAM_METRICS = ("acc", "acc_norm")


def lower_is_better(metric: str) -> bool:
    return metric in LOWER_IS_BETTER


@dataclass
class StudyTables:
    tidy: pl.DataFrame
    seeds: pl.DataFrame
    ranks: pl.DataFrame
    tasks: pl.DataFrame
    languages: list[str]  # target languages, in study order
    groups: list[tuple[str, str, str]]  # (model, pruner, sparsity) of the pruned trials, in plan order

    def matrix(self, model: str, pruner: str, sparsity: str, task: str, metric: str,
               value: str = "mean") -> pl.DataFrame:
        return calibration_matrix(self.seeds.lazy(), model, pruner, sparsity, task, metric, self.languages, value)


def plan_frame(plan: PlanRecord) -> pl.LazyFrame:
    """The plan's trials (plan.json) as a frame: key, name and the trial fields."""
    schema = {"key": pl.String, "name": pl.String, "model": pl.String, "pruner": pl.String, "sparsity": pl.String,
              "calibration": pl.String, "seed": pl.Int64, "dense": pl.Boolean}
    rows = [t.to_json() for t in plan.trials]
    return pl.LazyFrame(rows, schema=schema)


def tidy_results(results: pl.LazyFrame, plan: pl.LazyFrame) -> pl.LazyFrame:
    """Expected cells left-joined with finished values; `finished` says whether the trial finished."""
    current = results.filter(pl.col("current")) if "current" in results.collect_schema().names() else results
    measured = current.select("key", pl.col("language").alias("target"), "task", "metric", "value")
    combos = measured.select(CELL).unique()
    done = measured.select("key").unique().with_columns(pl.lit(True).alias("finished"))
    cells = plan.join(combos, how="cross")
    return (cells.join(measured, on=["key", *CELL], how="left")
            .join(done, on="key", how="left")
            .with_columns(pl.col("finished").fill_null(False)))


def against_dense(tidy: pl.LazyFrame) -> pl.LazyFrame:
    """Adds the same model's dense value, the change (value - dense) and the relative change."""
    dense = (tidy.filter(pl.col("dense"))
             .group_by(["model", *CELL]).agg(pl.col("value").mean().alias("dense_value")))
    return (tidy.join(dense, on=["model", *CELL], how="left")
            .with_columns((pl.col("value") - pl.col("dense_value")).alias("change"),
                          (pl.col("value") / pl.col("dense_value") - 1).alias("relative_change")))


def over_seeds(tidy: pl.LazyFrame) -> pl.LazyFrame:
    # Seeds in a fixed order, so the sums (and so the last digits of means and deviations) never vary.
    return (tidy.with_columns(pl.col("calibration").fill_null("")).sort("seed", nulls_last=False)
            .group_by([*GROUP, *CELL], maintain_order=True)
            .agg(pl.col("value").mean().alias("mean"), pl.col("value").std(ddof=1).alias("std"),
                 pl.col("value").count().alias("seeds"), pl.len().alias("seeds_expected"),
                 pl.col("change").mean().alias("change"), pl.col("dense_value").first().alias("dense_value"),
                 pl.col("dense").first().alias("dense")))


def target_ranks(seeds: pl.LazyFrame, languages: list[str]) -> pl.LazyFrame:
    """Per (model, pruner, sparsity, target, task, metric): the rank of calibrating in the target language
    among the single-language calibrations present (1 = best; ties share the better rank), how many were
    ranked, and the best calibration. `own_is_best` only when the own calibration is best alone;
    `own_tied_best` when it shares the best value with another calibration (a tie is not a win). A
    missing own cell has no rank."""
    single = seeds.filter(~pl.col("dense") & pl.col("calibration").is_in(languages))
    direction = pl.col("metric").is_in(list(LOWER_IS_BETTER))
    score = pl.when(direction).then(pl.col("mean")).otherwise(-pl.col("mean"))
    key = ["model", "pruner", "sparsity", *CELL]
    ranked = single.with_columns(score.alias("_score")).with_columns(
        pl.col("_score").rank("min").over(key).alias("rank"))
    # Among tied best calibrations the first in alphabetical order is named, so the table never changes
    # between runs; `own_tied_best` and the `rank` say whether there was a tie.
    order = ["_score", "calibration"]
    best = (ranked.filter(pl.col("_score").is_not_null())
            .group_by(key).agg(pl.col("calibration").sort_by(order).first().alias("best_calibration"),
                               pl.col("mean").sort_by(order).first().alias("best_value")))
    own = ranked.filter(pl.col("calibration") == pl.col("target")).select(
        *key, pl.col("mean").alias("own_value"), "rank")
    targets = ranked.group_by(key).agg(pl.col("_score").count().alias("ranked"),
                                       (pl.col("_score") == pl.col("_score").min()).sum().alias("_at_best"))
    return (targets.join(own, on=key, how="left").join(best, on=key, how="left")
            .with_columns(((pl.col("rank") == 1) & (pl.col("_at_best") == 1)).alias("own_is_best"),
                          ((pl.col("rank") == 1) & (pl.col("_at_best") > 1)).alias("own_tied_best"))
            .drop("_at_best"))


def downstream(seeds: pl.LazyFrame) -> pl.LazyFrame:
    """Accuracy per task, plus `average` over the tasks a (calibration, target) has (missing when any is)."""
    tasks = seeds.filter((pl.col("task") != "perplexity") & pl.col("metric").is_in(DOWNSTREAM_METRICS))
    average = (tasks.group_by([*GROUP, "target", "metric"], maintain_order=True)
               .agg(pl.when(pl.col("mean").null_count() == 0).then(pl.col("mean").mean()).alias("mean"),
                    pl.col("dense_value").mean().alias("dense_value"), pl.col("dense").first())
               .with_columns(pl.lit("average").alias("task"), (pl.col("mean") - pl.col("dense_value")).alias("change")))
    keep = [*GROUP, "target", "task", "metric", "mean", "dense_value", "change", "dense"]
    return pl.concat([tasks.select(keep), average.select(keep)], how="vertical")


def calibration_matrix(seeds: pl.LazyFrame, model: str, pruner: str, sparsity: str, task: str, metric: str,
                       languages: list[str], value: str = "mean") -> pl.DataFrame:
    """Calibration (rows, study order; mixes after) x target language (columns), missing cells null."""
    cells = seeds.filter((pl.col("model") == model) & (pl.col("pruner") == pruner) & (pl.col("sparsity") == sparsity)
                         & (pl.col("task") == task) & (pl.col("metric") == metric)).collect()
    if cells.is_empty():
        return pl.DataFrame({"calibration": []}, schema={"calibration": pl.String})
    targets = [t for t in languages if t in set(cells["target"])]
    calibrations = sorted(set(cells["calibration"]), key=lambda c: (languages.index(c) if c in languages else len(languages), c))
    wide = cells.pivot(on="target", index="calibration", values=value, aggregate_function="first")
    order = pl.DataFrame({"calibration": calibrations, "_order": range(len(calibrations))})
    return (order.join(wide, on="calibration", how="left").sort("_order")
            .select("calibration", *[pl.col(t) if t in wide.columns else pl.lit(None, pl.Float64).alias(t) for t in targets]))


def reduce_study(results: pl.LazyFrame, plan: PlanRecord, languages: list[str]) -> StudyTables:
    tidy = against_dense(tidy_results(results, plan_frame(plan)))
    seeds = over_seeds(tidy)
    tidy_df, seeds_df = pl.collect_all([tidy, seeds])
    groups = list(dict.fromkeys((t.model, t.pruner, t.sparsity) for t in plan.trials if not t.dense))
    # Group-bys and joins give rows in no fixed order: sorted, the same results give the same files.
    return StudyTables(tidy=_sorted(tidy_df), seeds=_sorted(seeds_df),
                       ranks=_sorted(target_ranks(seeds_df.lazy(), languages).collect()),
                       tasks=_sorted(downstream(seeds_df.lazy()).collect()), languages=languages, groups=groups)


SORT_ORDER = ("model", "pruner", "sparsity", "calibration", "seed", "name", "target", "task", "metric")


def _sorted(frame: pl.DataFrame) -> pl.DataFrame:
    columns = [c for c in SORT_ORDER if c in frame.columns]
    return frame.sort(columns, nulls_last=False) if columns else frame


def load_tables(study_dir: Path | str, plan: PlanRecord, languages: list[str]) -> StudyTables:
    store = StudyStore(study_dir)
    raw = store.location.read_bytes("results.parquet")
    if raw is None:
        store.compact(plan.keys)
        raw = store.location.read_bytes("results.parquet")

    return reduce_study(pl.read_parquet(io.BytesIO(raw)).lazy(), plan, languages)
