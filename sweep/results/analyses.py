"""The three analyses across a study's trials (definitions in docs/analyses.md), from the artifacts each
trial left in the study directory: bit-packed masks (masks.safetensors) and per-language statistics
(statistics.safetensors). Trials without them (analyses off when they ran) are listed, not guessed.

Tables:
- mask_overlap:  (model, pruner, sparsity, seed, calibration a, calibration b, layer) -> IoU of the pruned
                 positions, per layer over all its matrices (matrix "all") and per matrix
- neurons:       per trial and threshold_from (own, dense; one row "both" where they agree) ->
                 language-specific neurons of the dense model that survive, vanish, appear; mean LAPE;
                 and per language the neurons assigned to it (Tang et al.'s identify.py)
- lape_hist:     per trial (dense included) -> histogram of LAPE over the active neurons
- layer_error:   (pruned trial, target language, layer, matrix) -> ||WX - W'X||^2 / ||WX||^2 on the
                 first held-out tokens of the target language
- snr:           (pruned trial, target language, layer, variant) -> SNR in dB of the pruned hidden states
                 against the dense ones in LSAR's language-specific subspace (rank r) and its complement;
                 variant "centroid" (per-language means) or "token" (the sampled tokens, where both have them)
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from engine.analyze.collect import load_statistics
from engine.analyze.metrics import (
    activation_probability,
    iou,
    language_specific,
    lape,
    lape_histogram,
    neuron_changes,
    neuron_summary,
    packed_iou,
    probability_threshold,
    subspace_snrs,
    token_subspace_snrs,
)
from sweep.store.artifacts import ArtifactReader
from sweep.store.records import PlannedTrial, PlanRecord
from sweep.store.study_store import StudyStore

LAYER = re.compile(r"(?:^|\.)(\d+)\.(.+)$")
LAPE_BINS = 24


@dataclass
class AnalysisSettings:
    lape_quantile: float = 0.01  # Tang et al.'s top_rate: the share of all neurons selected by lowest LAPE
    activation_quantile: float = 0.95  # their filter_rate and activation_bar_ratio (order statistic)
    threshold_from: str = "own"  # "own": each model's own threshold; "dense": the dense model's for all
    subspace_rank: int | None = None


@dataclass
class AnalysisTables:
    mask_overlap: pl.DataFrame
    neurons: pl.DataFrame
    lape_hist: pl.DataFrame
    snr: pl.DataFrame
    layer_error: pl.DataFrame = field(default_factory=pl.DataFrame)
    without_masks: list[str] = field(default_factory=list)  # trial names
    without_statistics: list[str] = field(default_factory=list)


def _packed_masks(path: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def mask_overlap(trials: list[PlannedTrial], artifacts: ArtifactReader, languages: list[str]) -> tuple[pl.DataFrame, list[str]]:
    rows, missing = [], []
    single = [t for t in trials if not t.dense and t.calibration in languages]
    groups: dict[tuple, list[PlannedTrial]] = {}
    for t in single:
        groups.setdefault((t.model, t.pruner, t.sparsity, t.seed), []).append(t)
    for (model, pruner, sparsity, seed), members in groups.items():
        masks = {}
        kinds = {}
        for t in members:
            for name, kind in (("masks.safetensors", "full"), ("mask_sample.safetensors", "sampled")):
                path = artifacts.path(t.key, name)
                if path is not None:
                    masks[t.calibration], kinds[t.calibration] = _packed_masks(path), kind
                    break
            else:
                missing.append(t.name)
        ordered = sorted(masks, key=languages.index)
        for a, b in itertools.combinations(ordered, 2):
            if kinds[a] != kinds[b]:
                continue  # a full mask and a sample of another: not comparable bit for bit
            per_layer: dict[int, list[int]] = {}
            for name in sorted(set(masks[a]) & set(masks[b])):
                inter, union = packed_iou(masks[a][name], masks[b][name])
                match = LAYER.search(name)
                layer, matrix = (int(match.group(1)), match.group(2)) if match else (-1, name)
                rows.append((model, pruner, sparsity, seed, a, b, layer, matrix, inter, union, iou(inter, union)))
                total = per_layer.setdefault(layer, [0, 0])
                total[0] += inter
                total[1] += union
            for layer, (inter, union) in sorted(per_layer.items()):
                rows.append((model, pruner, sparsity, seed, a, b, layer, "all", inter, union, iou(inter, union)))
    schema = {"model": pl.String, "pruner": pl.String, "sparsity": pl.String, "seed": pl.Int64,
              "calibration_a": pl.String, "calibration_b": pl.String, "layer": pl.Int64, "matrix": pl.String,
              "intersection": pl.Int64, "union": pl.Int64, "iou": pl.Float64}
    return pl.DataFrame(rows, schema=schema, orient="row"), missing


def _statistics(trials: list[PlannedTrial], artifacts: ArtifactReader) -> tuple[dict[str, tuple[list[str], dict]], list[str]]:
    found, missing = {}, []
    for t in trials:
        path = artifacts.path(t.key, "statistics.safetensors")
        if path is None:
            missing.append(t.name)
        else:
            found[t.key] = load_statistics(path)
    return found, missing


def neuron_tables(trials: list[PlannedTrial], stats: dict, settings: AnalysisSettings) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Tang et al.'s language-specific neurons of every model (docs/analyses.md), under both threshold
    readings: the configured `threshold_from` first, the other after it; one row `both` where the two
    thresholds are equal (always for the dense model), since the selections then are too."""
    if settings.threshold_from not in ("own", "dense"):
        raise ValueError(f"threshold_from must be 'own' or 'dense', not {settings.threshold_from!r}")
    readings = [settings.threshold_from, "dense" if settings.threshold_from == "own" else "own"]
    neuron_rows, hist_rows = [], []
    dense_by_model = {t.model: t for t in trials if t.dense and "active" in stats.get(t.key, (0, {}))[1]}
    for model, dense_trial in dense_by_model.items():
        languages, dense = stats[dense_trial.key]
        p_dense = activation_probability(dense["active"], dense["tokens"])
        dense_threshold = probability_threshold(p_dense, settings.activation_quantile)
        specific_dense = language_specific(p_dense, settings.lape_quantile, dense_threshold).any(dim=0)
        for t in [dense_trial, *[t for t in trials if t.model == model and not t.dense and t.key in stats]]:
            t_languages, values = stats[t.key]
            if t_languages != languages or "active" not in values:
                continue  # measured on other target languages: not comparable
            p = activation_probability(values["active"], values["tokens"])
            entropy = lape(p)
            thresholds = {"own": probability_threshold(p, settings.activation_quantile), "dense": dense_threshold}
            same = thresholds["own"] == thresholds["dense"]
            for reading in readings[:1] if same else readings:
                threshold = thresholds[reading]
                assigned = language_specific(p, settings.lape_quantile, threshold)
                summary = neuron_summary(entropy, assigned)
                neuron_rows.append({**_fields(t), "threshold_from": "both" if same else reading,
                                    **neuron_changes(specific_dense, assigned.any(dim=0)), "threshold": threshold,
                                    "mean_lape": summary.mean_lape, "active_neurons": summary.active_neurons,
                                    **{f"specific_{lang}": n for lang, n in zip(languages, summary.specific_per_language)}})
            for low, high, neurons in lape_histogram(entropy, len(languages), LAPE_BINS):
                hist_rows.append({**_fields(t), "bin_low": low, "bin_high": high, "neurons": neurons})
    return pl.DataFrame(neuron_rows, infer_schema_length=None), pl.DataFrame(hist_rows, infer_schema_length=None)


