"""One trial: calibrate -> prune -> evaluate -> restore, on a model that is already loaded.

`run_trial(config, loaded)` is what a Ray actor, a test or a notebook calls alike. Small metrics come
back in the result; large artifacts (masks) are written to files and referenced by path. The dense
weights are restored whatever happens, so the next trial starts from the same model.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.analyze.collect import StatisticsCollector
from engine.data.calibration import WindowRequest, calibration_set, document_separator
from engine.data.sources import TextSourceConfig, documents
from engine.evaluate.scorers import DEFAULT_SCORER
from engine.evaluate.suite import language_tokens, perplexity_of_tokens
from engine.evaluate.tasks import TaskRequest, run_tasks
from engine.evaluate.text_cache import evaluation_cache_path, read_evaluation_tokens, write_evaluation_tokens
from engine.evaluate.units import UNITS_FILE, EvaluationUnits
from engine.languages import get_language
from engine.models import ModelSource, load_model
from engine.prune.block_inputs import ReplayMismatch
from engine.prune.mask_io import save_masks
from engine.prune.pruners import make_pruner
from engine.prune.sequential import prune_sequentially
from engine.prune.sparsity import parse_sparsity
from engine.save import (
    CardCalibration,
    CardInputs,
    base_licence,
    card_metrics,
    local_hub_id,
    model_card,
    save_pruned_model,
)
from engine.snapshot import DenseSnapshot


class TrialFailed(RuntimeError):
    """The trial ran but its result is not usable (e.g. a non-finite perplexity); `reason` says why."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class CalibrationConfig:
    source: TextSourceConfig
    weights: tuple[tuple[str, float], ...]
    samples: int
    seq_len: int
    seed: int
    source_fingerprint: str | None = None
    sampling: str = "packed"  # `published` (one window inside each long document) or `packed`
    separator: str | None = None  # packed: the document separator token; None: chosen from the tokenizer


@dataclass(frozen=True)
class PruningConfig:
    method: str
    sparsity: str
    params: dict = field(default_factory=dict)
    targets: tuple[str, ...] | None = None


@dataclass(frozen=True)
class PerplexityConfig:
    source: TextSourceConfig
    window: int
    max_tokens: int | None = None


@dataclass(frozen=True)
class TaskConfig:
    name: str  # resolved lm-eval task name
    language: str
    shots: int = 0
    limit: int | float | None = None


@dataclass(frozen=True)
class EvaluationConfig:
    languages: tuple[str, ...]
    perplexity: PerplexityConfig | None = None
    tasks: tuple[TaskConfig, ...] = ()
    include_path: Path | None = None
    batch_size: int = 8
    # How lm-eval's loglikelihood requests are computed: `shared_prefix` (each context once) or `lm_eval`
    # (its HFLM, one full sequence per request); the metrics are lm-eval's either way.
    task_scorer: str = DEFAULT_SCORER


@dataclass(frozen=True)
class TrialConfig:
    key: str
    name: str
    evaluation: EvaluationConfig
    pruning: PruningConfig | None = None  # None: the dense baseline
    calibration: CalibrationConfig | None = None
    artifacts_dir: Path | None = None
    save_masks: bool = False  # full bit-packed masks (masks.safetensors)
    mask_sample: int | None = None  # or each mask at this many fixed positions (mask_sample.safetensors)
    collect_statistics: bool = False  # per-language neuron activity and hidden means (the LAPE and subspace analyses)
    token_sample: int = 0  # with collect_statistics: hidden states of this many sampled tokens per language and layer
    layer_error_tokens: int | None = None  # pruned trials: each linear's output error on this many tokens per language
    save_model: bool = False  # pruned trials: the pruned model in Hugging Face format under artifacts_dir/model
    device: str = "cpu"
    cache_dir: Path | None = None


@dataclass
class LoadedModel:
    source: ModelSource
    model: torch.nn.Module
    tokenizer: object
    snapshot: DenseSnapshot
    seconds: float
    _texts: dict = field(default_factory=dict)

    def evaluation_tokens(self, config: PerplexityConfig, language: str,
                          cache_dir: Path | None = None) -> tuple[list[int], int]:
        """The same token ids (and the UTF-8 bytes they spell) for every trial: the documents in stored
        order, read and tokenized once per loaded model rather than once per trial (and, for a hub
        source, once per cache directory: see `evaluation_tokens`)."""
        key = (config, language)
        if key not in self._texts:
            self._texts[key] = evaluation_tokens(config, language, self.tokenizer, cache_dir)
        return self._texts[key]


