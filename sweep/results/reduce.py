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

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from sweep.results.comparisons import SignificanceSettings, SignificanceTables, significance_tables, units_loader
from sweep.store.records import Event, PlanRecord
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
    significance: SignificanceTables

    def lower_is_better(self, metric: str) -> bool:
        """lm-eval's direction for the metric where the results carry it, else the known list."""
        known = self.seeds.filter((pl.col("metric") == metric) & pl.col("higher_is_better").is_not_null())
        return (not known["higher_is_better"][0]) if known.height else lower_is_better(metric)

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
    names = results.collect_schema().names()
    current = results.filter(pl.col("current")) if "current" in names else results
    # lm-eval says per metric whether higher is better; results written before it was kept have none.
    direction = pl.col("higher_is_better") if "higher_is_better" in names else pl.lit(None, pl.Boolean)
    measured = current.select("key", pl.col("language").alias("target"), "task", "metric", "value",
                              direction.alias("higher_is_better"))
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
                 pl.col("dense").first().alias("dense"),
                 pl.col("higher_is_better").drop_nulls().first().alias("higher_is_better")))


def lower_is_better_expr() -> pl.Expr:
    """Whether lower values are better: lm-eval's own `higher_is_better` where the results carry it,
    else the known perplexity-like metrics."""
    return pl.coalesce(~pl.col("higher_is_better"), pl.col("metric").is_in(list(LOWER_IS_BETTER)))


def target_ranks(seeds: pl.LazyFrame, languages: list[str]) -> pl.LazyFrame:
    """Per (model, pruner, sparsity, target, task, metric): the rank of calibrating in the target language
    among the single-language calibrations present (1 = best; ties share the better rank), how many were
    ranked, and the best calibration. `own_is_best` only when the own calibration is best alone;
    `own_tied_best` when it shares the best value with another calibration (a tie is not a win). A
    missing own cell has no rank."""
    if "higher_is_better" not in seeds.collect_schema().names():
        seeds = seeds.with_columns(pl.lit(None, pl.Boolean).alias("higher_is_better"))
    single = seeds.filter(~pl.col("dense") & pl.col("calibration").is_in(languages))
    score = pl.when(lower_is_better_expr()).then(pl.col("mean")).otherwise(-pl.col("mean"))
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
    # The strongest competitor: what the own calibration is tested against.
    others = (ranked.filter(pl.col("_score").is_not_null() & (pl.col("calibration") != pl.col("target")))
              .group_by(key).agg(pl.col("calibration").sort_by(order).first().alias("best_other"),
                                 pl.col("mean").sort_by(order).first().alias("best_other_value")))
    targets = ranked.group_by(key).agg(pl.col("_score").count().alias("ranked"),
                                       (pl.col("_score") == pl.col("_score").min()).sum().alias("_at_best"),
                                       lower_is_better_expr().first().alias("lower_is_better"))
    return (targets.join(own, on=key, how="left").join(best, on=key, how="left").join(others, on=key, how="left")
            .with_columns(((pl.col("rank") == 1) & (pl.col("_at_best") == 1)).alias("own_is_best"),
                          ((pl.col("rank") == 1) & (pl.col("_at_best") > 1)).alias("own_tied_best"))
            .drop("_at_best"))


# What the own calibration's comparison with the best other one says, at the study's level.
WIN = "win"  # own strictly better, significantly
BEST_WITHIN_NOISE = "best, within noise"  # own strictly better, not significantly
TIE = "tie"  # the same value
BEATEN_WITHIN_NOISE = "beaten, within noise"
LOSS = "loss"  # another calibration significantly better
UNTESTED = "untested"  # no per-unit data to test with
VERDICTS = (WIN, BEST_WITHIN_NOISE, TIE, BEATEN_WITHIN_NOISE, LOSS, UNTESTED)


