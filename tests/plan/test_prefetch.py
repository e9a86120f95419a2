"""`sweep prefetch`: a local model directory and a local dataset directory standing in for the hub, a hub
cache laid out as huggingface_hub writes it (read through the real `snapshot_download` under
HF_HUB_OFFLINE=1), bad input, and every node of a two-node Ray cluster. Nothing is mocked."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from sweep.cli.main import main
from tests.conftest import REPO, light_demo_study, write_study

COMMIT = "c0ffee" + "0" * 34  # a commit hash as the hub cache names snapshots


@pytest.fixture(scope="module")
def assets():
    from engine.demo import ensure_demo_assets
    from sweep.study.env import apply_default_env

    apply_default_env()
    return ensure_demo_assets(log=print)


def hub_like_dataset(root: Path, corpus: Path, languages: tuple[str, ...]) -> Path:
    """A folder laid out like a hub dataset repository (one config per language, train and validation
    splits declared in its README), which `datasets.load_dataset` reads as it reads the hub."""
    configs = []
    for lang in languages:
        (root / lang).mkdir(parents=True)
        shutil.copy(corpus / lang / "calibration.jsonl", root / lang / "train.jsonl")
        shutil.copy(corpus / lang / "evaluation.jsonl", root / lang / "validation.jsonl")
        configs.append({"config_name": lang, "data_files": [{"split": "train", "path": f"{lang}/train.jsonl"},
                                                            {"split": "validation", "path": f"{lang}/validation.jsonl"}]})
    (root / "README.md").write_text("---\n" + yaml.safe_dump({"configs": configs}) + "---\n", encoding="utf-8")
    return root


def hub_cache_model(hub_cache: Path, repo_id: str, model_dir: Path, extra: dict[str, bytes] | None = None) -> Path:
    """`model_dir`'s files as huggingface_hub caches a download of `repo_id` at main: blobs by hash,
    refs/main naming the commit, snapshots/<commit>/ linking into blobs."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    files = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}
    for rel, data in {**files, **(extra or {})}.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def hub_study(tmp_path: Path, models: list[dict], calibration_source: dict, perplexity_source: dict,
              languages=("en", "de"), mixes=None, seeds=(0,), name="hubby") -> Path:
    study = {
        "name": name,
        "models": models,
        "calibration": {"source": calibration_source, "languages": list(mixes or languages), "samples": 4,
                        "seq_len": 32, "seeds": list(seeds)},
        "pruners": [{"method": "wanda", "sparsity": 0.5}, {"method": "magnitude", "sparsity": 0.5}],
        "evaluation": {"languages": list(languages),
                       "perplexity": {"source": perplexity_source, "window": 64, "max_tokens": 256}},
        "execution": {"output_dir": str(tmp_path / "runs" / "{study}"), "retries": 0, "device": "cpu"},
    }
    return write_study(tmp_path, study, name=f"{name}.yaml")


def sweep_cli(*args: str, env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(REPO), **env}
    full.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "sweep.cli.main", *args], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=timeout)


HUB_SOURCE = {"kind": "hub", "dataset": "hubdata/corpus", "config": "{lang}", "split": "train"}
HUB_EVAL = {**HUB_SOURCE, "split": "validation"}


