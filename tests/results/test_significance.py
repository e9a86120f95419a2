"""The report's tests on synthetic studies where the truth is known: a real calibration effect is found,
a null one is declared not significant at about the stated rate, ties are never wins, and a downstream
task on which the dense model is at chance is said to say nothing."""
from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from engine.analyze.significance import SeedSpread, above_chance_p, block_sums, compare, seed_noise
from engine.evaluate.units import EvaluationUnits, TaskScores, TokenLosses, load_units
from sweep.results.comparisons import SignificanceSettings, significance_tables
from sweep.results.reduce import LOSS, TIE, UNTESTED, WIN, reduce_study
from sweep.store.records import PlanRecord

LANGS = ["en", "de", "sw"]


def _plan(seeds: int) -> PlanRecord:
    trials = [{"key": "d", "name": "d", "model": "m", "pruner": "dense", "sparsity": "0", "calibration": None,
               "seed": None, "dense": True}]
    trials += [{"key": f"w.{c}.{s}", "name": f"w.{c}.{s}", "model": "m", "pruner": "wanda", "sparsity": "0.5",
                "calibration": c, "seed": s, "dense": False} for c in LANGS for s in range(seeds)]
    return PlanRecord.from_json({"study": "synthetic", "languages": LANGS, "trials": trials})


def synthetic_units(rng: np.random.Generator, plan: PlanRecord, token_effect: float = 0.0, accuracy_effect: float = 0.0,
                    seed_sd: float = 0.0, tokens: int = 600, documents: int = 300, dense_accuracy: float = 0.7,
                    tie: tuple[str, str] | None = None) -> dict[str, EvaluationUnits]:
    """Each target language's text has a difficulty per token and each document one per question, shared
    by every trial (what makes the comparison paired); each trial adds its own noise, a seed offset, and
    the effect when it was calibrated in the target language (lower NLL, higher accuracy)."""
    difficulty = {t: rng.gamma(2.0, 1.0, tokens) for t in LANGS}
    easiness = {t: rng.uniform(0, 1, documents) for t in LANGS}
    units = {}
    for trial in plan.trials:
        offset = rng.normal(0, seed_sd) if not trial.dense else 0.0
        result = EvaluationUnits()
        for t in LANGS:
            own = trial.calibration == t
            nll = difficulty[t] + 0.3 * rng.standard_normal(tokens) + offset - (token_effect if own else 0.0)
            result.perplexity[t] = TokenLosses(nll.astype(np.float32), bytes=3 * tokens)
            p = (dense_accuracy if trial.dense else 0.6) + (accuracy_effect if own else 0.0)
            correct = (easiness[t] < p) ^ (rng.uniform(0, 1, documents) < 0.1)  # shared difficulty, some noise
            result.tasks[f"task_{t}"] = TaskScores(t, np.arange(documents), np.full(documents, 4, dtype=np.int32),
                                                   {"acc": correct.astype(np.float32)})
        units[trial.key] = result
    if tie is not None:  # two calibrations scoring identically on every unit
        for key in [k for k in units if f".{tie[1]}." in k]:
            units[key] = units[key.replace(f".{tie[1]}.", f".{tie[0]}.")]
    return units


def judged(plan: PlanRecord, units: dict[str, EvaluationUnits], settings: SignificanceSettings,
           load=None) -> pl.DataFrame:
    """The rank table of results computed from `units`; the tests read units through `load` (default:
    every trial's)."""
    significance = significance_tables(plan, set(units), load or units.get, settings, LANGS)
    rows = []
    for key, result in units.items():
        for t, losses in result.perplexity.items():
            rows.append({"key": key, "language": t, "task": "perplexity", "metric": "bits_per_byte", "current": True,
                         "value": float(losses.token_nll.astype(np.float64).sum()) / (losses.bytes * math.log(2))})
        for name, scores in result.tasks.items():
            rows.append({"key": key, "language": scores.language, "task": name, "metric": "acc", "current": True,
                         "value": float(scores.metrics["acc"].mean()), "higher_is_better": True})
    tables = reduce_study(pl.LazyFrame(rows, infer_schema_length=None), plan, LANGS, significance)
    return tables.ranks


def verdicts(ranks: pl.DataFrame, task: str, metric: str) -> dict[str, str]:
    frame = ranks.filter((pl.col("task") == task) & (pl.col("metric") == metric))
    return dict(zip(frame["target"], frame["verdict"]))


