"""Uncertainty for every comparison the report makes: paired bootstrap intervals of each cell, tests
between calibration languages on the same tokens and documents, and whether the dense model is above
chance on each task (the math is engine.analyze.significance; definitions in docs/results.md).

Reads each finished trial's `units.safetensors` (per-token losses, per-document scores). Trials that ran
before those were kept have none: their cells get no interval and their comparisons are "untested",
never guessed.

Tables:
- cells:   (model, pruner, sparsity, calibration) x target x task x metric: the seed mean and its
           bootstrap interval, units and seeds it rests on
- pairs:   (model, pruner, sparsity) x target x task x metric x (calibration a, calibration b): a - b,
           its interval and two-sided p-value, and which is better at the study's level (or neither)
- chance:  model x target x task x metric: the dense model's value, chance (1 / answer options), the
           one-sided p-value that the dense model is above chance, and `informative`
"""
from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from engine.analyze.significance import (
    MIN_UNITS,
    SeedSpread,
    above_chance_p,
    block_length,
    block_sums,
    compare,
    interval,
    ratio_replicates,
    resampling_counts,
    seed_noise,
    seed_spread,
)
from engine.evaluate.units import UNITS_FILE, EvaluationUnits, load_units
from sweep.store.artifacts import ArtifactReader
from sweep.store.records import PlannedTrial, PlanRecord

PERPLEXITY_METRICS = ("bits_per_byte", "loss", "token_perplexity")
AVERAGE = "average"  # the mean over a target language's tasks, as in the reducer's `tasks` table


@dataclass(frozen=True)
class SignificanceSettings:
    alpha: float = 0.05  # two-sided level of the tests; intervals are at 1 - alpha
    resamples: int = 2000
    seed: int = 0


@dataclass
class SignificanceTables:
    cells: pl.DataFrame
    pairs: pl.DataFrame
    chance: pl.DataFrame
    settings: SignificanceSettings
    without_units: list[str] = field(default_factory=list)  # trial names
    misaligned: list[str] = field(default_factory=list)  # trial names evaluated on other units than their model's

    @classmethod
    def empty(cls, settings: SignificanceSettings | None = None) -> SignificanceTables:
        return cls(pl.DataFrame(schema=CELL_SCHEMA), pl.DataFrame(schema=PAIR_SCHEMA), pl.DataFrame(schema=CHANCE_SCHEMA),
                   settings or SignificanceSettings())


def _stable_seed(*parts: object) -> int:
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big")


@dataclass(frozen=True)
class _Replicates:
    """One trial's (or a seed mean's) value of one (target, task, metric) and its bootstrap replicates
    over the units; a seed mean also carries its seeds' spread."""

    value: float
    replicates: np.ndarray
    seeds: SeedSpread = SeedSpread(0.0, 1)


@dataclass
class _Stratum:
    """The units of one (model, target, task) shared by the trials compared, and their resampling counts."""

    counts: np.ndarray  # [resamples, units]
    ones: np.ndarray  # denominators: tokens per block, or 1 per document


def _perplexity_replicates(units: EvaluationUnits, language: str, stratum: _Stratum, block: int) -> dict[str, _Replicates]:
    losses = units.perplexity[language]
    nll = block_sums(losses.token_nll, block)
    tokens = losses.token_nll.size
    total = float(nll.sum())
    mean_loss = ratio_replicates(nll, stratum.ones, stratum.counts)
    # Bytes are not known per token: a replicate's bytes are taken in proportion to its tokens.
    per_byte = tokens / (losses.bytes * math.log(2))
    return {"bits_per_byte": _Replicates(total / (losses.bytes * math.log(2)), mean_loss * per_byte),
            "loss": _Replicates(total / tokens, mean_loss),
            "token_perplexity": _Replicates(math.exp(total / tokens), np.exp(mean_loss))}