def evaluation_tokens(config: PerplexityConfig, language: str, tokenizer,
                      cache_dir: Path | None = None) -> tuple[list[int], int]:
    """A language's evaluation text as (token ids, UTF-8 bytes). Local text is read from its files; hub
    text is streamed once and then read from `<cache_dir>/evaluation` (what `sweep prefetch` fills, so
    an offline worker never streams it)."""

    if config.source.kind == "local":
        texts = list(documents(config.source, get_language(language), seed=None))
        return language_tokens(tokenizer, texts, config.max_tokens)
    path = evaluation_cache_path(config.source, tokenizer, language, config.max_tokens, cache_dir)
    if path is not None:
        cached = read_evaluation_tokens(path)
        if cached is not None:
            return cached
    ids, n_bytes = language_tokens(tokenizer, _first_documents(config, language, tokenizer), config.max_tokens)
    if path is not None:
        write_evaluation_tokens(path, ids, n_bytes, language)
    return ids, n_bytes


def _first_documents(config: PerplexityConfig, language: str, tokenizer) -> list[str]:
    """Hub evaluation text: documents in stored order until `max_tokens` is covered (all if unset)."""
    texts, tokens = [], 0
    for text in documents(config.source, get_language(language), seed=None):
        texts.append(text)
        tokens += len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if config.max_tokens is not None and tokens >= config.max_tokens:
            break
    return texts


def load(source: ModelSource) -> LoadedModel:
    started = time.perf_counter()
    model, tokenizer = load_model(source)
    return LoadedModel(source, model, tokenizer, DenseSnapshot(model), time.perf_counter() - started)


def run_trial(config: TrialConfig, loaded: LoadedModel) -> dict:
    timings: dict[str, float] = {}
    result: dict = {"key": config.key, "name": config.name, "dense": config.pruning is None}
    try:
        if config.pruning is not None:
            result["pruning"] = _prune(config, loaded, timings)
        result["metrics"] = _evaluate(config, loaded, timings, result)
        if config.save_model and config.pruning is not None and config.artifacts_dir is not None:
            started = time.perf_counter()
            result["model_path"] = str(_save_model(config, loaded, result))
            timings["save_model"] = time.perf_counter() - started
    finally:
        started = time.perf_counter()
        loaded.snapshot.restore()
        timings["restore"] = time.perf_counter() - started
    result["timings"] = timings
    return result


def _save_model(config: TrialConfig, loaded: LoadedModel, result: dict) -> Path:
    cal = config.calibration
    read = None if cal is None else CardCalibration(cal.weights, cal.samples, cal.seq_len, cal.seed, cal.sampling,
                                                    cal.source.dataset if cal.source.kind == "hub" else None)
    calibration = None if read is None else {"languages": read.label, "samples": read.samples, "seq_len": read.seq_len,
                                             "seed": read.seed}
    base = loaded.source.name_or_path
    evaluated = config.evaluation.perplexity.source if config.evaluation.perplexity else None
    card = model_card(CardInputs(
        name=config.name, key=config.key, base=base, base_revision=loaded.source.revision,
        base_hub_id=local_hub_id(Path(base)) if Path(base).is_dir() else None,
        method=config.pruning.method, sparsity=config.pruning.sparsity,
        calibration=read,
        evaluation_languages=tuple(config.evaluation.languages),
        metrics=card_metrics(result.get("metrics") or [], evaluated),
        licence=base_licence(base, loaded.source.revision),
        datasets=tuple(dict.fromkeys(source.dataset for source in (cal.source if cal else None, evaluated)
                                     if source is not None and source.kind == "hub" and source.dataset))))
    details = {"key": config.key, "name": config.name, "base": base,
               "revision": loaded.source.revision, "pruning": result.get("pruning"), "calibration": calibration,
               "metrics": result.get("metrics")}
    return save_pruned_model(loaded.model, loaded.tokenizer, Path(config.artifacts_dir) / "model", card, details)


