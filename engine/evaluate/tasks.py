"""lm-eval tasks on one in-memory model (no reload, no lm-eval cache), and task-name checks.

    from engine.evaluate.tasks import TaskRequest, run_tasks, check_task_names
    check_task_names(["belebele_deu_Latn"])                     # UnknownTaskError with suggestions
    result = run_tasks(model, tokenizer, [TaskRequest("demo_continuation_en", limit=50)],
                       include_path=include_dir, max_length=512)
    result["tasks"]["demo_continuation_en"]["metrics"]["acc"]

The model is wrapped as it is (`HFLM(pretrained=<model object>)`, or its shared-prefix subclass), so
in-place weight changes (pruning masks, a restored snapshot) are what gets measured. lm-eval's response
cache is never used: its key does not include the model. Seeds are lm-eval's defaults, fixed, so with
`scorer="lm_eval"` the numbers equal the stock `lm_eval` CLI's for the same model, tasks, limit and batch
size, bit for bit; the default shared-prefix scorer gives them within float rounding (docs/evaluation.md).
Task objects are built once per (task set, shots) in the process and reused (`loaded_tasks`).

Result layout (JSON-serialisable; non-finite floats become null):

    {"lm_eval_version": "0.4.13", "scorer": "shared_prefix",
     "tasks": {name: {"kind": "task" | "group", "metrics": {"acc": 0.4, ...},
                      "stderr": {"acc": 0.1, ...}, "metric_keys": {"acc": "acc,none", ...},
                      "higher_is_better": {"acc": true, ...}, "samples": n, "samples_total": N,
                      "shots": k, "limit": limit, "version": v, "task_hash": sha256 | null,
                      "responses_hash": sha256 | null, "config_hash": sha256 | null, "subtasks": [...] (groups only),
                      "requested": bool}}}

`task_hash` is the one lm-eval's EvaluationTracker writes (sha256 over its samples' doc, prompt and
target hashes: what was asked); `responses_hash` is a sha256 over the model's log-likelihoods (what
was answered: equal iff the model's outputs were bit-identical); `config_hash` is the sha256 of the
task's resolved config as lm-eval reports it.

Tasks also carry `units`: lm-eval's own per-document scores, for paired tests between models on the
same documents ({"doc_id": [...], "choices": [...], "metrics": {"acc": [1.0, 0.0, ...], ...}}, in
doc_id order; `choices` is the number of answer options of a multiple-choice document, null for other
output types). The trial writes them to a file rather than into its result.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import math
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from engine.evaluate.scorers import DEFAULT_SCORER, SCORERS
from engine.io import atomic_write_bytes, cache_dir

INDEX_SUBDIR = "lm_eval_task_index"
NO_FILTER = "none"
STDERR_SUFFIX = "_stderr"

# In-process memos: TaskManager construction is slow (it parses every YAML lm-eval ships).
_INDEX_MEMO: dict[str, frozenset[str]] = {}
_MANAGER_MEMO: dict[tuple[str, bool], object] = {}
_LOADED_MEMO: dict[tuple[int, tuple[str, ...], int], tuple[object, dict]] = {}


@dataclass(frozen=True)
class TaskRequest:
    """One lm-eval task or group: `shots` few-shot examples, `limit` documents (an int) or a fraction
    (a float < 1) of them, or all (None)."""

    name: str
    shots: int = 0
    limit: int | float | None = None

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"task name must be a non-empty string, got {self.name!r}")
        if isinstance(self.shots, bool) or not isinstance(self.shots, int) or self.shots < 0:
            raise ValueError(f"{self.name}: shots must be an int >= 0, got {self.shots!r}")
        if self.limit is not None:
            if isinstance(self.limit, bool) or not isinstance(self.limit, (int, float)) or self.limit <= 0:
                raise ValueError(f"{self.name}: limit must be a positive int or a fraction, got {self.limit!r}")
            if isinstance(self.limit, float) and self.limit >= 1:
                raise ValueError(f"{self.name}: a float limit is a fraction in (0, 1), got {self.limit!r}")


class UnknownTaskError(ValueError):
    """Task names lm-eval does not know; `unknown` maps each to its close names."""

    def __init__(self, unknown: Mapping[str, Sequence[str]], include_path: Path | None = None):
        self.unknown = {name: list(close) for name, close in unknown.items()}
        self.include_path = include_path
        lines = []
        for name, close in self.unknown.items():
            hint = f"did you mean {', '.join(close)}?" if close else "no close names"
            lines.append(f"  {name!r}: {hint}")
        where = f" (built-in tasks and {include_path})" if include_path else " (built-in tasks)"
        super().__init__(f"{len(self.unknown)} unknown lm-eval task name(s){where}:\n" + "\n".join(lines))


# ------------------------------------------------------------------------------------------ task index
def lm_eval_version() -> str:
    return version("lm_eval")


def _yaml_files(include_path: Path) -> list[Path]:
    if include_path.is_file():
        return [include_path]
    return sorted(include_path.glob("**/*.yaml"), key=lambda p: p.as_posix())


def include_fingerprint(include_path: Path | None) -> str:
    """sha256 over the include path and its YAML files' relative paths and contents."""
    digest = hashlib.sha256()
    if include_path is None:
        digest.update(b"<defaults only>")
        return digest.hexdigest()[:20]
    root = Path(include_path).resolve()
    if not root.exists():
        raise FileNotFoundError(f"lm-eval include path {root} does not exist")
    digest.update(str(root).encode())
    for path in _yaml_files(root):
        digest.update(b"\0" + path.relative_to(root if root.is_dir() else root.parent).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:20]


