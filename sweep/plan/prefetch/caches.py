"""The caches a prefetch fills and a trial reads: where they are (`--cache-dir`), and whether they can be written."""
from __future__ import annotations

import os
from pathlib import Path

from sweep.plan.prefetch.items import PrefetchPlan, node_cache_dir

# `--cache-dir DIR` for `sweep prefetch` and `sweep run`: the caches trials read, under one folder.
# HF_HOME is left alone: it also holds the login token (`hf auth login`).
CACHE_ENV_VARS = ("HF_HUB_CACHE", "HF_DATASETS_CACHE", "SWEEP_CACHE_DIR")
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def cache_env(root: str | Path) -> dict[str, str]:
    """The environment that puts every cache a trial reads under `root`."""
    root = Path(os.path.abspath(Path(root).expanduser()))
    return {"HF_HUB_CACHE": str(root / "huggingface" / "hub"),
            "HF_DATASETS_CACHE": str(root / "huggingface" / "datasets"),
            "SWEEP_CACHE_DIR": str(root / "sweep")}


def hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def datasets_cache() -> Path:
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE)


def writable_problem(path: Path) -> str | None:
    """Why files cannot be created under `path` (its nearest existing folder), or None. Writes nothing."""
    path = Path(os.path.abspath(Path(path).expanduser()))
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            return f"{path}: no existing parent folder"
        probe = probe.parent
    if not probe.is_dir():
        return f"{path}: {probe} is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{path}: {probe} is not writable"
    return None


def cache_problems(plan: PrefetchPlan) -> list[tuple[str, str]]:
    """(which cache, why) for each cache this plan would write into that cannot be written."""
    out = []
    if plan.calibration or plan.evaluation:
        target = plan.cache_dir if plan.cache_dir is not None else node_cache_dir()
        what = "trial cache (--out / execution.output_dir)" if plan.cache_dir is not None else \
            "trial cache (SWEEP_CACHE_DIR, --cache-dir)"
        out.append((what, writable_problem(target)))
    if any(m.hub for m in plan.models):
        out.append(("hub cache (HF_HUB_CACHE, --cache-dir)", writable_problem(hub_cache())))
    if plan.tasks:
        out.append(("datasets cache (HF_DATASETS_CACHE, --cache-dir)", writable_problem(datasets_cache())))
    return [(what, problem) for what, problem in out if problem]
