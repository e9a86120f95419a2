"""Paired bootstrap between models evaluated on the same units, as pure numpy functions.

Every trial of a model is evaluated on the same units: the same evaluation tokens (perplexity) and the
same task documents (accuracy). A difference between two calibration languages is judged against the
variation from two sources:

- the units: which text and which documents happened to be evaluated. One set of resampling weights
  (counts) is drawn per (target language, task) and applied to every trial alike, so the comparison is
  paired: what the two models share cancels. Tokens are resampled in consecutive blocks of
  ceil(n^(1/3)) tokens (the moving-block rate of Hall, Horowitz and Jing, 1995), because the losses of
  neighbouring tokens are correlated; documents are resampled one by one.
- the seeds: which calibration windows were drawn. The seeds' sample standard deviations give a seed
  term se x t(df), with se^2 = s_a^2 / S_a + s_b^2 / S_b and Welch-Satterthwaite degrees of freedom
  (the windows of two languages are not paired, so the seeds of a and b are independent); for one
  cell's interval, s / sqrt(S) x t(S - 1). Resampling the seeds themselves would understate their
  spread badly at S = 2 or 3 (a bootstrap of 2 values has a quarter of their variance), which is what
  studies afford; the t draw is the small-sample answer. Each seed's value also carries its own
  evaluation noise, which the units' term counts too, so the interval errs wide, never narrow.

A replicate's statistic is a ratio of resampled sums (the metric's own definition: bits per byte is the
summed NLL over the bytes, accuracy the mean score), so each replicate is the metric computed on a
resampled evaluation. Two-sided p-values come from the share of replicates on the other side of zero,
as (k + 1) / (B + 1) so that none is ever 0. A bootstrap over a handful of units claims far more than
they hold (two documents both right against both wrong would look certain), so comparisons resting on
fewer than MIN_UNITS resampling units are not tested at all.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MIN_UNITS = 30  # resampling units (token blocks, documents) a bootstrap test needs


def block_length(units: int) -> int:
    """Tokens per resampling block for a text of `units` tokens."""
    return max(1, math.ceil(units ** (1 / 3)))


def block_sums(values: np.ndarray, block: int) -> np.ndarray:
    """Sums of consecutive blocks of `block` values (the last block may be shorter)."""
    values = np.asarray(values, dtype=np.float64)
    starts = np.arange(0, values.size, block)
    return np.add.reduceat(values, starts) if values.size else values


def resampling_counts(units: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[resamples, units] how often each unit is drawn in each bootstrap replicate (n draws with replacement)."""
    return rng.multinomial(units, np.full(units, 1 / units), size=resamples).astype(np.float64)


def ratio_replicates(numerator: np.ndarray, denominator: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """[resamples] sum(counts * numerator) / sum(counts * denominator) per replicate."""
    return (counts @ numerator) / (counts @ denominator)


@dataclass(frozen=True)
class SeedSpread:
    """The seeds behind one mean: their sample standard deviation (0 for one seed) and how many."""

    sd: float
    seeds: int


def seed_spread(values: np.ndarray) -> SeedSpread:
    values = np.asarray(values, dtype=np.float64)
    return SeedSpread(float(np.std(values, ddof=1)) if values.size > 1 else 0.0, int(values.size))


def seed_noise(spreads: list[SeedSpread], resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[resamples] draws of the seed term of a mean (one spread) or of a difference of means (two):
    se x t(df), se^2 = sum s^2 / S and df by Welch-Satterthwaite. Means of one seed add nothing: their
    seed variation is not measured."""
    measured = [s for s in spreads if s.seeds > 1]
    if not measured:
        return np.zeros(resamples)
    parts = [s.sd**2 / s.seeds for s in measured]
    variance = sum(parts)
    if variance == 0:
        return np.zeros(resamples)
    df = variance**2 / sum(p**2 / (s.seeds - 1) for p, s in zip(parts, measured))
    return math.sqrt(variance) * rng.standard_t(df, size=resamples)


@dataclass(frozen=True)
class Comparison:
    difference: float  # a - b
    ci_low: float
    ci_high: float
    p_value: float  # two-sided
    resamples: int


def compare(a: float, b: float, a_replicates: np.ndarray, b_replicates: np.ndarray, level: float = 0.95,
            seeds: np.ndarray | None = None) -> Comparison:
    """Paired bootstrap of a - b: the percentile interval at `level` and the two-sided p-value of 0.
    `seeds` (from seed_noise) adds the seed term to every replicate."""
    differences = np.asarray(a_replicates) - np.asarray(b_replicates)
    if seeds is not None:
        differences = differences + seeds
    differences = differences[np.isfinite(differences)]
    n = differences.size
    if n == 0:
        return Comparison(a - b, math.nan, math.nan, math.nan, 0)
    tail = (1 - level) / 2
    low, high = np.quantile(differences, [tail, 1 - tail])
    below, above = int((differences <= 0).sum()), int((differences >= 0).sum())
    p = min(1.0, 2 * (min(below, above) + 1) / (n + 1))
    return Comparison(a - b, float(low), float(high), p, n)


def interval(replicates: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    finite = np.asarray(replicates)[np.isfinite(replicates)]
    if finite.size == 0:
        return math.nan, math.nan
    tail = (1 - level) / 2
    low, high = np.quantile(finite, [tail, 1 - tail])
    return float(low), float(high)


def above_chance_p(correct: np.ndarray, chance: np.ndarray) -> float:
    """Exact one-sided p-value that a model answering documents right (`correct`, 0/1) is above chance,
    each document's chance `chance` (1 / its answer options): P(X >= observed) for X the number right
    by guessing, a sum of independent Bernoullis (the Poisson binomial, computed exactly). Exact at any
    size, so two documents answered right (p = 1/16 at four options) are not called above chance."""
    correct = np.asarray(correct, dtype=np.float64)
    chance = np.asarray(chance, dtype=np.float64)
    if correct.size == 0 or not np.isin(correct, (0.0, 1.0)).all():
        return math.nan
    distribution = np.zeros(correct.size + 1)
    distribution[0] = 1.0
    for n, p in enumerate(chance, start=1):
        distribution[1 : n + 1] = distribution[1 : n + 1] * (1 - p) + distribution[:n] * p
        distribution[0] *= 1 - p
    return float(min(1.0, distribution[int(correct.sum()):].sum()))