def _atomic_write_json(path: Path, payload: dict) -> None:
    atomic_write_bytes(path, json.dumps(payload, separators=(",", ":")).encode("utf-8"))


def task_manager(include_path: Path | None = None, include_defaults: bool = True):
    """A TaskManager, memoised in-process per (include path fingerprint, include_defaults)."""
    from lm_eval.tasks import TaskManager

    key = (include_fingerprint(include_path), include_defaults)
    manager = _MANAGER_MEMO.get(key)
    if manager is None:
        manager = TaskManager(include_path=str(include_path) if include_path is not None else None,
                              include_defaults=include_defaults)
        _MANAGER_MEMO[key] = manager
    return manager


def index_cache_path(include_path: Path | None = None) -> Path:
    version = lm_eval_version()
    return cache_dir() / INDEX_SUBDIR / f"lm_eval-{version}-{include_fingerprint(include_path)}.json"


def task_index(include_path: Path | None = None) -> frozenset[str]:
    """Every task, group and tag name lm-eval knows (built-ins plus `include_path`), served from a JSON
    file keyed by lm-eval's version and the include path's YAML fingerprint once computed."""
    path = index_cache_path(include_path)
    key = str(path)
    if key in _INDEX_MEMO:
        return _INDEX_MEMO[key]
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        names = frozenset(payload["names"])
    except (OSError, ValueError, KeyError, TypeError):
        if include_path is None:
            names = frozenset(task_manager(None).all_tasks)
        else:
            # lm-eval indexes each root on its own and keeps the first of clashing names, so the names
            # it knows are the built-ins' (cached once per version) plus the include path's (fast).
            names = task_index(None) | frozenset(task_manager(include_path, include_defaults=False).all_tasks)
        _atomic_write_json(path, {
            "lm_eval_version": lm_eval_version(),
            "include_path": str(Path(include_path).resolve()) if include_path is not None else None,
            "created": time.time(),
            "names": sorted(names),
        })
    _INDEX_MEMO[key] = names
    return names


