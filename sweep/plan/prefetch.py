"""`sweep prefetch STUDY`: everything a study's trials read from the network, fetched before the sweep.

What trials would otherwise fetch, and where it goes:

- hub models: `snapshot_download` of the files a trial loads (config, tokenizer, top-level safetensors
  and their index, generation config; `*.py` with trust_remote_code) into the Hugging Face hub cache
  (HF_HUB_CACHE). Subfolders (Llama-3's `original/`, onnx/, ...) and .bin/.pth duplicates are skipped;
  a repository without safetensors gets its .bin weights instead. Local models are checked, not copied.
- calibration windows: built through `engine.data.calibration.calibration_set`, the function a trial
  calls, into the cache directory the trial reads (`<study dir>/cache` for a local study directory,
  else `$SWEEP_CACHE_DIR/calibration` on each node), once per tokenizer: models sharing a tokenizer
  share windows. A trial then reads them and never opens the text source.
- hub evaluation text: tokenized through `engine.trial.evaluation_tokens` into the same cache
  (`<cache>/evaluation`); local text is read from its files at trial time.
- lm-eval tasks: instantiated through the TaskManager a trial uses, so `datasets` stores their data in
  its cache (HF_DATASETS_CACHE); tasks whose data are local files need nothing.

`plan_prefetch` is pure (it reads the study and the local files that enter trial keys);
`run_prefetch` does the work in this process; `sweep.execution.prefetch_nodes` runs it on every alive Ray node.
Every item is attempted and every failure reported (a gated model does not hide a missing dataset).
Afterwards `sweep run STUDY --offline` runs with HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.evaluate.tasks import flatten_tasks, manager_for
from engine.evaluate.text_cache import evaluation_cache_path
from engine.io import calibration_cache_dir
from sweep.store.locations import LocalLocation, is_url
from sweep.study.grid import Plan
from sweep.study.load import Study

# What a trial loads from a model repository (engine.models.load_model): top-level files only.
MODEL_PATTERNS = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                  "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "*.tiktoken",
                  "chat_template.jinja", "chat_template.json", "*.safetensors", "model.safetensors.index.json")
BIN_WEIGHT_PATTERNS = ("pytorch_model*.bin", "pytorch_model.bin.index.json")
REMOTE_CODE_PATTERNS = ("*.py",)
# fnmatch's `*` crosses `/`: ignoring "*/*" keeps only the repository's top level (no original/, onnx/).
IGNORE_PATTERNS = ("*/*",)
LOCAL_DATASET_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas"}

# `--cache-dir DIR` for `sweep prefetch` and `sweep run`: the caches trials read, under one folder.
# HF_HOME is left alone: it also holds the login token (`hf auth login`).
CACHE_ENV_VARS = ("HF_HUB_CACHE", "HF_DATASETS_CACHE", "SWEEP_CACHE_DIR")
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

NEW = ("fetched", "built", "ready")
PLANNED = ("would fetch", "would build", "would load")


def cache_env(root: str | Path) -> dict[str, str]:
    """The environment that puts every cache a trial reads under `root`."""
    root = Path(os.path.abspath(Path(root).expanduser()))
    return {"HF_HUB_CACHE": str(root / "huggingface" / "hub"),
            "HF_DATASETS_CACHE": str(root / "huggingface" / "datasets"),
            "SWEEP_CACHE_DIR": str(root / "sweep")}


# ---------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class ModelItem:
    index: int  # models[index]
    label: str
    hub: str | None
    path: str | None
    revision: str | None
    trust_remote_code: bool

    @property
    def name_or_path(self) -> str:
        return self.hub if self.hub is not None else str(self.path)

    @property
    def name(self) -> str:
        if self.hub is not None:
            return f"{self.label} ({self.hub}@{short_revision(self.revision)})"
        return f"{self.label} (local)"


def short_revision(revision: str | None) -> str:
    """`main`, a tag, or a commit hash cut to 12 characters as the hub shows it."""
    if revision is None:
        return "main"
    is_commit = len(revision) == 40 and all(c in "0123456789abcdef" for c in revision)
    return revision[:12] if is_commit else revision


@dataclass(frozen=True)
class CalibrationItem:
    mix: str  # canonical language or mix
    seed: int
    config: Any  # engine.trial.CalibrationConfig, exactly as the trials get it
    models: tuple[str, ...]  # labels of the models whose trials read it

    @property
    def name(self) -> str:
        return f"cal-{self.mix} seed {self.seed}"


@dataclass(frozen=True)
class EvaluationItem:
    language: str
    config: Any  # engine.trial.PerplexityConfig
    models: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"perplexity text {self.language}"


@dataclass(frozen=True)
class TaskItem:
    name: str  # resolved lm-eval task name
    language: str
    include_path: Path | None


@dataclass(frozen=True)
class PrefetchPlan:
    study: str
    models: tuple[ModelItem, ...]
    calibration: tuple[CalibrationItem, ...]
    evaluation: tuple[EvaluationItem, ...]
    tasks: tuple[TaskItem, ...]
    cache_dir: Path | None  # where trials cache windows and text; None: each node's $SWEEP_CACHE_DIR/calibration
    local_evaluation: str | None = None  # a local perplexity source: read at trial time, nothing to fetch

    def count(self) -> int:
        return len(self.models) + len(self.calibration) + len(self.evaluation) + len(self.tasks)


def trial_cache_dir(study: Study, out: str | Path | None = None) -> Path | None:
    """The cache directory `sweep run` hands its trials (sweep.execution.driver.build_jobs): `<study dir>/cache` for a
    local study directory; None for object storage, where each worker uses its node's default."""

    location = out or study.output_location
    if is_url(location):
        return None
    return LocalLocation(Path(location)).local_path("cache")


