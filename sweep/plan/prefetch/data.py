"""Calibration windows, evaluation tokens and lm-eval task data, built through the functions trials call."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from engine.evaluate.tasks import flatten_tasks, manager_for
from engine.evaluate.text_cache import evaluation_cache_path
from sweep.plan.prefetch.items import CalibrationItem, EvaluationItem, TaskItem
from sweep.plan.prefetch.results import ItemResult

LOCAL_DATASET_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas"}


def tokenizer_fingerprints(tokenizers: dict[str, Any]) -> dict[str, str]:
    from engine.data.calibration import tokenizer_fingerprint

    return {label: tokenizer_fingerprint(tok) for label, tok in tokenizers.items()}


def _by_tokenizer(models: tuple[str, ...], fingerprints: dict[str, str]) -> tuple[dict[str, list[str]], list[str]]:
    groups: dict[str, list[str]] = {}
    missing = []
    for label in models:
        if label in fingerprints:
            groups.setdefault(fingerprints[label], []).append(label)
        else:
            missing.append(label)
    return groups, missing


def _file_bytes(path: Path | None) -> int:
    try:
        return path.stat().st_size if path is not None else 0
    except OSError:
        return 0


def _per_tokenizer(kind: str, item_name: str, models: tuple[str, ...], tokenizers: dict, fingerprints: dict,
                   dry_run: bool, detail, cache_path, build, what: str) -> list[ItemResult]:
    """One cache file per distinct tokenizer among `models`: reported cached, would-build, built (with
    `build`'s detail) or failed. `detail(labels)`, `cache_path(tokenizer)` and `build(tokenizer)` say
    what the item is; `what` names it in an error."""
    groups, missing = _by_tokenizer(models, fingerprints)
    out = []
    if missing:
        out.append(ItemResult(kind, item_name, "skipped",
                              detail=f"for {', '.join(missing)}: the model's tokenizer is not available"))
    for labels in groups.values():
        tokenizer = tokenizers[labels[0]]
        started = time.perf_counter()
        try:
            path = cache_path(tokenizer)
        except Exception as err:  # noqa: BLE001 - e.g. no document separator for this tokenizer
            out.append(ItemResult(kind, item_name, "failed", error=f"{what} for {', '.join(labels)}: "
                                                                  f"{type(err).__name__}: {str(err)[:300]}"))
            continue
        if path.is_file():
            out.append(ItemResult(kind, item_name, "cached", _file_bytes(path), detail=detail(labels)))
            continue
        if dry_run:
            out.append(ItemResult(kind, item_name, "would build", detail=detail(labels)))
            continue
        try:
            built = build(tokenizer)
        except Exception as err:  # noqa: BLE001 - not enough text, a missing language, the hub unreachable
            out.append(ItemResult(kind, item_name, "failed", seconds=time.perf_counter() - started,
                                  error=f"{what} for {', '.join(labels)}: "
                                        f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"))
            continue
        out.append(ItemResult(kind, item_name, "built", _file_bytes(path), time.perf_counter() - started,
                              detail=f"{built}, tokenizer of {', '.join(labels)}"))
    return out


def prefetch_calibration(item: CalibrationItem, tokenizers: dict, fingerprints: dict, cache_dir: Path,
                          dry_run: bool) -> list[ItemResult]:
    from engine.data.calibration import WindowRequest, calibration_cache_path, calibration_set

    cal = item.config
    request = WindowRequest(cal.samples, cal.seq_len, cal.seed, cal.sampling, cal.separator)
    size = f"{cal.samples} x {cal.seq_len} tokens, {cal.sampling}"

    def build(tokenizer) -> str:
        calibration_set(cal.source, tokenizer, cal.weights, request, cache_dir, cal.source_fingerprint)
        return size

    return _per_tokenizer(
        "calibration", item.name, item.models, tokenizers, fingerprints, dry_run,
        detail=lambda labels: f"{size}, tokenizer of {', '.join(labels)}",
        cache_path=lambda tokenizer: calibration_cache_path(cal.source, tokenizer, cal.weights, request, cache_dir,
                                                            cal.source_fingerprint),
        build=build, what=f"calibration {item.mix} seed {item.seed}")


def prefetch_evaluation(item: EvaluationItem, tokenizers: dict, fingerprints: dict, cache_dir: Path,
                         dry_run: bool) -> list[ItemResult]:
    from engine.trial import evaluation_tokens

    config = item.config

    def build(tokenizer) -> str:
        ids, _ = evaluation_tokens(config, item.language, tokenizer, cache_dir)
        return f"{len(ids)} tokens"

    return _per_tokenizer(
        "evaluation", item.name, item.models, tokenizers, fingerprints, dry_run,
        detail=lambda labels: f"up to {config.max_tokens or 'all'} tokens, tokenizer of {', '.join(labels)}",
        cache_path=lambda tokenizer: evaluation_cache_path(config.source, tokenizer, item.language,
                                                           config.max_tokens, cache_dir),
        build=build, what=f"evaluation text {item.language}")


# lm-eval tasks -----------------------------------------------------------------------------------
def _dataset_bytes(task) -> int:
    dataset = getattr(task, "dataset", None)
    splits = dataset.values() if hasattr(dataset, "values") else ([dataset] if dataset is not None else [])
    total = 0
    for split in splits:
        for entry in getattr(split, "cache_files", None) or []:
            total += _file_bytes(Path(entry["filename"]))
    return total


def _task_is_local(task) -> bool:
    path = getattr(task.config, "dataset_path", None)
    return path in LOCAL_DATASET_BUILDERS or (isinstance(path, str) and os.path.isdir(path))


def prefetch_tasks(tasks: tuple[TaskItem, ...], dry_run: bool) -> list[ItemResult]:
    from lm_eval.tasks import get_task_dict

    names = [t.name for t in tasks]
    include = tasks[0].include_path
    started = time.perf_counter()
    try:
        manager, local_only = manager_for(names, include)
    except Exception as err:  # noqa: BLE001
        return [ItemResult("tasks", ", ".join(names)[:44], "failed", seconds=time.perf_counter() - started,
                           error=f"lm-eval tasks: {type(err).__name__}: {str(err).splitlines()[0][:300]}")]
    out = []
    for task in tasks:
        if dry_run:
            status = "local" if local_only else "would load"
            detail = f"defined under {include}" if local_only else "its dataset, through lm-eval"
            out.append(ItemResult("tasks", task.name, status, detail=detail))
            continue
        started = time.perf_counter()
        try:
            loaded = flatten_tasks(get_task_dict([task.name], manager))
        except Exception as err:  # noqa: BLE001 - a gated or missing dataset, the hub unreachable
            out.append(ItemResult("tasks", task.name, "failed", seconds=time.perf_counter() - started,
                                  error=f"lm-eval task {task.name}: {type(err).__name__}: "
                                        f"{str(err).splitlines()[0][:300]}"))
            continue
        local = local_only or all(_task_is_local(t) for t in loaded)
        size = sum(_dataset_bytes(t) for t in loaded)
        out.append(ItemResult("tasks", task.name, "local" if local else "ready", size, time.perf_counter() - started,
                              detail=f"{len(loaded)} task(s)" + (", local data files" if local else
                                                                 ", data in the datasets cache")))
    return out