def close_names(name: str, known: Iterable[str], n: int = 8, cutoff: float = 0.6) -> list[str]:
    """difflib's close matches, best first, ties broken alphabetically (get_close_matches breaks them
    in reverse, which for 'xnli_xx' shows xnli_zh, xnli_vi, ... before xnli_en)."""
    matcher = difflib.SequenceMatcher()
    matcher.set_seq2(name)
    scored = []
    for candidate in known:
        matcher.set_seq1(candidate)
        if (matcher.real_quick_ratio() >= cutoff and matcher.quick_ratio() >= cutoff
                and (ratio := matcher.ratio()) >= cutoff):
            scored.append((-ratio, candidate))
    return [candidate for _, candidate in sorted(scored)[:n]]


def check_task_names(names: Iterable[str], include_path: Path | None = None) -> None:
    """Raises UnknownTaskError listing every name lm-eval does not know, with close names for each."""
    known = task_index(include_path)
    unknown = {}
    for name in names:
        if name not in known and name not in unknown:
            unknown[name] = close_names(name, known)
    if unknown:
        raise UnknownTaskError(unknown, include_path)


# ------------------------------------------------------------------------------------------ evaluation
def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _split_metrics(raw: Mapping) -> tuple[dict, dict, dict]:
    """lm-eval's {"acc,none": x, "acc_stderr,none": s, ...} -> (metrics, stderr, our name -> lm-eval key)."""
    metrics, stderr, keys = {}, {}, {}
    for key, value in raw.items():
        if "," not in key:
            continue  # alias, name, sample_len, ...
        metric, filter_name = key.split(",", 1)
        is_stderr = metric.endswith(STDERR_SUFFIX)
        if is_stderr:
            metric = metric[: -len(STDERR_SUFFIX)]
        name = metric if filter_name == NO_FILTER else f"{metric},{filter_name}"
        if isinstance(value, str):  # "N/A"
            value = None
        if is_stderr:
            stderr[name] = _finite(value)
        else:
            metrics[name] = _finite(value)
            keys[name] = key
    return metrics, stderr, keys


def _sha256_json(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str, ensure_ascii=True).encode()).hexdigest()


def _task_hash(samples: Sequence[Mapping]) -> str:
    """What lm-eval's EvaluationTracker writes as task_hashes[task]."""
    from lm_eval.utils import hash_string

    return hash_string("".join(s["doc_hash"] + s["prompt_hash"] + s["target_hash"] for s in samples))


def _responses_hash(samples: Sequence[Mapping]) -> str:
    """sha256 over each sample's doc id and filtered model responses (log-likelihoods at full float
    precision): equal iff the model answered every request identically."""
    payload = [[s.get("doc_id"), s.get("filter"), s.get("filtered_resps")] for s in samples]
    return hashlib.sha256(json.dumps(payload, default=repr).encode()).hexdigest()


def _units(samples: Sequence[Mapping], metrics: Iterable[str]) -> dict:
    """Each document's own score for every metric lm-eval aggregated (the value it averages for acc and
    acc_norm), unfiltered responses only, in doc_id order."""
    rows = sorted((s for s in samples if s.get("filter", NO_FILTER) == NO_FILTER), key=lambda s: s["doc_id"])
    names = [m for m in metrics if rows and all(isinstance(r.get(m), (int, float, bool)) for r in rows)]

    def choices(sample: Mapping) -> int | None:
        responses = sample.get("filtered_resps")
        multiple = isinstance(responses, list) and len(responses) > 1 and all(
            isinstance(r, (list, tuple)) and len(r) == 2 for r in responses)
        return len(responses) if multiple else None

    return {"doc_id": [int(r["doc_id"]) for r in rows], "choices": [choices(r) for r in rows],
            "metrics": {m: [float(r[m]) for r in rows] for m in names}}


