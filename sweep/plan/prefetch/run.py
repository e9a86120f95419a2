"""Running a prefetch plan on this machine: every item attempted, every failure recorded."""
from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from sweep.plan.prefetch.caches import cache_problems, hub_cache
from sweep.plan.prefetch.data import prefetch_calibration, prefetch_evaluation, prefetch_tasks, tokenizer_fingerprints
from sweep.plan.prefetch.items import PrefetchPlan, node_cache_dir
from sweep.plan.prefetch.models import prefetch_model
from sweep.plan.prefetch.results import ItemResult, NodeResult


class _Recorder:
    def __init__(self, node: NodeResult, on_item: Callable[[ItemResult], None] | None):
        self.node, self.on_item = node, on_item

    def add(self, item: ItemResult) -> ItemResult:
        self.node.items.append(item)
        if self.on_item is not None:
            self.on_item(item)
        return item


def run_prefetch(plan: PrefetchPlan, dry_run: bool = False,
                 on_item: Callable[[ItemResult], None] | None = None) -> NodeResult:
    """Fetches and builds everything in `plan` on this machine (only looks, with `dry_run`: no network).
    Each item is attempted; failures are recorded, never raised."""
    started = time.perf_counter()
    node = NodeResult(host=socket.gethostname(), dry_run=dry_run)
    ray_identity(node)
    record = _Recorder(node, on_item)
    cache_dir = plan.cache_dir if plan.cache_dir is not None else node_cache_dir()
    node.trial_cache = str(cache_dir)
    if any(m.hub for m in plan.models):
        node.hub_cache = str(hub_cache())
    problems = cache_problems(plan)
    if problems:
        for what, problem in problems:
            record.add(ItemResult("cache", what, "failed", error=f"cannot write: {problem}"))
        node.seconds = time.perf_counter() - started
        return node
    if not dry_run and not sys.stderr.isatty():
        _quiet_progress_bars(datasets_too=bool(plan.tasks))

    tokenizers: dict[str, Any] = {}
    for model in plan.models:
        item, tokenizer = prefetch_model(model, dry_run)
        record.add(item)
        if tokenizer is not None:
            tokenizers[model.label] = tokenizer
    fingerprints = tokenizer_fingerprints(tokenizers)
    for cal in plan.calibration:
        for item in prefetch_calibration(cal, tokenizers, fingerprints, cache_dir, dry_run):
            record.add(item)
    for ev in plan.evaluation:
        for item in prefetch_evaluation(ev, tokenizers, fingerprints, cache_dir, dry_run):
            record.add(item)
    if plan.local_evaluation is not None:
        record.add(ItemResult("evaluation", "perplexity text", "local", detail=f"read from {plan.local_evaluation} "
                                                                           "at trial time; nothing to fetch"))
    if plan.tasks:
        for item in prefetch_tasks(plan.tasks, dry_run):
            record.add(item)
    node.seconds = time.perf_counter() - started
    return node


def ray_identity(node: NodeResult) -> None:
    ray = sys.modules.get("ray")  # only inside a Ray worker or driver; never imported for this
    try:
        if ray is not None and ray.is_initialized():
            node.node_id = ray.get_runtime_context().get_node_id()
            node.address = ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - identity is best effort outside Ray
        pass


def _quiet_progress_bars(datasets_too: bool) -> None:
    """No download or 'Generating split' bars in a log file (one line per item says it all)."""
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    if datasets_too:
        import datasets

        datasets.disable_progress_bars()