def test_a_real_effect_is_found_in_every_target_language():
    plan = _plan(seeds=3)
    units = synthetic_units(np.random.default_rng(1), plan, token_effect=0.15, accuracy_effect=0.15, seed_sd=0.02)
    ranks = judged(plan, units, SignificanceSettings(resamples=1000))
    assert verdicts(ranks, "perplexity", "bits_per_byte") == {t: WIN for t in LANGS}
    assert verdicts(ranks, "average", "acc") == {t: WIN for t in LANGS}
    row = ranks.filter((pl.col("task") == "perplexity") & (pl.col("target") == "en")).row(0, named=True)
    # Lower is better for bits per byte: the margin is how much lower, and its interval lies above 0.
    expected = 0.15 / math.log(2) / 3
    assert row["margin_low"] > 0 and row["margin_low"] < expected < row["margin_high"]


def _null_rejections(datasets: int, seeds: int, seed_sd: float) -> float:
    plan = _plan(seeds)
    settings = SignificanceSettings(resamples=500)
    rejected = 0
    for i in range(datasets):
        units = synthetic_units(np.random.default_rng(1000 + i), plan, seed_sd=seed_sd, tokens=300, documents=50)
        significance = significance_tables(plan, set(units), units.get, settings, LANGS)
        pair = significance.pairs.filter((pl.col("target") == "en") & (pl.col("task") == "perplexity")
                                         & (pl.col("metric") == "bits_per_byte") & (pl.col("calibration_a") == "en")
                                         & (pl.col("calibration_b") == "de"))
        rejected += int(pair["p_value"][0] < settings.alpha)
    return rejected / datasets


@pytest.mark.parametrize("seeds, seed_sd", [(1, 0.0), (3, 0.05)])
def test_no_effect_is_declared_significant_at_about_the_stated_rate(seeds, seed_sd):
    """200 synthetic studies without any calibration effect: the share of rejected pairs stays within
    the level's binomial noise (0.05 + 3 standard errors)."""
    rate = _null_rejections(200, seeds, seed_sd)
    assert rate <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 200), rate


def test_without_an_effect_no_target_is_a_win():
    plan = _plan(seeds=1)
    units = synthetic_units(np.random.default_rng(7), plan)
    ranks = judged(plan, units, SignificanceSettings(resamples=1000))
    found = verdicts(ranks, "perplexity", "bits_per_byte")
    assert WIN not in found.values() and LOSS not in found.values(), found


def test_a_tie_is_a_tie_never_a_win():
    plan = _plan(seeds=1)
    # de-calibrated trials score exactly like en-calibrated ones, and en has the effect on target en.
    units = synthetic_units(np.random.default_rng(3), plan, token_effect=0.3, tie=("en", "de"))
    ranks = judged(plan, units, SignificanceSettings(resamples=500))
    assert verdicts(ranks, "perplexity", "bits_per_byte")["en"] == TIE


def test_a_task_at_chance_is_not_informative():
    plan = _plan(seeds=1)
    # Four answer options (chance 0.25): a dense model at 0.25 says nothing, one at 0.7 does.
    # (The generator flips 10% of answers: p x 0.9 + (1 - p) x 0.1 = 0.25 at p = 0.1875.)
    at_chance = synthetic_units(np.random.default_rng(5), plan, accuracy_effect=0.2, dense_accuracy=0.1875)
    significance = significance_tables(plan, set(at_chance), at_chance.get, SignificanceSettings(resamples=1000), LANGS)
    chance = significance.chance.filter(pl.col("task") == "average")
    assert chance["chance"].to_list() == pytest.approx([0.25] * 3)
    assert not chance["informative"].any(), chance
    # The informative flags reach the rank table, and the findings leave those targets out.
    ranks = judged(plan, at_chance, SignificanceSettings(resamples=300))
    assert ranks.filter(pl.col("task") == "average")["informative"].to_list() == [False] * 3
    above = synthetic_units(np.random.default_rng(5), plan)
    significance = significance_tables(plan, set(above), above.get, SignificanceSettings(resamples=1000), LANGS)
    assert significance.chance.filter(pl.col("task") == "average")["informative"].all()


def test_trials_without_units_are_untested_not_guessed():
    """The de-calibrated trial finished (its results are there) but kept no units: every comparison with
    it is untested, whatever its mean says, and the trial is named."""
    plan = _plan(seeds=1)
    units = synthetic_units(np.random.default_rng(2), plan, token_effect=0.3)

    def load(key):
        return None if ".de." in key else units[key]

    ranks = judged(plan, units, SignificanceSettings(resamples=300), load)
    found = verdicts(ranks, "perplexity", "bits_per_byte")
    assert found["de"] == UNTESTED  # its own calibration is best by the mean (effect 0.3), but untested
    de = ranks.filter((pl.col("task") == "perplexity") & (pl.col("target") == "de")).row(0, named=True)
    assert de["own_is_best"] and de["p_value"] is None
    significance = significance_tables(plan, set(units), load, SignificanceSettings(resamples=300), LANGS)
    assert significance.without_units == ["w.de.0"]
    assert not significance.pairs.filter((pl.col("calibration_a") == "de") | (pl.col("calibration_b") == "de")).height