def node_cache_dir() -> Path:
    """The cache a worker uses when the study directory is not local (sweep.execution.worker), on this node."""
    return calibration_cache_dir()


def plan_prefetch(study: Study, plan: Plan, out: str | Path | None = None) -> PrefetchPlan:
    """What the study's trials would read from outside: no network, no tokenizer (grouping by tokenizer
    happens when the tokenizers are at hand)."""
    from sweep.study.trials import evaluation_config, resolved_tasks, trial_config

    spec = study.spec
    models = tuple(ModelItem(i, m.label, m.hub, str(study.model_paths[i]) if m.hub is None else None, m.revision,
                             m.trust_remote_code) for i, m in enumerate(spec.models))
    cache_dir = trial_cache_dir(study, out)

    calibration: dict[Any, tuple[str, int, list[str]]] = {}
    seen: set[tuple[int, str, int]] = set()
    for trial in plan.pruned:
        if trial.calibration is None:
            continue  # magnitude: no calibration data
        spot = (trial.model_index, trial.calibration.canonical(), trial.seed)
        if spot in seen:
            continue
        seen.add(spot)
        config = trial_config(study, trial, cache_dir=cache_dir).calibration
        mix, seed, labels = calibration.setdefault(config, (trial.calibration.canonical(), trial.seed, []))
        if trial.model_label not in labels:
            labels.append(trial.model_label)
    calibration_items = tuple(CalibrationItem(mix, seed, config, tuple(labels))
                              for config, (mix, seed, labels) in calibration.items())

    evaluation = evaluation_config(study, tasks=[])
    evaluation_items: tuple[EvaluationItem, ...] = ()
    local_evaluation = None
    if evaluation.perplexity is not None:
        if evaluation.perplexity.source.kind == "hub":
            labels = tuple(m.label for m in models)
            evaluation_items = tuple(EvaluationItem(lang, evaluation.perplexity, labels) for lang in evaluation.languages)
        else:
            local_evaluation = str(evaluation.perplexity.source.path)
    include = study.resolve(spec.evaluation.include_path) if spec.evaluation.include_path else None
    tasks = tuple(TaskItem(t.name, t.language, include) for t in resolved_tasks(study))
    return PrefetchPlan(study.name, models, calibration_items, evaluation_items, tasks, cache_dir, local_evaluation)


# --------------------------------------------------------------------------------------------- results
@dataclass
class ItemResult:
    kind: str  # model | calibration | evaluation | tasks
    name: str
    status: str  # fetched built ready cached local | would fetch/build/load | failed skipped
    bytes: int = 0  # new on disk for fetched/built, else what is there
    seconds: float = 0.0
    detail: str = ""
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.status == "failed"


@dataclass
class NodeResult:
    host: str
    node_id: str | None = None
    address: str | None = None
    hub_cache: str | None = None
    trial_cache: str | None = None
    seconds: float = 0.0
    dry_run: bool = False
    items: list[ItemResult] = field(default_factory=list)
    error: str | None = None  # the node's task itself failed (a lost node, an exception outside an item)

    @property
    def failures(self) -> list[ItemResult]:
        return [i for i in self.items if i.failed]

    @property
    def ok(self) -> bool:
        return self.error is None and not self.failures

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "ok": self.ok}

    @classmethod
    def from_dict(cls, data: dict) -> NodeResult:
        data = {k: v for k, v in data.items() if k != "ok"}
        items = [ItemResult(**i) for i in data.pop("items", [])]
        return cls(**data, items=items)

    def describe(self) -> str:
        tags = [t for t in (self.address if self.address != self.host else None,
                            self.node_id[:8] if self.node_id else None) if t]
        where = self.host + (f" ({', '.join(tags)})" if tags else "")
        if self.error:
            return f"node {where}: failed: {self.error}"
        counts = _counts(self.items)
        new = sum(i.bytes for i in self.items if i.status in NEW)
        words = "would fetch or build" if self.dry_run else "new"
        return (f"node {where}: {counts['new']} {words} ({format_bytes(new)}), {counts['cached']} cached, "
                f"{counts['local']} local, {counts['failed']} failed, {counts['skipped']} skipped in "
                f"{self.seconds:.1f} s")


def _counts(items: list[ItemResult]) -> dict[str, int]:
    out = {"new": 0, "cached": 0, "local": 0, "failed": 0, "skipped": 0}
    for item in items:
        if item.status in NEW or item.status in PLANNED:
            out["new"] += 1
        elif item.status in out:
            out[item.status] += 1
    return out