def snr_table(trials: list[PlannedTrial], stats: dict, settings: AnalysisSettings) -> pl.DataFrame:
    rows = []
    dense_by_model = {t.model: t for t in trials if t.dense and "hidden_mean" in stats.get(t.key, (0, {}))[1]}
    for model, dense_trial in dense_by_model.items():
        languages, dense = stats[dense_trial.key]
        for t in trials:
            if (t.model != model or t.dense or t.key not in stats or stats[t.key][0] != languages
                    or "hidden_mean" not in stats[t.key][1]):
                continue
            pruned = stats[t.key][1]
            for i, layer, specific, agnostic, rank in subspace_snrs(dense["hidden_mean"], pruned["hidden_mean"],
                                                                   settings.subspace_rank):
                rows.append({**_fields(t), "target": languages[i], "layer": layer, "variant": "centroid",
                             "rank": rank, "tokens": int(pruned["tokens"][i]), "snr_specific_db": specific,
                             "snr_agnostic_db": agnostic})
            counts = _aligned_token_samples(dense, pruned)
            if counts is None:
                continue  # no sample in one of them (older statistics, token_sample 0) or not the same tokens
            for i, layer, specific, agnostic, rank in token_subspace_snrs(
                    dense["hidden_mean"], dense["token_sample"], pruned["token_sample"], counts, settings.subspace_rank):
                rows.append({**_fields(t), "target": languages[i], "layer": layer, "variant": "token",
                             "rank": rank, "tokens": counts[i], "snr_specific_db": specific,
                             "snr_agnostic_db": agnostic})
    schema = {"target": pl.String, "layer": pl.Int64, "variant": pl.String, "rank": pl.Int64, "tokens": pl.Int64,
              "snr_specific_db": pl.Float64, "snr_agnostic_db": pl.Float64}
    return pl.DataFrame(rows, infer_schema_length=None, schema_overrides=schema) if rows else pl.DataFrame()


