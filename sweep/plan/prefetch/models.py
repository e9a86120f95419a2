"""Hub models: which files a trial loads, fetching them into the hub cache, and checking a cached snapshot."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from sweep.plan.prefetch.caches import hub_cache
from sweep.plan.prefetch.items import ModelItem
from sweep.plan.prefetch.results import ItemResult, format_bytes
from sweep.study.load import Study

# What a trial loads from a model repository (engine.models.load_model): top-level files only.
MODEL_PATTERNS = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                  "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "*.tiktoken",
                  "chat_template.jinja", "chat_template.json", "*.safetensors", "model.safetensors.index.json")
BIN_WEIGHT_PATTERNS = ("pytorch_model*.bin", "pytorch_model.bin.index.json")
REMOTE_CODE_PATTERNS = ("*.py",)
# fnmatch's `*` crosses `/`: ignoring "*/*" keeps only the repository's top level (no original/, onnx/).
IGNORE_PATTERNS = ("*/*",)


def model_patterns(trust_remote_code: bool) -> list[str]:
    return [*MODEL_PATTERNS, *(REMOTE_CODE_PATTERNS if trust_remote_code else ())]


def _tree_bytes(folder: Path) -> int:
    """Bytes of the files under `folder`, following links (a hub snapshot links into blobs/)."""
    return _bytes_of(folder.rglob("*")) if folder.is_dir() else 0


def _top_level_bytes(folder: Path) -> int:
    """Bytes of the files a trial loads from a model folder: its top level (links followed)."""
    return _bytes_of(folder.iterdir()) if folder.is_dir() else 0


def _bytes_of(paths) -> int:
    total = 0
    for path in paths:
        try:
            if path.is_file():
                total += path.stat().st_size
        except OSError:  # a file removed or unreadable while counting: left out
            pass
    return total


def snapshot_problem(folder: Path) -> str | None:
    """Why a model folder cannot be loaded by a trial (config, weights, every shard), or None."""

    if not (folder / "config.json").is_file():
        return "no config.json"
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (ValueError, KeyError, OSError) as err:
                return f"{index_name} is not readable ({err})"
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
                return f"weight shard {missing[0]}{more} missing ({len(shards)} listed in {index_name})"
            return None
    if any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin")):
        return None
    return "no weights (*.safetensors or pytorch_model*.bin)"


def hub_error_line(model: ModelItem, err: BaseException) -> str:
    """One line naming the model and what to do, for any way a hub download can fail."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo, revision = model.hub, model.revision or "main"
    where = f"models[{model.index}] ({repo}@{revision})"
    token = "HF_TOKEN is not set" if not os.environ.get("HF_TOKEN") else "the HF_TOKEN given has no access"
    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, GatedRepoError) or status == 403:
        return (f"{where}: gated model (HTTP {status or 403}): accept its licence at https://huggingface.co/{repo} "
                f"with your account, then set HF_TOKEN to a token of that account ({token})")
    if isinstance(err, RevisionNotFoundError):
        return f"{where}: the repository has no revision {revision!r}; check models[{model.index}].revision"
    if isinstance(err, RepositoryNotFoundError) or status == 401:
        return (f"{where}: not found, or private (HTTP {status or 404}): check the id; for a private or gated model "
                f"set HF_TOKEN and accept its licence ({token})")
    if isinstance(err, LocalEntryNotFoundError):
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        if constants.HF_HUB_OFFLINE:
            return (f"{where}: not in the hub cache {constants.HF_HUB_CACHE} and the hub is offline "
                    "(HF_HUB_OFFLINE=1): prefetch where the hub is reachable, or point --cache-dir / HF_HUB_CACHE "
                    "at a cache that holds it")
        return f"{where}: cannot reach the hub and it is not in the cache {constants.HF_HUB_CACHE} ({first[:200]})"
    if isinstance(err, HfHubHTTPError):
        return f"{where}: the hub answered HTTP {status}: {str(err).splitlines()[0][:200]}"
    text = str(err).splitlines()[0][:200] if str(err) else ""
    return f"{where}: {type(err).__name__}: {text}"