def _prune(config: TrialConfig, loaded: LoadedModel, timings: dict) -> dict:
    pruning = config.pruning
    pruner = make_pruner(pruning.method, pruning.params)
    calibration = None
    sampling: dict = {}
    if pruner.needs_inputs:
        if config.calibration is None:
            raise ValueError(f"{pruning.method} needs calibration data; the trial has none")
        cal = config.calibration
        started = time.perf_counter()
        calibration = calibration_set(cal.source, loaded.tokenizer, cal.weights,
                                      WindowRequest(cal.samples, cal.seq_len, cal.seed, cal.sampling, cal.separator),
                                      config.cache_dir, cal.source_fingerprint)
        timings["calibration"] = time.perf_counter() - started
        sampling = {"calibration_sampling": cal.sampling}
        if cal.sampling == "packed":  # what joined the documents: a pretraining boundary, never a chat turn end
            separator = document_separator(loaded.tokenizer, cal.separator)
            sampling["calibration_separator"] = {"token": separator.token, "id": separator.id, "rule": separator.rule}
    started = time.perf_counter()
    try:
        report = prune_sequentially(loaded.model, pruner, parse_sparsity(pruning.sparsity), calibration,
                                    targets=list(pruning.targets) if pruning.targets else None, device=config.device,
                                    keep_masks=config.save_masks, mask_sample=config.mask_sample)
    except ReplayMismatch as err:
        raise TrialFailed(str(err)) from None  # the architecture, not chance: a retry would fail the same way
    timings["pruning"] = time.perf_counter() - started
    summary = {
        "method": report.method,
        "sparsity": report.sparsity,
        "calibration_tokens": report.calibration_tokens,
        "statistics_computed": report.statistics_computed,
        "layers_pruned": len(report.layers),
        "mean_layer_sparsity": sum(r.sparsity for r in report.layers) / max(1, len(report.layers)),
        "extra_dampening": report.extra_dampening,
        "peak_accelerator_bytes": report.peak_accelerator_bytes,
        **sampling,
    }
    if config.save_masks and config.artifacts_dir is not None:
        path = Path(config.artifacts_dir) / "masks.safetensors"
        save_masks(path, report.masks, {"trial": config.key, "method": report.method, "sparsity": report.sparsity})
        summary["masks_path"] = str(path)
    if config.mask_sample and config.artifacts_dir is not None:
        path = Path(config.artifacts_dir) / "mask_sample.safetensors"
        save_masks(path, report.mask_samples, {"trial": config.key, "method": report.method,
                                               "sparsity": report.sparsity, "sample": str(config.mask_sample)})
        summary["mask_sample_path"] = str(path)
    return summary


def _evaluate(config: TrialConfig, loaded: LoadedModel, timings: dict, result: dict) -> list[dict]:
    ev = config.evaluation
    rows: list[dict] = []
    units = EvaluationUnits()
    if ev.perplexity is not None:
        started = time.perf_counter()
        errors = config.layer_error_tokens if config.pruning is not None else None
        collector = None
        if config.collect_statistics or errors:
            collector = StatisticsCollector(loaded.model, neurons=config.collect_statistics,
                                            dense_weight=loaded.snapshot.weight if errors else None,
                                            error_tokens=errors or 0, token_sample=config.token_sample)
        for lang in ev.languages:
            ids, n_bytes = loaded.evaluation_tokens(ev.perplexity, lang, config.cache_dir)
            with collector.collect(lang) if collector else contextlib.nullcontext():
                res = perplexity_of_tokens(loaded.model, loaded.tokenizer, ids, n_bytes, ev.perplexity.window,
                                           ev.batch_size)
            if not (math.isfinite(res.bits_per_byte) and math.isfinite(res.token_perplexity)):
                raise TrialFailed(f"non-finite perplexity in {lang} (NLL {res.nll}); not averaged in")
            for metric in ("bits_per_byte", "token_perplexity", "loss"):
                rows.append({"language": lang, "task": "perplexity", "metric": metric,
                             "value": getattr(res, metric), "tokens": res.tokens, "bytes": res.bytes,
                             "window": res.window, "higher_is_better": False})
            units.add_perplexity(lang, res)
        timings["perplexity"] = time.perf_counter() - started
        if collector is not None and config.artifacts_dir is not None:
            path = collector.save(Path(config.artifacts_dir) / "statistics.safetensors", {"trial": config.key})
            result["statistics_path"] = str(path)
    if ev.tasks:

        started = time.perf_counter()
        requests = [TaskRequest(t.name, t.shots, t.limit) for t in ev.tasks]
        out = run_tasks(loaded.model, loaded.tokenizer, requests, include_path=ev.include_path,
                        batch_size=ev.batch_size, device=config.device, scorer=ev.task_scorer)
        by_name = {t.name: t for t in ev.tasks}
        for name, task in out["tasks"].items():
            if name not in by_name:
                continue  # a group's subtasks are reported under the names the study asked for
            units.add_task(name, by_name[name].language, task.get("units"))
            for metric, value in task["metrics"].items():
                rows.append({"language": by_name[name].language, "task": name, "metric": metric, "value": value,
                             "stderr": task.get("stderr", {}).get(metric),
                             "higher_is_better": task.get("higher_is_better", {}).get(metric),
                             "samples": task.get("samples"), "shots": by_name[name].shots,
                             "lm_eval_version": out["lm_eval_version"], "task_version": task.get("version"),
                             "task_scorer": out["scorer"],
                             "task_hash": task.get("task_hash"), "config_hash": task.get("config_hash")})
        timings["tasks"] = time.perf_counter() - started
    if config.artifacts_dir is not None and not units.empty:
        result["units_path"] = str(units.save(Path(config.artifacts_dir) / UNITS_FILE, {"trial": config.key}))
    return rows
