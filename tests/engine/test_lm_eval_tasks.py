"""lm-eval tasks: the offline demo continuation tasks, `run_tasks` on an in-memory model (against the
stock `lm_eval` CLI), and task-name checks served from the on-disk task index.

Torch runs single-threaded here: on a small shared CPU machine two OpenMP threads competing with other
processes make these tiny models ~10x slower, and both sides of the CLI comparison use one thread.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import engine.evaluate.tasks as lm_tasks
from engine.demo import ensure_demo_assets
from engine.demo.tasks import GROUP, N_CHOICES, ensure_demo_tasks, task_name
from engine.evaluate.tasks import (
    TaskRequest,
    UnknownTaskError,
    check_task_names,
    include_fingerprint,
    index_cache_path,
    run_tasks,
    task_index,
)
from tests.conftest import OFFLINE, environment

LIMIT = 20
MAX_LENGTH = 512


@pytest.fixture(scope="module", autouse=True)
def own_cache_dir(tmp_path_factory):
    """A fresh task-index cache for this module (the built-in index is built once, ~10-15 s)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SWEEP_CACHE_DIR", str(tmp_path_factory.mktemp("sweep-cache")))
        patch.setattr(lm_tasks, "_INDEX_MEMO", {})
        patch.setattr(lm_tasks, "_MANAGER_MEMO", {})
        yield


@pytest.fixture(scope="module")
def assets():
    return ensure_demo_assets()


@pytest.fixture(scope="module")
def include(assets) -> Path:
    return ensure_demo_tasks(assets)


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def offline_env():
    with environment(OFFLINE):
        yield


@pytest.fixture(scope="module")
def llama(assets, one_thread, offline_env):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = assets.model_dirs["demo-llama"]
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    return model, tokenizer, directory