def prefetch_model(model: ModelItem, dry_run: bool) -> tuple[ItemResult, Any]:
    started = time.perf_counter()
    if model.hub is None:
        folder = Path(model.path)
        problem = snapshot_problem(folder)
        if problem:
            return ItemResult("model", model.name, "failed", _top_level_bytes(folder), time.perf_counter() - started,
                              error=f"models[{model.index}] ({folder}): {problem}"), None
        item = ItemResult("model", model.name, "local", _top_level_bytes(folder), detail=f"{folder}: nothing to fetch")
    else:
        try:
            item, folder = _fetch_hub_model(model, dry_run)
        except Exception as err:  # noqa: BLE001 - every failure becomes one line naming the model
            return ItemResult("model", model.name, "failed", seconds=time.perf_counter() - started,
                              error=hub_error_line(model, err)), None
        if item.failed or item.status == "would fetch":
            item.seconds = time.perf_counter() - started
            return item, None
    try:
        tokenizer = _load_tokenizer(model, folder)
    except Exception as err:  # noqa: BLE001
        item.status, item.error = "failed", (f"models[{model.index}] ({model.name_or_path}): config or tokenizer "
                                             f"does not load from {folder}: {type(err).__name__}: "
                                             f"{str(err).splitlines()[0][:200]}")
        tokenizer = None
    item.seconds = time.perf_counter() - started
    return item, tokenizer


def _fetch_hub_model(model: ModelItem, dry_run: bool) -> tuple[ItemResult, Path | None]:
    """The model's snapshot in the hub cache (downloading what is missing), and where it is."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_dir = Path(constants.HF_HUB_CACHE) / f"models--{model.hub.replace('/', '--')}"
    before = _tree_bytes(repo_dir / "blobs")
    common = dict(revision=model.revision, ignore_patterns=list(IGNORE_PATTERNS))
    patterns = model_patterns(model.trust_remote_code)
    if dry_run:
        try:
            folder = Path(snapshot_download(model.hub, allow_patterns=patterns, local_files_only=True, **common))
        except LocalEntryNotFoundError:
            return ItemResult("model", model.name, "would fetch", detail="not in the hub cache"), None
        problem = snapshot_problem(folder)
        if problem:
            return ItemResult("model", model.name, "would fetch", _top_level_bytes(folder),
                              detail=f"cached copy: {problem}"), None
        return ItemResult("model", model.name, "cached", _top_level_bytes(folder), detail=str(folder)), folder
    token = os.environ.get("HF_TOKEN") or None  # None: the token `hf auth login` stored, if any
    folder = Path(snapshot_download(model.hub, allow_patterns=patterns, token=token, **common))
    detail = ""
    if not any(folder.glob("*.safetensors")) and (folder / "config.json").is_file():
        try:
            folder = Path(snapshot_download(model.hub, allow_patterns=[*patterns, *BIN_WEIGHT_PATTERNS], token=token,
                                            **common))
            detail = "no safetensors in the repository: its .bin weights"
        except LocalEntryNotFoundError:
            pass  # offline: reported below as no weights
    problem = snapshot_problem(folder)
    if problem:
        return ItemResult("model", model.name, "failed", _top_level_bytes(folder),
                          error=f"models[{model.index}] ({model.hub}@{model.revision or 'main'}): the snapshot at "
                                f"{folder} is incomplete: {problem}"), None
    new = max(0, _tree_bytes(repo_dir / "blobs") - before)
    total = _top_level_bytes(folder)
    if new:
        return ItemResult("model", model.name, "fetched", new, detail=f"{format_bytes(total)} in {folder}"
                          + (f"; {detail}" if detail else "")), folder
    return ItemResult("model", model.name, "cached", total,
                      detail=str(folder) + (f"; {detail}" if detail else "")), folder


def _load_tokenizer(model: ModelItem, folder: Path):
    """The tokenizer, and the config checked loadable, from the model's folder alone (a hub snapshot: what
    an offline trial resolves its hub id to): no network, and the same files engine.models.load_model reads."""
    from transformers import AutoConfig, AutoTokenizer

    AutoConfig.from_pretrained(str(folder), trust_remote_code=model.trust_remote_code)
    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=model.trust_remote_code)


# calibration windows and evaluation text ---------------------------------------------------------


def offline_gaps(study: Study) -> list[str]:
    """Hub models of the study that this machine's hub cache cannot serve offline (one line each)."""
    if all(spec.hub is None for spec in study.spec.models):
        return []
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    gaps = []
    for i, spec in enumerate(study.spec.models):
        if spec.hub is None:
            continue
        model = ModelItem(i, spec.label, spec.hub, None, spec.revision, spec.trust_remote_code)
        try:
            folder = snapshot_download(spec.hub, revision=spec.revision, allow_patterns=model_patterns(spec.trust_remote_code),
                                       ignore_patterns=list(IGNORE_PATTERNS), local_files_only=True)
        except LocalEntryNotFoundError:
            gaps.append(f"models[{i}] ({spec.hub}@{spec.revision or 'main'}) is not in the hub cache {hub_cache()}")
            continue
        problem = snapshot_problem(Path(folder))
        if problem:
            gaps.append(f"models[{i}] ({model.hub}@{spec.revision or 'main'}): the cached snapshot is incomplete: {problem}")
    return gaps