def _aligned_token_samples(dense: dict, pruned: dict) -> list[int] | None:
    """Per language, how many sampled tokens the dense and the pruned trial share (the same token ids at
    the same positions); None when either has no sample or the samples differ."""
    names = ("token_sample", "token_sample_count", "token_sample_ids", "token_sample_positions")
    if not all(name in dense and name in pruned for name in names):
        return None
    if dense["token_sample"].shape != pruned["token_sample"].shape or not all(
            dense[name].equal(pruned[name]) for name in names[1:]):
        return None
    return dense["token_sample_count"].tolist()


def layer_error_table(trials: list[PlannedTrial], stats: dict) -> pl.DataFrame:
    rows = []
    for t in trials:
        if t.dense or t.key not in stats or "layer_error" not in stats[t.key][1]:
            continue
        languages, values = stats[t.key]
        errors = values["layer_error"]
        for i, target in enumerate(languages):
            for j, name in enumerate(values["linear_layers"]):
                error, reference = float(errors[i, j, 0]), float(errors[i, j, 1])
                match = LAYER.search(name)
                rows.append({**_fields(t), "target": target, "layer": int(match.group(1)) if match else -1,
                             "matrix": match.group(2) if match else name,
                             "relative_error": error / reference if reference > 0 else None})
    return pl.DataFrame(rows, infer_schema_length=None)


def _fields(t: dict) -> dict:
    return {"key": t.key, "name": t.name, "model": t.model, "pruner": t.pruner, "sparsity": t.sparsity,
            "calibration": t.calibration or "", "seed": t.seed}


def run_analyses(study_dir: Path | str, plan: PlanRecord, finished: set[str], settings: AnalysisSettings,
                 masks: bool, neurons: bool, subspace: bool) -> AnalysisTables:
    store = StudyStore(study_dir)
    artifacts = ArtifactReader(store)
    languages = list(plan.languages)
    trials = [t for t in plan.trials if t.key in finished]
    overlap, no_masks = mask_overlap(trials, artifacts, languages) if masks else (pl.DataFrame(), [])
    stats, no_stats = _statistics(trials, artifacts) if (neurons or subspace or masks) else ({}, [])
    neuron_df, hist_df = neuron_tables(trials, stats, settings) if neurons else (pl.DataFrame(), pl.DataFrame())
    snr_df = snr_table(trials, stats, settings) if subspace else pl.DataFrame()
    errors = layer_error_table(trials, stats) if masks else pl.DataFrame()
    return AnalysisTables(overlap, neuron_df, hist_df, snr_df, errors, no_masks, no_stats)