@pytest.fixture(scope="module")
def en_sw(llama, include):
    model, tokenizer, _ = llama
    requests = [TaskRequest(task_name("en"), limit=LIMIT), TaskRequest(task_name("sw"), limit=LIMIT)]
    return run_tasks(model, tokenizer, requests, include_path=include, max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def en_alone(llama, include):
    """demo_continuation_en alone: lm-eval batches requests across tasks, and another batch
    composition (padding) moves log-likelihoods in the last bits, so compare like with like."""
    model, tokenizer, _ = llama
    return run_tasks(model, tokenizer, [TaskRequest(task_name("en"), limit=LIMIT)], include_path=include,
                     max_length=MAX_LENGTH)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ------------------------------------------------------------------------------------ demo task files
def test_generation_is_deterministic_and_cached(assets, include, tmp_path):
    first = dataclasses.replace(assets, root=tmp_path / "a")
    second = dataclasses.replace(assets, root=tmp_path / "b")
    dir_a, dir_b = ensure_demo_tasks(first), ensure_demo_tasks(second)
    assert dir_a == (tmp_path / "a" / "lm_eval_tasks").resolve()
    names = sorted(p.relative_to(dir_a).as_posix() for p in dir_a.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(dir_b).as_posix() for p in dir_b.rglob("*") if p.is_file())
    for lang in assets.languages:
        data = f"data/{lang}.jsonl"
        assert (dir_a / data).read_bytes() == (dir_b / data).read_bytes()
        assert (dir_a / data).read_bytes() == (include / data).read_bytes()
        yaml_a = (dir_a / f"{task_name(lang)}.yaml").read_text(encoding="utf-8")
        yaml_b = (dir_b / f"{task_name(lang)}.yaml").read_text(encoding="utf-8")
        assert yaml_a.replace(str(dir_a), "<dir>") == yaml_b.replace(str(dir_b), "<dir>")
    # Up to date: a second call leaves the directory alone (same inode, same stamp).
    inode = dir_a.stat().st_ino
    stamp = (dir_a / "stamp.json").read_bytes()
    assert ensure_demo_tasks(first) == dir_a
    assert dir_a.stat().st_ino == inode and (dir_a / "stamp.json").read_bytes() == stamp
    # Another seed is a different task set: regenerated in place, no temp directories left behind.
    ensure_demo_tasks(first, seed=1)
    assert dir_a.stat().st_ino != inode
    labels = lambda d: [doc["label"] for doc in read_jsonl(d / "data" / "en.jsonl")]  # noqa: E731
    assert labels(dir_a) != labels(dir_b)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["lm_eval_tasks"]


def test_docs_are_well_formed_and_come_from_the_tasks_split(assets, include):
    stamp = json.loads((include / "stamp.json").read_text(encoding="utf-8"))
    for lang in assets.languages:
        docs = read_jsonl(include / "data" / f"{lang}.jsonl")
        assert stamp["tasks"][task_name(lang)] == len(docs) >= 20
        task_rows = read_jsonl(assets.split_path(lang, "tasks"))
        by_id = {row["id"]: row["text"].strip() for row in task_rows}
        task_text = "\n".join(by_id.values())
        other = "\n".join(row["text"] for split in ("calibration", "evaluation")
                          for row in read_jsonl(assets.split_path(lang, split)))
        labels = set()
        for doc in docs:
            choices, label = doc["choices"], doc["label"]
            assert len(choices) == N_CHOICES and len(set(choices)) == N_CHOICES
            assert isinstance(label, int) and 0 <= label < N_CHOICES
            labels.add(label)
            source = by_id[doc["source_id"]]
            context, truth = doc["context"], choices[label]
            assert context and truth and source.startswith(context)
            rest = source[len(context):]
            if lang == "zh":
                assert rest.startswith(truth)
            else:
                assert rest[:1].isspace() and rest.lstrip().startswith(truth)
            for text in (context, *choices):
                assert text in task_text
            # The document itself (context and true continuation) never appears in the other splits; a
            # short choice may coincide with a phrase the book repeats (a quoted section title, say).
            assert source[: len(context) + len(rest) - len(rest.lstrip()) + len(truth)] not in other, \
                f"{lang}: task text found in calibration/evaluation split"
        assert labels == set(range(N_CHOICES)), f"{lang}: labels drawn from {labels}"


def test_yaml_configs(assets, include):
    for lang in assets.languages:
        config = yaml.safe_load((include / f"{task_name(lang)}.yaml").read_text(encoding="utf-8"))
        assert config["task"] == task_name(lang)
        assert config["dataset_path"] == "json" and config["output_type"] == "multiple_choice"
        data_file = Path(config["dataset_kwargs"]["data_files"][config["test_split"]])
        assert data_file.is_absolute() and data_file == include / "data" / f"{lang}.jsonl"
        assert [m["metric"] for m in config["metric_list"]] == ["acc", "acc_norm"]
        assert config["metadata"] == {"version": 1}
        assert config["target_delimiter"] == ("" if lang == "zh" else " ")
    group = yaml.safe_load((include / f"_{GROUP}.yaml").read_text(encoding="utf-8"))
    assert group["group"] == GROUP and group["task"] == [task_name(lang) for lang in assets.languages]


# ------------------------------------------------------------------------------------------ run_tasks
def test_run_tasks_in_memory(en_sw):
    assert en_sw["lm_eval_version"] == lm_tasks.lm_eval_version()
    json.dumps(en_sw, allow_nan=False)
    assert set(en_sw["tasks"]) == {task_name("en"), task_name("sw")}
    for entry in en_sw["tasks"].values():
        assert entry["kind"] == "task" and entry["requested"]
        assert entry["samples"] == LIMIT and entry["limit"] == LIMIT and entry["shots"] == 0
        assert entry["samples_total"] > LIMIT
        assert entry["version"] == 1
        assert entry["metric_keys"] == {"acc": "acc,none", "acc_norm": "acc_norm,none"}
        for metric in ("acc", "acc_norm"):
            value = entry["metrics"][metric]
            assert math.isfinite(value) and 0.0 <= value <= 1.0
            assert math.isfinite(entry["stderr"][metric])
        for key in ("task_hash", "responses_hash", "config_hash"):
            assert len(entry[key]) == 64


def test_run_tasks_groups_requests_by_shots_and_limit(llama, include, monkeypatch):
    import lm_eval.evaluator

    calls = []
    real = lm_eval.evaluator.evaluate

    def counting(*args, **kwargs):
        tasks = kwargs["task_dict"]["tasks"]
        calls.append((tuple(sorted(tasks)), tuple(t.get_config("num_fewshot") for t in tasks.values()),
                      kwargs["limit"], kwargs["cache_requests"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(lm_eval.evaluator, "evaluate", counting)
    model, tokenizer, _ = llama
    requests = [TaskRequest(task_name("de"), limit=4), TaskRequest(task_name("zh"), limit=6),
                TaskRequest(task_name("es"), limit=4)]
    result = run_tasks(model, tokenizer, requests, include_path=include, max_length=MAX_LENGTH)
    assert sorted(calls) == [((task_name("de"), task_name("es")), (0, 0), 4, False),
                             ((task_name("zh"),), (0,), 6, False)]
    assert {name: entry["samples"] for name, entry in result["tasks"].items()} == {
        task_name("de"): 4, task_name("es"): 4, task_name("zh"): 6}


def test_tasks_and_tokenized_requests_are_built_once_per_worker(llama, include, monkeypatch):
    """A worker runs many trials on one model: the second run_tasks loads no task (its datasets) and
    tokenizes no request again, and gives the same answers bit for bit."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    loads, encodes = [], []
    real_load, real_encode = TaskManager.load, HFLM.tok_encode

    def counting_load(self, *args, **kwargs):
        loads.append(args)
        return real_load(self, *args, **kwargs)

    def counting_encode(self, *args, **kwargs):
        encodes.append(args)
        return real_encode(self, *args, **kwargs)

    monkeypatch.setattr(TaskManager, "load", counting_load)
    monkeypatch.setattr(HFLM, "tok_encode", counting_encode)
    model, tokenizer, _ = llama
    requests = [TaskRequest(task_name("ru"), limit=3), TaskRequest(task_name("ar"), limit=3)]
    first = run_tasks(model, tokenizer, requests, include_path=include, max_length=MAX_LENGTH)
    assert len(loads) == 1 and encodes
    loads.clear(), encodes.clear()
    second = run_tasks(model, tokenizer, requests, include_path=include, max_length=MAX_LENGTH)
    assert loads == [] and encodes == []
    for name, entry in first["tasks"].items():
        assert second["tasks"][name]["responses_hash"] == entry["responses_hash"]
        assert second["tasks"][name]["task_hash"] == entry["task_hash"]
        assert second["tasks"][name]["metrics"] == entry["metrics"]
    # another shot count is another task set: lm-eval keeps a configured num_fewshot of 0 fixed
    run_tasks(model, tokenizer, [TaskRequest(task_name("ru"), shots=1, limit=3)], include_path=include,
              max_length=MAX_LENGTH)
    assert len(loads) == 1


def test_run_tasks_refuses_bad_requests(llama, include):
    model, tokenizer, _ = llama
    with pytest.raises(ValueError, match="device"):
        run_tasks(model, tokenizer, [TaskRequest(task_name("en"))], include_path=include, device="cuda")
    with pytest.raises(ValueError, match="twice"):
        run_tasks(model, tokenizer, [TaskRequest(task_name("en")), TaskRequest(task_name("en"), limit=3)],
                  include_path=include)
    for bad in (dict(shots=-1), dict(limit=0), dict(limit=1.5), dict(limit=True)):
        with pytest.raises(ValueError):
            TaskRequest(task_name("en"), **bad)


@pytest.mark.slow
def test_run_tasks_matches_the_lm_eval_cli(llama, include, en_alone, tmp_path):
    _, _, directory = llama
    name = task_name("en")
    env = dict(os.environ, **OFFLINE, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    command = [
        str(Path(sys.executable).with_name("lm_eval")),
        "--model", "hf",
        "--model_args", f"pretrained={directory},dtype=float32,max_length={MAX_LENGTH}",
        "--tasks", name,
        "--include_path", str(include),
        "--limit", str(LIMIT),
        "--device", "cpu",
        "--batch_size", "8",
        "--output_path", str(tmp_path),
        "--log_samples",
    ]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    [results_file] = tmp_path.rglob("results_*.json")
    cli = json.loads(results_file.read_text(encoding="utf-8"))
    ours = en_alone["tasks"][name]
    for metric in ("acc", "acc_norm"):
        assert ours["metrics"][metric] == pytest.approx(cli["results"][name][f"{metric},none"], abs=1e-9)
        assert ours["stderr"][metric] == pytest.approx(cli["results"][name][f"{metric}_stderr,none"], abs=1e-9)
    assert ours["samples"] == cli["n-samples"][name]["effective"] == LIMIT
    assert ours["task_hash"] == cli["task_hashes"][name]  # the same documents, prompts and targets


def test_in_place_weight_changes_are_seen(llama, include, en_alone, en_sw):
    model, tokenizer, _ = llama
    name = task_name("en")
    request = [TaskRequest(name, limit=LIMIT)]
    mlp_weights = [module.weight for module_name, module in model.named_modules()
                   if ".mlp." in f".{module_name}." and isinstance(module, torch.nn.Linear)]
    assert mlp_weights
    saved = [weight.detach().clone() for weight in mlp_weights]
    try:
        with torch.no_grad():
            for weight in mlp_weights:
                weight.view(-1)[: weight.numel() // 2] = 0.0
        pruned = run_tasks(model, tokenizer, request, include_path=include, max_length=MAX_LENGTH)["tasks"][name]
    finally:
        with torch.no_grad():
            for weight, original in zip(mlp_weights, saved):
                weight.copy_(original)
    dense = en_alone["tasks"][name]
    assert dense["metrics"] == en_sw["tasks"][name]["metrics"]
    assert pruned["task_hash"] == dense["task_hash"]  # same questions
    assert pruned["responses_hash"] != dense["responses_hash"]  # different answers
    restored = run_tasks(model, tokenizer, request, include_path=include, max_length=MAX_LENGTH)["tasks"][name]
    assert restored["responses_hash"] == dense["responses_hash"]
    assert restored["metrics"] == dense["metrics"]


# ---------------------------------------------------------------------------------------- task names
def test_check_task_names_and_the_disk_cached_index(include, tmp_path, monkeypatch):
    monkeypatch.setenv("SWEEP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(lm_tasks, "_INDEX_MEMO", {})
    names = ["demo_continuation_en", "belebele_deu_Latn", "xnli_xx", "belebel_eng_Latn"]
    with pytest.raises(UnknownTaskError) as raised:
        check_task_names(names, include)
    error = raised.value
    assert list(error.unknown) == ["xnli_xx", "belebel_eng_Latn"]
    assert "belebele_eng_Latn" in error.unknown["belebel_eng_Latn"]
    assert "xnli_en" in error.unknown["xnli_xx"]
    assert all(close.startswith("xnli") for close in error.unknown["xnli_xx"])
    message = str(error)
    assert "'xnli_xx'" in message and "'belebel_eng_Latn'" in message and "belebele_eng_Latn" in message
    assert "'belebele_deu_Latn'" not in message and "'demo_continuation_en'" not in message

    cache_file = index_cache_path(include)
    assert cache_file.is_file() and cache_file.parent.parent == tmp_path / "cache"
    cached = json.loads(cache_file.read_text(encoding="utf-8"))
    assert cached["lm_eval_version"] == lm_tasks.lm_eval_version()
    assert {"demo_continuation_en", GROUP, "belebele_deu_Latn"} <= set(cached["names"])

    # A fresh process (no in-process memo) is served from the file without building a TaskManager.
    class NoTaskManager:
        def __init__(self, *args, **kwargs):
            raise AssertionError("TaskManager constructed although the index is cached on disk")

    import lm_eval.tasks

    monkeypatch.setattr(lm_tasks, "_INDEX_MEMO", {})
    monkeypatch.setattr(lm_tasks, "_MANAGER_MEMO", {})
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", NoTaskManager)
    start = time.perf_counter()
    index = task_index(include)
    assert time.perf_counter() - start < 1.0
    assert index == frozenset(cached["names"])
    check_task_names(["demo_continuation_en", "belebele_deu_Latn", GROUP], include)


def test_index_key_follows_the_include_yaml(include, tmp_path):
    copy = tmp_path / "tasks"
    copy.mkdir()
    source = include / f"{task_name('en')}.yaml"
    (copy / source.name).write_bytes(source.read_bytes())
    before = include_fingerprint(copy)
    assert include_fingerprint(copy) == before
    (copy / "data.jsonl").write_text("{}\n", encoding="utf-8")  # not YAML: same key
    assert include_fingerprint(copy) == before
    (copy / source.name).write_text(source.read_text(encoding="utf-8").replace("version: 1", "version: 2"),
                                    encoding="utf-8")
    assert include_fingerprint(copy) != before
    assert include_fingerprint(None) != before


def test_manager_for_uses_the_include_path_alone_only_when_it_can(include, tmp_path, monkeypatch):
    local, alone = lm_tasks.manager_for([task_name("en"), GROUP], include)
    assert alone and set(local.all_tasks) == {task_name(lang) for lang in ("ar", "de", "en", "es", "ru", "sw",
                                                                            "zh")} | {GROUP}
    # A local group over a built-in task, or a built-in name, needs the full manager (not built here).
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "g.yaml").write_text(yaml.safe_dump({"group": "mixed_group", "task": [task_name("en"), "xnli_en"]}))
    full = object()
    real = lm_tasks.task_manager
    monkeypatch.setattr(lm_tasks, "task_manager",
                        lambda path=None, include_defaults=True: full if include_defaults else real(path, False))
    assert lm_tasks.manager_for(["mixed_group"], mixed) == (full, False)
    assert lm_tasks.manager_for([task_name("en"), "belebele_deu_Latn"], include) == (full, False)
    with pytest.raises(UnknownTaskError):
        lm_tasks.manager_for(["demo_continuation_xx"], include)


def test_choice_length_does_not_give_the_answer_away(assets, include):
    """lm-eval's `acc` sums log-likelihoods, so the true continuation must not be systematically the
    shortest (or longest) choice: choices are length-matched."""
    for lang in assets.languages:
        docs = read_jsonl(include / "data" / f"{lang}.jsonl")
        lengths = [[len(c) for c in doc["choices"]] for doc in docs]
        assert sum(min(ls) / max(ls) for ls in lengths) / len(docs) > 0.85, lang
        truth_shortest = sum(ls[d["label"]] == min(ls) and ls.count(min(ls)) == 1 for d, ls in zip(docs, lengths))
        assert truth_shortest / len(docs) < 0.6, lang