def format_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def format_item(item: ItemResult) -> str:
    line = f"  {item.kind:<11} {item.name:<44} {item.status:<11} {format_bytes(item.bytes):>10} {item.seconds:>7.1f} s"
    if item.error:
        return f"{line}  {item.error}"
    return f"{line}  {item.detail}" if item.detail else line


def format_summary(node: NodeResult) -> str:
    lines = [f"summary ({node.host}{', dry run' if node.dry_run else ''}):",
             f"  {'kind':<11} {'items':>5} {'new':>5} {'cached':>6} {'local':>5} {'failed':>6} {'skipped':>7} "
             f"{'size':>10} {'time':>9}"]
    kinds = [k for k in ("model", "calibration", "evaluation", "tasks", "cache") if any(i.kind == k for i in node.items)]
    for kind in [*kinds, "total"]:
        items = node.items if kind == "total" else [i for i in node.items if i.kind == kind]
        c = _counts(items)
        size = sum(i.bytes for i in items)
        seconds = node.seconds if kind == "total" else sum(i.seconds for i in items)
        lines.append(f"  {kind:<11} {len(items):>5} {c['new']:>5} {c['cached']:>6} {c['local']:>5} {c['failed']:>6} "
                     f"{c['skipped']:>7} {format_bytes(size):>10} {seconds:>7.1f} s")
    lines.append(f"  hub cache: {node.hub_cache or '-'};  trial cache: {node.trial_cache or '-'}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- cache checks
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


# ------------------------------------------------------------------------------------------- execution
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
        item, tokenizer = _prefetch_model(model, dry_run)
        record.add(item)
        if tokenizer is not None:
            tokenizers[model.label] = tokenizer
    fingerprints = _fingerprints(tokenizers)
    for cal in plan.calibration:
        for item in _prefetch_calibration(cal, tokenizers, fingerprints, cache_dir, dry_run):
            record.add(item)
    for ev in plan.evaluation:
        for item in _prefetch_evaluation(ev, tokenizers, fingerprints, cache_dir, dry_run):
            record.add(item)
    if plan.local_evaluation is not None:
        record.add(ItemResult("evaluation", "perplexity text", "local", detail=f"read from {plan.local_evaluation} "
                                                                           "at trial time; nothing to fetch"))
    if plan.tasks:
        for item in _prefetch_tasks(plan.tasks, dry_run):
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


def _fingerprints(tokenizers: dict[str, Any]) -> dict[str, str]:
    from engine.data.calibration import tokenizer_fingerprint

    return {label: tokenizer_fingerprint(tok) for label, tok in tokenizers.items()}


# models ------------------------------------------------------------------------------------------
def model_patterns(trust_remote_code: bool) -> list[str]:
    return [*MODEL_PATTERNS, *(REMOTE_CODE_PATTERNS if trust_remote_code else ())]


def _tree_bytes(folder: Path) -> int:
    """Bytes of the files under `folder`, following links (a hub snapshot links into blobs/)."""
    total = 0
    if not folder.is_dir():
        return 0
    for path in folder.rglob("*"):
        try:
            if path.is_file():
                total += path.stat().st_size
        except OSError:
            pass
    return total


def _top_level_bytes(folder: Path) -> int:
    """Bytes of the files a trial loads from a model folder: its top level (links followed)."""
    total = 0
    for path in folder.iterdir() if folder.is_dir() else ():
        try:
            if path.is_file():
                total += path.stat().st_size
        except OSError:
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


def _prefetch_model(model: ModelItem, dry_run: bool) -> tuple[ItemResult, Any]:
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
        path = cache_path(tokenizer)
        started = time.perf_counter()
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


def _prefetch_calibration(item: CalibrationItem, tokenizers: dict, fingerprints: dict, cache_dir: Path,
                          dry_run: bool) -> list[ItemResult]:
    from engine.data.calibration import WindowRequest, calibration_cache_path, calibration_set

    cal = item.config
    request = WindowRequest(cal.samples, cal.seq_len, cal.seed)
    size = f"{cal.samples} x {cal.seq_len} tokens"

    def build(tokenizer) -> str:
        calibration_set(cal.source, tokenizer, cal.weights, request, cache_dir, cal.source_fingerprint)
        return size

    return _per_tokenizer(
        "calibration", item.name, item.models, tokenizers, fingerprints, dry_run,
        detail=lambda labels: f"{size}, tokenizer of {', '.join(labels)}",
        cache_path=lambda tokenizer: calibration_cache_path(cal.source, tokenizer, cal.weights, request, cache_dir,
                                                            cal.source_fingerprint),
        build=build, what=f"calibration {item.mix} seed {item.seed}")


def _prefetch_evaluation(item: EvaluationItem, tokenizers: dict, fingerprints: dict, cache_dir: Path,
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


def _prefetch_tasks(tasks: tuple[TaskItem, ...], dry_run: bool) -> list[ItemResult]:
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


# ------------------------------------------------------------------------------------ offline checks
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