def significance_tables(plan: PlanRecord, finished: set[str], load: Callable[[str], EvaluationUnits | None], settings: SignificanceSettings,
                        languages: list[str]) -> SignificanceTables:
    """`load(key)` returns a trial's EvaluationUnits, or None when it has none."""
    trials = [t for t in plan.trials if t.key in finished]
    loaded: dict[str, EvaluationUnits] = {}
    without = []
    for t in trials:
        units = load(t.key)
        if units is None:
            without.append(t.name)
        else:
            loaded[t.key] = units
    cell_rows, pair_rows, chance_rows, misaligned = [], [], [], set()
    level = 1 - settings.alpha
    for model in dict.fromkeys(t.model for t in trials):
        members = [t for t in trials if t.model == model and t.key in loaded]
        values, bad, units_count = _model_replicates(model, members, loaded, settings)
        misaligned |= bad
        groups: dict[tuple, list[PlannedTrial]] = {}
        for t in members:
            if t.key not in bad:
                groups.setdefault((t.pruner, t.sparsity, t.calibration or ""), []).append(t)
        # Per calibration group and cell: the seed mean and its replicates.
        means: dict[tuple, dict[tuple, _Replicates]] = {}
        for (pruner, sparsity, calibration), group in groups.items():
            group = sorted(group, key=lambda t: (t.seed is None, t.seed))
            cells = set.intersection(*[set(values[t.key]) for t in group])
            for cell in sorted(cells):
                per_seed = np.stack([values[t.key][cell].replicates for t in group])
                rng = np.random.default_rng(_stable_seed(settings.seed, model, pruner, sparsity, calibration, *cell))
                points = np.array([values[t.key][cell].value for t in group])
                mean = _Replicates(float(points.mean()), per_seed.mean(axis=0), seed_spread(points))
                means.setdefault((pruner, sparsity), {})[(calibration, *cell)] = mean
                low, high = interval(mean.replicates + seed_noise([mean.seeds], settings.resamples, rng), level) \
                    if units_count[cell[:2]] >= MIN_UNITS else (None, None)
                target, task, metric = cell
                cell_rows.append({"model": model, "pruner": pruner, "sparsity": sparsity, "calibration": calibration,
                                  "target": target, "task": task, "metric": metric, "value": mean.value,
                                  "ci_low": low, "ci_high": high, "seeds_tested": len(group),
                                  "units": units_count[(target, task)]})
        for (pruner, sparsity), cells in means.items():
            if pruner == "dense":
                continue
            by_cell: dict[tuple, dict[str, _Replicates]] = {}
            for (calibration, *cell), rep in cells.items():
                by_cell.setdefault(tuple(cell), {})[calibration] = rep
            for (target, task, metric), calibrations in sorted(by_cell.items()):
                ordered = sorted(calibrations, key=lambda c: (languages.index(c) if c in languages else len(languages), c))
                for a, b in itertools.combinations(ordered, 2):
                    rng = np.random.default_rng(_stable_seed(settings.seed, model, pruner, sparsity, target, task,
                                                             metric, a, b))
                    noise = seed_noise([calibrations[a].seeds, calibrations[b].seeds], settings.resamples, rng)
                    result = compare(calibrations[a].value, calibrations[b].value, calibrations[a].replicates,
                                     calibrations[b].replicates, level, noise)
                    units = units_count[(target, task)]
                    enough = units >= MIN_UNITS  # else a bootstrap claims far more than the units hold
                    pair_rows.append({"model": model, "pruner": pruner, "sparsity": sparsity, "target": target,
                                      "task": task, "metric": metric, "calibration_a": a, "calibration_b": b,
                                      "difference": result.difference, "ci_low": result.ci_low if enough else None,
                                      "ci_high": result.ci_high if enough else None,
                                      "p_value": result.p_value if enough else None, "units": units})
        chance_rows += _chance_rows(model, members, loaded, settings)
    return SignificanceTables(
        cells=pl.DataFrame(cell_rows, schema=CELL_SCHEMA), pairs=pl.DataFrame(pair_rows, schema=PAIR_SCHEMA),
        chance=pl.DataFrame(chance_rows, schema=CHANCE_SCHEMA), settings=settings, without_units=without,
        misaligned=sorted(t.name for t in trials if t.key in misaligned))


CELL_SCHEMA = {"model": pl.String, "pruner": pl.String, "sparsity": pl.String, "calibration": pl.String,
               "target": pl.String, "task": pl.String, "metric": pl.String, "value": pl.Float64,
               "ci_low": pl.Float64, "ci_high": pl.Float64, "seeds_tested": pl.Int64, "units": pl.Int64}
PAIR_SCHEMA = {"model": pl.String, "pruner": pl.String, "sparsity": pl.String, "target": pl.String,
               "task": pl.String, "metric": pl.String, "calibration_a": pl.String, "calibration_b": pl.String,
               "difference": pl.Float64, "ci_low": pl.Float64, "ci_high": pl.Float64, "p_value": pl.Float64,
               "units": pl.Int64}
CHANCE_SCHEMA = {"model": pl.String, "target": pl.String, "task": pl.String, "metric": pl.String,
                 "dense_value": pl.Float64, "chance": pl.Float64, "documents": pl.Int64, "p_above_chance": pl.Float64,
                 "informative": pl.Boolean}