def test_prefetch_fills_the_cache_trials_read_and_they_no_longer_need_the_source(assets, tmp_path, monkeypatch):
    """Local model directories, and a local folder standing in for a hub dataset: prefetch builds each
    calibration set once per tokenizer (the two demo models share one) and the evaluation text; with the
    dataset folder gone, the trials' own calibration and evaluation paths still get the same tokens."""
    from transformers import AutoTokenizer

    from engine.data.calibration import WindowRequest, calibration_set
    from engine.trial import evaluation_tokens
    from sweep.plan.prefetch.items import plan_prefetch
    from sweep.plan.prefetch.run import run_prefetch
    from sweep.study.grid import expand
    from sweep.study.load import load_study
    from sweep.study.trials import evaluation_config, trial_config

    monkeypatch.chdir(tmp_path)  # "hubdata/corpus" resolves here, as a hub id resolves on the hub
    hub_like_dataset(tmp_path / "hubdata" / "corpus", assets.corpus_dir, ("en", "de"))
    models = [{"name": name, "path": str(assets.model_dirs[name]), "dtype": "float32", "gpus": 0, "max_seq_len": 512}
              for name in ("demo-llama", "demo-cohere")]
    path = hub_study(tmp_path, models, HUB_SOURCE, HUB_EVAL, mixes=["en", "de", "en+de"], seeds=(0, 1))
    study = load_study(path)
    plan = expand(study)
    work = plan_prefetch(study, plan)
    cache = tmp_path / "runs" / "hubby" / "cache"
    assert work.cache_dir == cache
    assert len(work.calibration) == 6  # 3 languages or mixes x 2 seeds; the models' trials share the configs
    assert all(item.models == ("demo-llama", "demo-cohere") for item in work.calibration)

    lines = []
    result = run_prefetch(work, on_item=lines.append)
    assert result.ok, [i.error for i in result.items if i.error]
    by_kind = {}
    for item in result.items:
        by_kind.setdefault(item.kind, []).append(item)
    assert [i.status for i in by_kind["model"]] == ["local", "local"]
    assert [i.status for i in by_kind["calibration"]] == ["built"] * 6  # once per set: one tokenizer for both
    assert all("demo-llama, demo-cohere" in i.detail and i.bytes > 0 for i in by_kind["calibration"])
    assert [i.status for i in by_kind["evaluation"]] == ["built"] * 2
    assert len(lines) == len(result.items)  # one progress line per item, as it finished
    assert len(list((cache / "calibration").glob("*.safetensors"))) == 6
    assert len(list((cache / "evaluation").glob("*.safetensors"))) == 2

    tokenizer = AutoTokenizer.from_pretrained(str(assets.model_dirs["demo-llama"]))
    perplexity = evaluation_config(study).perplexity
    streamed = {lang: evaluation_tokens(perplexity, lang, tokenizer) for lang in ("en", "de")}  # no cache: the source

    (tmp_path / "hubdata").rename(tmp_path / "hubdata-gone")  # "hubdata/corpus" would now be looked up on the hub
    for trial in plan.pruned:
        if trial.calibration is None:
            continue
        cal = trial_config(study, trial, cache_dir=cache).calibration
        request = WindowRequest(cal.samples, cal.seq_len, cal.seed)
        windows = calibration_set(cal.source, tokenizer, cal.weights, request, cache, cal.source_fingerprint)
        assert tuple(windows.shape) == (4, 32)
    for lang in ("en", "de"):
        assert evaluation_tokens(perplexity, lang, tokenizer, cache) == streamed[lang]
    assert not (tmp_path / "hubdata").exists()

    again = run_prefetch(work)
    assert again.ok and {i.status for i in again.items if i.kind in ("calibration", "evaluation")} == {"cached"}