def test_units_round_trip(tmp_path):
    plan = _plan(seeds=1)
    units = synthetic_units(np.random.default_rng(4), plan, tokens=50, documents=10)["w.en.0"]
    back = load_units(units.save(tmp_path / "units.safetensors"))
    assert back.perplexity.keys() == units.perplexity.keys() and back.tasks.keys() == units.tasks.keys()
    assert np.array_equal(back.perplexity["de"].token_nll, units.perplexity["de"].token_nll)
    assert back.perplexity["de"].bytes == 150
    assert np.array_equal(back.tasks["task_sw"].metrics["acc"], units.tasks["task_sw"].metrics["acc"])


def test_above_chance_is_exact_at_any_size():
    # Two documents of four options, both right: P = 0.25^2 = 1/16, not below 0.05.
    assert above_chance_p(np.ones(2), np.full(2, 0.25)) == pytest.approx(1 / 16)
    # Three of three: 1/64. One right of two: 1 - 0.75^2 = 7/16. Mixed options: 1/2 x 1/4 for both right.
    assert above_chance_p(np.ones(3), np.full(3, 0.25)) == pytest.approx(1 / 64)
    assert above_chance_p(np.array([1.0, 0.0]), np.full(2, 0.25)) == pytest.approx(7 / 16)
    assert above_chance_p(np.ones(2), np.array([0.5, 0.25])) == pytest.approx(1 / 8)
    # Binomial(20, 0.25) >= 10: the textbook tail.
    tail = sum(math.comb(20, k) * 0.25**k * 0.75 ** (20 - k) for k in range(10, 21))
    assert above_chance_p(np.array([1.0] * 10 + [0.0] * 10), np.full(20, 0.25)) == pytest.approx(tail)


def test_too_few_units_are_not_tested():
    """Ten documents, own calibration right on all, others wrong on all: a bootstrap would call it
    certain; with fewer than MIN_UNITS documents it is not tested at all."""
    plan = _plan(seeds=1)
    units = synthetic_units(np.random.default_rng(6), plan, accuracy_effect=0.4, documents=10)
    ranks = judged(plan, units, SignificanceSettings(resamples=300))
    assert set(verdicts(ranks, "average", "acc").values()) <= {UNTESTED, TIE}
    assert UNTESTED not in verdicts(ranks, "perplexity", "bits_per_byte").values()  # 600 tokens: 72 blocks


def test_the_math_on_hand_computed_cases():
    assert block_sums(np.arange(7.0), 3).tolist() == [3.0, 12.0, 6.0]
    # a - b = 1 in every replicate: the interval is [1, 1] and p is the smallest the replicates allow.
    result = compare(2.0, 1.0, np.full(99, 2.0), np.full(99, 1.0))
    assert (result.difference, result.ci_low, result.ci_high) == (1.0, 1.0, 1.0) and result.p_value == 2 / 100
    # Identical replicates: the difference is 0 in every one, p = 1.
    assert compare(1.0, 1.0, np.ones(50), np.ones(50)).p_value == 1.0
    # Seeds: two means of 3 seeds with s = 1 each: se = sqrt(2 / 3), Welch df = 4, and the draws are
    # se x t(4), whose 97.5% quantile is 2.776 x se.
    draws = seed_noise([SeedSpread(1.0, 3), SeedSpread(1.0, 3)], 200_000, np.random.default_rng(0))
    assert np.quantile(draws, 0.975) == pytest.approx(2.776 * math.sqrt(2 / 3), rel=0.03)
    assert not seed_noise([SeedSpread(0.0, 1), SeedSpread(0.0, 1)], 10, np.random.default_rng(0)).any()


def test_the_report_says_when_seed_variation_is_unmeasured():
    from sweep.results.report import findings

    plan = _plan(seeds=1)
    units = synthetic_units(np.random.default_rng(8), plan, token_effect=0.2)
    significance = significance_tables(plan, set(units), units.get, SignificanceSettings(resamples=300), LANGS)
    rows = [{"key": key, "language": t, "task": "perplexity", "metric": "bits_per_byte", "current": True,
             "value": float(losses.token_nll.astype(np.float64).sum()) / (losses.bytes * math.log(2))}
            for key, result in units.items() for t, losses in result.perplexity.items()]
    lines = findings(reduce_study(pl.LazyFrame(rows), plan, LANGS, significance))
    assert lines[0].startswith("m, wanda 0.5, bits per byte: of 3 target languages, calibrating in the target "
                               "language was significantly best in 3")
    assert any("one seed" in line and "not measured" in line for line in lines)
