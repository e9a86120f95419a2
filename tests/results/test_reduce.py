"""The reducer against numbers worked out by hand, on a small synthetic study with missing cells and seeds."""
from __future__ import annotations

import math

import polars as pl
import pytest

from sweep.results.reduce import reduce_study
from sweep.store.records import PlanRecord

LANGS = ["en", "de"]


def trial(key, pruner="dense", sparsity="0", calibration=None, seed=None):
    return {"key": key, "name": key, "model": "m", "pruner": pruner, "sparsity": sparsity,
            "calibration": calibration, "seed": seed, "dense": pruner == "dense"}


PLAN = {"trials": [
    trial("d"),
    trial("we0", "wanda", "0.5", "en", 0), trial("we1", "wanda", "0.5", "en", 1),
    trial("wd0", "wanda", "0.5", "de", 0), trial("wd1", "wanda", "0.5", "de", 1),  # wd1 never finished
    trial("se0", "sparsegpt", "0.5", "en", 0),  # failed: no results at all
]}

# key -> {(target, task, metric): value}
VALUES = {
    "d": {("en", "perplexity", "bits_per_byte"): 1.0, ("de", "perplexity", "bits_per_byte"): 2.0,
          ("en", "t", "acc"): 0.8, ("de", "t", "acc"): 0.6},
    "we0": {("en", "perplexity", "bits_per_byte"): 1.2, ("de", "perplexity", "bits_per_byte"): 2.6,
            ("en", "t", "acc"): 0.7, ("de", "t", "acc"): 0.5},
    "we1": {("en", "perplexity", "bits_per_byte"): 1.4, ("de", "perplexity", "bits_per_byte"): 2.4,
            ("en", "t", "acc"): 0.5, ("de", "t", "acc"): 0.5},
    "wd0": {("en", "perplexity", "bits_per_byte"): 1.5, ("de", "perplexity", "bits_per_byte"): 2.2,
            ("en", "t", "acc"): 0.65, ("de", "t", "acc"): 0.55},
}


@pytest.fixture(scope="module")
def tables():
    rows = [{"key": k, "language": t, "task": task, "metric": m, "value": v, "current": True}
            for k, cells in VALUES.items() for (t, task, m), v in cells.items()]
    rows.append({"key": "old", "language": "en", "task": "perplexity", "metric": "bits_per_byte", "value": 9.0,
                 "current": False})  # an earlier evaluation suite's result: not part of these tables
    return reduce_study(pl.LazyFrame(rows), PlanRecord.from_json(PLAN), LANGS)


def seed_row(tables, pruner, calibration, target, task="perplexity", metric="bits_per_byte"):
    frame = tables.seeds.filter((pl.col("pruner") == pruner) & (pl.col("calibration") == calibration)
                                & (pl.col("target") == target) & (pl.col("task") == task) & (pl.col("metric") == metric))
    assert frame.height == 1
    return frame.row(0, named=True)


def test_every_expected_cell_is_present_missing_ones_as_null(tables):
    assert tables.tidy.height == 6 * 4  # 6 trials x 4 (target, task, metric) cells
    missing = tables.tidy.filter(pl.col("value").is_null())
    assert sorted(set(missing["key"])) == ["se0", "wd1"] and missing.height == 8
    assert not missing["finished"].any() and "old" not in set(tables.tidy["key"])


def test_change_against_dense(tables):
    row = tables.tidy.filter((pl.col("key") == "we1") & (pl.col("target") == "de")
                             & (pl.col("metric") == "bits_per_byte")).row(0, named=True)
    assert row["dense_value"] == 2.0 and row["change"] == pytest.approx(0.4)
    assert row["relative_change"] == pytest.approx(0.2)


def test_mean_and_std_over_seeds_with_counts(tables):
    row = seed_row(tables, "wanda", "en", "en")
    assert row["mean"] == pytest.approx(1.3) and row["std"] == pytest.approx(math.sqrt(0.02))
    assert (row["seeds"], row["seeds_expected"]) == (2, 2) and row["change"] == pytest.approx(0.3)
    partial = seed_row(tables, "wanda", "de", "en")
    assert partial["mean"] == pytest.approx(1.5) and partial["std"] is None
    assert (partial["seeds"], partial["seeds_expected"]) == (1, 2)
    failed = seed_row(tables, "sparsegpt", "en", "en")
    assert failed["mean"] is None and (failed["seeds"], failed["seeds_expected"]) == (0, 1)