def _model_replicates(model: str, members: list[PlannedTrial], loaded: dict[str, EvaluationUnits],
                      settings: SignificanceSettings) -> tuple[dict[str, dict[tuple, _Replicates]], set[str],
                                                               dict[tuple[str, str], int]]:
    """Every trial's replicates per (target, task, metric), with one set of resampling counts per
    (target, task) shared by all of the model's trials; the trials whose units differ from the rest
    (another text or document set: not pairable); and how many resampling units each (target, task)
    has (token blocks, documents; a target's task mean: its documents)."""
    values: dict[str, dict[tuple, _Replicates]] = {t.key: {} for t in members}
    bad: set[str] = set()
    strata: dict[tuple[str, str], _Stratum] = {}

    def stratum(target: str, task: str, reference: np.ndarray, denominators: np.ndarray) -> _Stratum:
        key = (target, task)
        if key not in strata:
            rng = np.random.default_rng(_stable_seed(settings.seed, model, target, task))
            strata[key] = _Stratum(resampling_counts(reference.size, settings.resamples, rng), denominators)
        return strata[key]

    # Perplexity: the token count must agree across the model's trials (the same evaluation tokens).
    for target in sorted({lang for t in members for lang in loaded[t.key].perplexity}):
        having = [t for t in members if target in loaded[t.key].perplexity]
        sizes = [loaded[t.key].perplexity[target].token_nll.size for t in having]
        common = max(set(sizes), key=sizes.count)
        block = block_length(common)
        ones = block_sums(np.ones(common), block)
        for t in having:
            if loaded[t.key].perplexity[target].token_nll.size != common:
                bad.add(t.key)
                continue
            s = stratum(target, "perplexity", ones, ones)
            for metric, rep in _perplexity_replicates(loaded[t.key], target, s, block).items():
                values[t.key][(target, "perplexity", metric)] = rep
    # Tasks: the same documents (doc_ids) across the model's trials.
    task_names = sorted({name for t in members for name in loaded[t.key].tasks})
    per_target: dict[str, list[str]] = {}
    for name in task_names:
        having = [t for t in members if name in loaded[t.key].tasks]
        ids = [loaded[t.key].tasks[name].doc_id.tobytes() for t in having]
        common = max(set(ids), key=ids.count)
        reference = loaded[next(t.key for t, i in zip(having, ids) if i == common)].tasks[name]
        s = stratum(reference.language, name, reference.doc_id, np.ones(reference.doc_id.size))
        per_target.setdefault(reference.language, []).append(name)
        for t, i in zip(having, ids):
            if i != common:
                bad.add(t.key)
                continue
            for metric, scores in loaded[t.key].tasks[name].metrics.items():
                scores = scores.astype(np.float64)
                values[t.key][(reference.language, name, metric)] = _Replicates(
                    float(scores.mean()), ratio_replicates(scores, s.ones, s.counts))
    # The mean over a target's tasks, each task resampled on its own (stratified).
    for target, names in per_target.items():
        for t in members:
            metrics = set.intersection(*[{m for (tg, task, m) in values[t.key] if tg == target and task == n}
                                         for n in names])
            for metric in metrics:
                parts = [values[t.key][(target, n, metric)] for n in names]
                values[t.key][(target, AVERAGE, metric)] = _Replicates(
                    float(np.mean([p.value for p in parts])), np.mean([p.replicates for p in parts], axis=0))
    for key in bad:
        values.pop(key, None)
    units = {key: s.counts.shape[1] for key, s in strata.items()}
    for target, names in per_target.items():
        units[(target, AVERAGE)] = sum(units[(target, n)] for n in names)
    return values, bad, units


def _chance_rows(model: str, members: list[PlannedTrial], loaded: dict[str, EvaluationUnits],
                 settings: SignificanceSettings) -> list[dict]:
    """Is the dense model above chance on each multiple-choice task, and on each target's tasks pooled?
    An exact test on its documents (engine.analyze.significance.above_chance_p)."""
    dense = [t for t in members if t.dense and t.key in loaded]
    if not dense:
        return []
    tasks = loaded[dense[0].key].tasks
    rows = []
    pooled: dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray]]] = {}
    for name, scores in sorted(tasks.items()):
        if not (scores.choices > 0).all():
            continue  # not multiple choice: no chance level
        chance = 1 / scores.choices.astype(np.float64)
        for metric, correct in scores.metrics.items():
            rows.append(_chance_row(model, scores.language, name, metric, correct, chance, settings))
            pooled.setdefault((scores.language, metric), []).append((correct, chance))
    for (target, metric), parts in sorted(pooled.items()):
        all_tasks = [n for n, sc in tasks.items() if sc.language == target and metric in sc.metrics]
        if len(parts) == len(all_tasks):
            rows.append(_chance_row(model, target, AVERAGE, metric, np.concatenate([c for c, _ in parts]),
                                    np.concatenate([p for _, p in parts]), settings))
    return rows


def _chance_row(model: str, target: str, task: str, metric: str, correct: np.ndarray, chance: np.ndarray,
                settings: SignificanceSettings) -> dict:
    p = above_chance_p(correct, chance)
    return {"model": model, "target": target, "task": task, "metric": metric,
            "dense_value": float(np.mean(correct)), "chance": float(np.mean(chance)), "documents": int(correct.size),
            "p_above_chance": p, "informative": None if math.isnan(p) else bool(p < settings.alpha)}


def units_loader(store) -> Callable[[str], EvaluationUnits | None]:
    """`load(key)` for a study store: the trial's EvaluationUnits, or None when it kept none."""
    artifacts = ArtifactReader(store)

    def load(key: str) -> EvaluationUnits | None:
        path = artifacts.path(key, UNITS_FILE)
        return load_units(path) if path is not None else None

    load.artifacts = artifacts  # keeps the temporary copies alive as long as the loader
    return load