def judge_own_calibration(ranks: pl.LazyFrame, pairs: pl.LazyFrame, chance: pl.LazyFrame, alpha: float) -> pl.LazyFrame:
    """Adds to the rank table the test of the own calibration against the best other one: `margin` (how
    much better own is, positive when better, in the metric's units), its interval, the p-value and the
    verdict; and `informative`, false where the dense model is not above chance on a downstream task
    (then no verdict on it says anything)."""
    key = ["model", "pruner", "sparsity", *CELL]
    flipped = pairs.select(*key, pl.col("calibration_b").alias("calibration_a"), pl.col("calibration_a").alias("calibration_b"),
                           -pl.col("difference").alias("difference"), -pl.col("ci_high").alias("ci_low"),
                           -pl.col("ci_low").alias("ci_high"), "p_value")
    both = pl.concat([pairs.select(flipped.collect_schema().names()), flipped], how="vertical").rename(
        {"calibration_a": "target_", "calibration_b": "best_other"})
    sign = pl.when(pl.col("lower_is_better")).then(-1.0).otherwise(1.0)
    tested = (ranks.join(both, how="left", left_on=[*key, "target", "best_other"], right_on=[*key, "target_", "best_other"])
              .with_columns((sign * pl.col("difference")).alias("margin"),
                            pl.when(sign > 0).then(pl.col("ci_low")).otherwise(-pl.col("ci_high")).alias("margin_low"),
                            pl.when(sign > 0).then(pl.col("ci_high")).otherwise(-pl.col("ci_low")).alias("margin_high"))
              .drop("difference", "ci_low", "ci_high"))
    significant = pl.col("p_value") < alpha
    verdict = (pl.when(pl.col("own_value").is_null() | pl.col("best_other_value").is_null()).then(None)
               .when(pl.col("own_value") == pl.col("best_other_value")).then(pl.lit(TIE))
               .when(pl.col("p_value").is_null()).then(pl.lit(UNTESTED))
               .when(pl.col("margin") > 0).then(pl.when(significant).then(pl.lit(WIN)).otherwise(pl.lit(BEST_WITHIN_NOISE)))
               .otherwise(pl.when(significant).then(pl.lit(LOSS)).otherwise(pl.lit(BEATEN_WITHIN_NOISE))))
    informative = chance.select("model", "target", "task", "metric", "informative", "chance", "p_above_chance")
    return (tested.with_columns(verdict.alias("verdict"))
            .join(informative, on=["model", "target", "task", "metric"], how="left"))


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


def with_intervals(frame: pl.LazyFrame, cells: pl.LazyFrame) -> pl.LazyFrame:
    """Each seed-mean cell's bootstrap interval (null where untested)."""
    return frame.join(cells.select(*GROUP, *CELL, "ci_low", "ci_high").with_columns(pl.col("calibration").fill_null("")),
                      on=[*GROUP, *CELL], how="left")


def reduce_study(results: pl.LazyFrame, plan: PlanRecord, languages: list[str],
                 significance: SignificanceTables | None = None) -> StudyTables:
    """The study's tables; with `significance` (sweep.results.comparisons), every cell carries its
    interval and every rank its test, and without it the tests read "untested"."""
    significance = significance or SignificanceTables.empty()
    cells, pairs, chance = significance.cells.lazy(), significance.pairs.lazy(), significance.chance.lazy()
    tidy = against_dense(tidy_results(results, plan_frame(plan)))
    seeds = with_intervals(over_seeds(tidy), cells)
    tidy_df, seeds_df = pl.collect_all([tidy, seeds])
    tasks_df = with_intervals(downstream(seeds_df.lazy()), cells).collect()
    averages = tasks_df.filter(pl.col("task") == "average").with_columns(pl.lit(None, pl.Boolean).alias("higher_is_better"))
    rankable = pl.concat([seeds_df.select(averages.columns), averages], how="vertical")
    ranks = judge_own_calibration(target_ranks(rankable.lazy(), languages), pairs, chance, significance.settings.alpha)
    groups = list(dict.fromkeys((t.model, t.pruner, t.sparsity) for t in plan.trials if not t.dense))
    # Group-bys and joins give rows in no fixed order: sorted, the same results give the same files.
    return StudyTables(tidy=_sorted(tidy_df), seeds=_sorted(seeds_df), ranks=_sorted(ranks.collect()),
                       tasks=_sorted(tasks_df), languages=languages, groups=groups, significance=significance)


SORT_ORDER = ("model", "pruner", "sparsity", "calibration", "seed", "name", "target", "task", "metric")


def _sorted(frame: pl.DataFrame) -> pl.DataFrame:
    columns = [c for c in SORT_ORDER if c in frame.columns]
    return frame.sort(columns, nulls_last=False) if columns else frame


def load_tables(study_dir: Path | str, plan: PlanRecord, languages: list[str],
                significance: SignificanceSettings | None = None, events: list[Event] | None = None) -> StudyTables:
    """The study's tables from its event logs (never from results.parquet, a cache that lags mid-run);
    with `significance` settings, the bootstrap over each finished trial's evaluation units too (read
    from its artifacts). `events`: the logs when the caller has read them already. Reads only."""
    store = StudyStore(study_dir)
    # Folded from the event logs on every read: results.parquet is rebuilt only when a driver run ends,
    # so mid-run or after a killed driver it lags, and the report must never write into the directory.
    results = store.results_frame(plan.keys, events)
    tested = None
    if significance is not None:
        finished = set(results.filter(pl.col("current") if "current" in results.columns else pl.lit(True))["key"])
        tested = significance_tables(plan, finished, units_loader(store), significance, languages)
    return reduce_study(results.lazy(), plan, languages, tested)