def test_rank_of_the_target_language_and_the_best_calibration(tables):
    def rank(pruner, target, metric):
        frame = tables.ranks.filter((pl.col("pruner") == pruner) & (pl.col("target") == target)
                                    & (pl.col("metric") == metric))
        return frame.row(0, named=True)

    en = rank("wanda", "en", "bits_per_byte")  # en 1.3 vs de 1.5: lower is better
    assert (en["rank"], en["ranked"], en["best_calibration"], en["own_is_best"]) == (1, 2, "en", True)
    de = rank("wanda", "de", "bits_per_byte")  # de 2.2 vs en 2.5
    assert (de["rank"], de["best_calibration"], de["best_value"]) == (1, "de", pytest.approx(2.2))
    acc = rank("wanda", "en", "acc")  # en 0.6 vs de 0.65: higher is better
    assert (acc["rank"], acc["best_calibration"], acc["own_is_best"]) == (2, "de", False)
    missing = rank("sparsegpt", "en", "bits_per_byte")  # its only trial failed
    assert missing["rank"] is None and missing["ranked"] == 0 and missing["best_calibration"] is None


def test_matrix_keeps_missing_cells(tables):
    matrix = tables.matrix("m", "wanda", "0.5", "perplexity", "bits_per_byte")
    assert matrix.columns == ["calibration", "en", "de"]
    assert matrix.rows() == [("en", pytest.approx(1.3), pytest.approx(2.5)), ("de", pytest.approx(1.5), pytest.approx(2.2))]
    failed = tables.matrix("m", "sparsegpt", "0.5", "perplexity", "bits_per_byte")
    assert failed.rows() == [("en", None, None)]


def test_downstream_per_task_and_average(tables):
    frame = tables.tasks.filter((pl.col("pruner") == "wanda") & (pl.col("calibration") == "de")
                                & (pl.col("target") == "de"))
    by_task = {r["task"]: r for r in frame.iter_rows(named=True)}
    assert by_task["t"]["mean"] == pytest.approx(0.55) and by_task["average"]["mean"] == pytest.approx(0.55)
    assert by_task["t"]["change"] == pytest.approx(-0.05)
    failed = tables.tasks.filter((pl.col("pruner") == "sparsegpt") & (pl.col("task") == "average"))
    assert failed["mean"].to_list() == [None, None]


def test_a_tie_for_best_is_not_a_win():
    from sweep.results.reduce import target_ranks

    def cell(calibration, target, value, metric="acc"):
        return {"model": "m", "pruner": "wanda", "sparsity": "0.5", "calibration": calibration, "target": target,
                "task": "t", "metric": metric, "mean": value, "dense": False}

    seeds = pl.DataFrame([cell("en", "en", 0.5), cell("de", "en", 0.5), cell("sw", "en", 0.25),  # en ties de
                          cell("en", "de", 0.25), cell("de", "de", 0.75), cell("sw", "de", 0.5),   # de alone
                          cell("en", "sw", 1.0, "bits_per_byte"), cell("sw", "sw", 1.0, "bits_per_byte")]).lazy()
    ranks = {(r["target"], r["metric"]): r for r in target_ranks(seeds, ["en", "de", "sw"]).collect().iter_rows(named=True)}
    assert (ranks[("en", "acc")]["rank"], ranks[("en", "acc")]["own_is_best"], ranks[("en", "acc")]["own_tied_best"]) \
        == (1, False, True)
    assert (ranks[("de", "acc")]["own_is_best"], ranks[("de", "acc")]["own_tied_best"]) == (True, False)
    assert (ranks[("sw", "bits_per_byte")]["own_is_best"], ranks[("sw", "bits_per_byte")]["own_tied_best"]) \
        == (False, True)