def _json_safe(value):
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float):
        return _finite(value)
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def _collect(raw: Mapping, request_names: set[str], shots: int, limit) -> dict[str, dict]:
    out: dict[str, dict] = {}
    group_subtasks = raw.get("group_subtasks", {})
    samples = raw.get("samples") or {}
    n_samples = raw.get("n-samples", {})
    rows = dict(raw.get("results", {}))
    for name, row in (raw.get("groups") or {}).items():
        rows.setdefault(name, row)
    for name in group_subtasks:
        rows.setdefault(name, {})  # a group without aggregate metrics still gets an entry
    for name, row in rows.items():
        metrics, stderr, keys = _split_metrics(row)
        is_group = name in group_subtasks and name not in raw.get("configs", {})
        entry = {
            "kind": "group" if is_group else "task",
            "metrics": metrics,
            "stderr": stderr,
            "metric_keys": keys,
            "higher_is_better": {k.split(",")[0] if k.endswith(f",{NO_FILTER}") else k: v
                                 for k, v in raw.get("higher_is_better", {}).get(name, {}).items()},
            "shots": raw.get("n-shot", {}).get(name, shots),
            "limit": limit,
            "version": _json_safe(raw.get("versions", {}).get(name)),
            "requested": name in request_names,
        }
        if is_group:
            subtasks = list(group_subtasks.get(name, []))
            entry["subtasks"] = subtasks
            entry["samples"] = sum(n_samples.get(t, {}).get("effective", 0) for t in subtasks) or row.get(
                "sample_len")
            entry["samples_total"] = sum(n_samples.get(t, {}).get("original", 0) for t in subtasks) or None
            entry["task_hash"] = None
            entry["responses_hash"] = None
            entry["config_hash"] = None
        else:
            counts = n_samples.get(name, {})
            entry["samples"] = counts.get("effective", row.get("sample_len"))
            entry["samples_total"] = counts.get("original")
            entry["task_hash"] = _task_hash(samples[name]) if name in samples else None
            entry["responses_hash"] = _responses_hash(samples[name]) if name in samples else None
            config = raw.get("configs", {}).get(name)
            entry["config_hash"] = _sha256_json(config) if config is not None else None
            entry["units"] = _units(samples.get(name, []), metrics)
        out[name] = _json_safe(entry)
    return out


def _local_closure(local, names: Sequence[str]) -> set[str] | None:
    """Every task and group that loading `names` from `local` touches, or None when one of them is not
    defined there (a tag, an inline dict child, or a name only lm-eval's built-ins define)."""
    index = local.task_index
    seen: set[str] = set()
    stack = list(names)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        entry = index.get(name)
        if entry is None or entry.kind.name not in ("TASK", "PY_TASK", "GROUP"):
            return None
        if entry.kind.name == "GROUP":
            children = (entry.cfg or {}).get("task", [])
            for child in children if isinstance(children, list) else [children]:
                if not isinstance(child, str):
                    return None
                stack.append(child)
    return seen


def manager_for(names: Sequence[str], include_path: Path | None):
    """The TaskManager to load `names` with, and whether it is the include path's alone.

    Indexing only the include path takes milliseconds where all built-ins take seconds, so that is
    used when everything the names need is defined there and nothing of it is also a built-in name
    (lm-eval keeps the built-in on a clash, so a full manager would load something else). Otherwise
    the names are checked against the disk-cached index (UnknownTaskError) and a full manager is used.
    """
    if include_path is not None:
        local = task_manager(include_path, include_defaults=False)
        closure = _local_closure(local, names)
        if closure is not None and not closure & task_index(None):
            return local, True
    check_task_names(names, include_path)
    return task_manager(include_path, include_defaults=True), False


def flatten_tasks(value) -> list:
    """The Task objects in what lm-eval's task loading returns (nested dicts of groups and tasks)."""
    from lm_eval.api.task import Task

    if isinstance(value, Task):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in flatten_tasks(v)]
    return []