def test_hub_models_through_snapshot_download_offline_and_every_failure_listed(assets, tmp_path):
    """A hub cache written in huggingface_hub's layout serves one model through the real snapshot_download
    under HF_HUB_OFFLINE=1; a model missing from it gives one line naming it, the rest is still done, and
    the exit code is 1. --dry-run says the same without fetching; --json is machine-readable."""
    hub = tmp_path / "hf" / "hub"
    # what a Llama-3 repository also ships and a trial never reads: must not count as the snapshot
    hub_cache_model(hub, "calib-test/demo-llama", assets.model_dirs["demo-llama"],
                    extra={"original/consolidated.00.pth": b"x" * 1000})
    models = [{"name": "present", "hub": "calib-test/demo-llama", "dtype": "float32", "gpus": 0, "max_seq_len": 512},
              {"name": "absent", "hub": "calib-test/no-such-model", "dtype": "float32", "gpus": 0}]
    local = {"kind": "local", "path": str(assets.corpus_dir), "split": "calibration"}
    local_eval = {**local, "split": "evaluation"}
    path = hub_study(tmp_path, models, local, local_eval, languages=("en",))
    env = {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

    dry = sweep_cli("prefetch", str(path), "--dry-run", "--json", env=env, cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    items = {(i["kind"], i["name"]): i for i in json.loads(dry.stdout)["nodes"][0]["items"]}
    assert items[("model", "present (calib-test/demo-llama@main)")]["status"] == "cached"
    assert items[("model", "absent (calib-test/no-such-model@main)")]["status"] == "would fetch"
    assert items[("calibration", "cal-en seed 0")]["status"] == "would build"
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing

    run = sweep_cli("prefetch", str(path), "--json", env=env, cwd=tmp_path)
    assert run.returncode == 1, run.stderr
    report = json.loads(run.stdout)
    assert report["ok"] is False
    node = report["nodes"][0]
    statuses = [(i["kind"], i["status"]) for i in node["items"]]
    assert statuses[:2] == [("model", "cached"), ("model", "failed")]
    assert ("calibration", "built") in statuses and ("calibration", "skipped") in statuses  # the rest went on
    present = node["items"][0]
    assert present["bytes"] == sum(p.stat().st_size for p in assets.model_dirs["demo-llama"].iterdir())  # no original/
    errors = [line for line in run.stderr.splitlines() if line.startswith("  error:")]
    assert len(errors) == 1, run.stderr
    assert "models[1] (calib-test/no-such-model@main)" in errors[0] and "HF_HUB_OFFLINE=1" in errors[0]
    assert "prefetch hubby" in run.stderr and "present (calib-test/demo-llama@main)" in run.stderr  # progress lines


def test_model_files_selected_are_what_a_trial_loads():
    """The patterns go through huggingface_hub's own filter (what snapshot_download applies to the
    repository listing): a Llama-3 repository's original/ checkpoint and .bin/.pth duplicates are left."""
    from huggingface_hub.utils import filter_repo_objects

    from sweep.plan.prefetch.models import IGNORE_PATTERNS, model_patterns

    listing = [".gitattributes", "LICENSE", "README.md", "USE_POLICY.md", "config.json", "generation_config.json",
               "model-00001-of-00004.safetensors", "model-00004-of-00004.safetensors", "model.safetensors.index.json",
               "original/consolidated.00.pth", "original/params.json", "original/tokenizer.model",
               "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "pytorch_model.bin",
               "onnx/model.safetensors", "modeling_custom.py"]
    chosen = set(filter_repo_objects(listing, allow_patterns=model_patterns(False), ignore_patterns=list(IGNORE_PATTERNS)))
    assert chosen == {"config.json", "generation_config.json", "model-00001-of-00004.safetensors",
                      "model-00004-of-00004.safetensors", "model.safetensors.index.json", "special_tokens_map.json",
                      "tokenizer.json", "tokenizer_config.json"}
    remote = set(filter_repo_objects(listing, allow_patterns=model_patterns(True), ignore_patterns=list(IGNORE_PATTERNS)))
    assert remote - chosen == {"modeling_custom.py"}


def test_hub_errors_become_one_line_naming_the_model_and_the_fix():
    """The hub's own answers (turned into exceptions by huggingface_hub's hf_raise_for_status)."""
    import httpx2
    from huggingface_hub.utils import hf_raise_for_status

    from sweep.plan.prefetch.items import ModelItem
    from sweep.plan.prefetch.models import hub_error_line

    model = ModelItem(0, "llama3-8b", "meta-llama/Meta-Llama-3-8B-Instruct", None, None, False)

    def error(status: int, code: str | None):
        url = "https://huggingface.co/api/models/meta-llama/Meta-Llama-3-8B-Instruct/revision/main"
        response = httpx2.Response(status, headers={"X-Error-Code": code} if code else {},
                                   request=httpx2.Request("GET", url))
        with pytest.raises(Exception) as caught:
            hf_raise_for_status(response)
        return hub_error_line(model, caught.value)

    gated = error(403, "GatedRepo")
    assert gated.startswith("models[0] (meta-llama/Meta-Llama-3-8B-Instruct@main): gated model")
    assert "HF_TOKEN" in gated and "licence" in gated and "\n" not in gated
    missing = error(401, "RepoNotFound")
    assert "not found, or private (HTTP 401)" in missing and "HF_TOKEN" in missing
    assert "has no revision 'main'" in error(404, "RevisionNotFound")


def test_bad_input_exits_2_naming_the_problem_and_writes_nothing(assets, tmp_path, monkeypatch, capsys):
    from sweep.plan.prefetch.caches import CACHE_ENV_VARS

    for name in CACHE_ENV_VARS:  # restored after the test: --cache-dir sets them in this process
        monkeypatch.setenv(name, os.environ.get(name, str(tmp_path / "unused")))
    assert main(["prefetch", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err

    study = yaml.safe_load(light_demo_study(tmp_path).read_text())
    study["calibration"]["seedz"] = [0]
    bad = write_study(tmp_path, study, name="bad.yaml")
    assert main(["prefetch", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "calibration.seedz: unknown key" in err and "nothing was started or written" in err

    good = light_demo_study(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["prefetch", str(good), "--out", str(blocker / "study")]) == 2
    err = capsys.readouterr().err
    assert "error: trial cache (--out / execution.output_dir): cannot write" in err and "is not a directory" in err
    assert "nothing was fetched or written" in err
    assert main(["prefetch", str(good), "--out", "s3://bucket/study", "--cache-dir", str(blocker / "c")]) == 2
    err = capsys.readouterr().err
    assert "error: --cache-dir: cannot write" in err and str(blocker) in err
    assert main(["prefetch", str(good), "--each-node", "--address", ""]) == 2
    assert "--each-node: no Ray cluster" in capsys.readouterr().err


def test_run_options_reach_the_workers():
    """`sweep run --offline` and `--cache-dir` set variables that sweep.execution.ray_runtime forwards to every worker."""
    from sweep.cli.main import build_parser
    from sweep.execution.ray_runtime import FORWARDED_ENV_PREFIXES
    from sweep.plan.prefetch.caches import OFFLINE_ENV, cache_env

    forwarded = [*OFFLINE_ENV, *cache_env("/x")]
    assert all(name.startswith(FORWARDED_ENV_PREFIXES) for name in forwarded)
    args = build_parser().parse_args(["run", "s.yaml", "--offline", "--cache-dir", "/c"])
    assert args.offline and args.cache_dir == "/c"
    assert cache_env("/c") == {"HF_HUB_CACHE": "/c/huggingface/hub", "HF_DATASETS_CACHE": "/c/huggingface/datasets",
                               "SWEEP_CACHE_DIR": "/c/sweep"}


@pytest.mark.slow
def test_sweep_runs_offline_after_prefetch_with_the_dataset_gone(assets, tmp_path):
    """End to end through the CLI: a hub model from a hub cache, calibration and evaluation text from a
    stand-in hub dataset; after `sweep prefetch` the dataset folder is removed and `sweep run --offline`
    (HF_HUB_OFFLINE=1 on the workers) finishes every trial from the caches."""
    hub = tmp_path / "hf" / "hub"
    hub_cache_model(hub, "calib-test/demo-llama", assets.model_dirs["demo-llama"])
    hub_like_dataset(tmp_path / "hubdata" / "corpus", assets.corpus_dir, ("en", "de"))
    models = [{"name": "llama", "hub": "calib-test/demo-llama", "dtype": "float32", "gpus": 0, "max_seq_len": 512}]
    path = hub_study(tmp_path, models, HUB_SOURCE, HUB_EVAL)
    env = {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "token"}

    fetched = sweep_cli("prefetch", str(path), env=env, cwd=tmp_path)
    assert fetched.returncode == 0, fetched.stdout + fetched.stderr
    assert "ready: sweep run" in fetched.stdout and "failed" not in fetched.stderr

    shutil.rmtree(tmp_path / "hubdata")
    env.pop("HF_HUB_OFFLINE")  # --offline sets it, and the rest, for the driver and every worker
    ran = sweep_cli("run", str(path), "--offline", "--num-cpus", "1", "--no-progress", env=env, cwd=tmp_path,
                    timeout=600)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "warning: --offline" not in ran.stderr  # the model is in the cache
    from sweep.store.study_store import StudyStore

    events = [e.to_json() for e in StudyStore(tmp_path / "runs" / "hubby").read_events().events]
    finished = [e for e in events if e.get("event") == "finished"]
    assert len(finished) == 4  # dense + magnitude + wanda x {en, de}
    assert not [e for e in events if e.get("event") == "failed"]
    assert {e["trial"]["calibration"] for e in finished if e["trial"]["pruner"] == "wanda"} == {"en", "de"}


@pytest.mark.slow
def test_each_node_prefetches_on_every_node_of_a_cluster(assets, tmp_path, monkeypatch, capsys):
    from ray.cluster_utils import Cluster

    study = light_demo_study(tmp_path, models=("demo-llama",), languages=["en", "sw"])
    temp_dir = tempfile.mkdtemp(prefix="sweep-p-")  # short: Ray's socket paths must fit in 107 bytes
    monkeypatch.setenv("RAY_TMPDIR", temp_dir)
    os.makedirs(os.path.join(temp_dir, "ray"))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "temp_dir": temp_dir})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        code = main(["prefetch", str(study), "--each-node", "--address", cluster.address, "--json"])
        out = capsys.readouterr()
        assert code == 0, out.err
        node_ids = {n.node_id for n in cluster.list_all_nodes()}
    finally:
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    report = json.loads(out.out)
    nodes = report["nodes"]
    assert report["ok"] and len(nodes) == 2 and {n["node_id"] for n in nodes} == node_ids
    for node in nodes:
        cal = [i for i in node["items"] if i["kind"] == "calibration"]
        assert len(cal) == 2 and {i["status"] for i in cal} <= {"built", "cached"}
        assert node["trial_cache"] == str(tmp_path / "runs" / "light" / "cache")
    assert sum(line.startswith("node ") for line in out.err.splitlines()) == 2  # one line per node
    assert len(list((tmp_path / "runs" / "light" / "cache" / "calibration").glob("*.safetensors"))) == 2