def loaded_tasks(manager, names: Sequence[str], shots: int) -> dict:
    """lm-eval's loaded task set for `names` (what `TaskManager.load` returns: task objects with their
    datasets), built once per (task manager, names, shots) in this process and reused by every later
    trial. Task objects are safe to reuse: each evaluation rebuilds their request instances, and the
    few-shot override and seed are applied again before each one (`_prepare`). Keyed by shots too,
    because lm-eval leaves a task alone once its configured num_fewshot is 0."""
    key = (id(manager), tuple(names), shots)
    entry = _LOADED_MEMO.get(key)
    if entry is None or entry[0] is not manager:
        entry = (manager, manager.load(list(names)))
        _LOADED_MEMO[key] = entry
    return entry[1]


def _prepare(loaded: dict, shots: int) -> None:
    """What `lm_eval.simple_evaluate` does to the loaded tasks and the random generators before it calls
    `evaluate` (lm-eval 0.4.x), with lm-eval's default seeds; `run_tasks` calls `evaluate` itself so that
    it can hand over task objects it already built and skip collecting the environment's description
    (a pip listing in subprocesses, 0.3-0.5 s a call)."""
    import numpy as np
    from lm_eval.defaults import DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED
    from lm_eval.utils import set_torch_seed

    random.seed(DEFAULT_RANDOM_SEED)
    np.random.seed(DEFAULT_OTHER_SEED)
    set_torch_seed(DEFAULT_OTHER_SEED)
    for task in loaded["tasks"].values():
        if task.get_config("num_fewshot") != 0:
            task.set_config(key="num_fewshot", value=shots)
        task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)


def run_tasks(model, tokenizer, requests: Sequence[TaskRequest], include_path: Path | None = None,
              batch_size: int = 8, max_length: int | None = None, device: str = "cpu", *,
              bootstrap_iters: int = 100000, scorer: str = DEFAULT_SCORER) -> dict:
    """Evaluates the already-loaded `model` on `requests`: one lm-eval `evaluate` call per distinct
    (shots, limit), lm-eval's default seeds, no response or request cache. `scorer` is how the
    loglikelihood requests are computed: `shared_prefix` (engine.evaluate.shared_prefix: each context
    once, lm-eval's numbers) or `lm_eval` (lm-eval's own HFLM, one full sequence per request). See the
    module docstring for the returned layout."""
    import torch
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    from engine.evaluate.shared_prefix import shared_prefix_lm

    if scorer not in SCORERS:
        raise ValueError(f"scorer must be one of {', '.join(SCORERS)}, got {scorer!r}")
    requests = [TaskRequest(r) if isinstance(r, str) else r for r in requests]
    if not requests:
        raise ValueError("no task requests given")
    seen: dict[str, TaskRequest] = {}
    for request in requests:
        if request.name in seen:
            raise ValueError(f"task {request.name!r} requested twice ({seen[request.name]} and {request})")
        seen[request.name] = request
    model_device = next(model.parameters()).device
    if torch.device(device).type != model_device.type:
        raise ValueError(f"model is on {model_device} but device={device!r}; move it first (run_tasks never "
                         f"moves or reloads the model)")
    include = Path(include_path).resolve() if include_path is not None else None

    groups: dict[tuple[int, int | float | None], list[str]] = {}
    for request in requests:
        groups.setdefault((request.shots, request.limit), []).append(request.name)

    manager, _ = manager_for([r.name for r in requests], include)
    was_training = model.training
    make_lm = shared_prefix_lm if scorer == "shared_prefix" else HFLM
    lm = make_lm(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length, device=device)
    results: dict[str, dict] = {}
    try:
        for (shots, limit), names in groups.items():
            loaded = loaded_tasks(manager, names, shots)
            _prepare(loaded, shots)
            raw = evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=bootstrap_iters,
                           log_samples=True, cache_requests=False, fewshot_as_multiturn=True)
            if raw is None:
                raise RuntimeError("lm_eval's evaluate returned no results (not rank 0?)")
            for name, entry in _collect(raw, set(names), shots, limit).items():
                if name in results and not entry["requested"]:
                    continue
                results[name] = entry
    finally:
        model.train(was_training)
    return {"lm_eval_version": lm_eval_version(), "scorer": scorer, "tasks": results}
