"""Security: study files are parsed without constructing objects; nothing in the code or in a study
directory is a pickle (masks, statistics, caches and saved models are safetensors); the cluster configs
bind the dashboard and its Jobs API to the head's localhost and start every node with token
authentication, as docs/cluster.md documents. One small real run (embedded Ray, the demo model) also checks
that a model giving a non-finite perplexity has its trials recorded as failed, with the reason, once
(not retried) and kept out of the results.
"""
from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import pytest
import yaml

from sweep.study.yaml_loader import StudyFileError, _StrictLoader, load_yaml_text
from tests.conftest import REPO, light_demo_study

CORPUS = Path(__file__).resolve().parent / "bad_studies"
PICKLE_MAGIC = re.compile(rb"^\x80[\x02-\x05]")  # protocol 2..5 start with PROTO
PICKLE_NAMES = (".pkl", ".pickle", ".pt", ".pth", ".bin", ".npy", ".npz", ".joblib", ".ckpt")


# -- parsing ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", [
    "!!python/object/apply:os.system ['touch {marker}']\n",
    "name: !!python/object/new:subprocess.Popen [[touch, '{marker}']]\n",
    "name: !!python/name:os.system\n",
    "name: !!python/object:pathlib.PurePosixPath {{}}\n",
    "name: !!python/module:os\n",
    "name: !!binary aGVsbG8=\nx: !!set {{a: null}}\n",
])
def test_yaml_tags_never_construct_objects(text, tmp_path):
    marker = tmp_path / "pwned"
    try:
        data = load_yaml_text(text.format(marker=marker), "study.yaml")
    except StudyFileError as err:
        assert "malformed YAML" in err.message
    else:  # only YAML's own standard types may construct, into plain values
        assert all(type(v) in (bytes, set) for v in data.values()), data
    assert not marker.exists()


def test_the_study_loader_is_a_safe_loader_without_python_constructors():
    assert issubclass(_StrictLoader, yaml.SafeLoader)
    constructors = {**_StrictLoader.yaml_constructors, **_StrictLoader.yaml_multi_constructors}
    assert not [tag for tag in constructors if tag and "python" in tag]
    tagged = [p.name for p in CORPUS.glob("yaml_python_*.yaml")]
    assert len(tagged) >= 3, tagged  # and tests/reliability/test_hostile_input.py refuses them through the CLI


UNSAFE_CALLS = re.compile(
    r"^\s*(import|from)\s+(pickle|cPickle|dill|joblib|cloudpickle|shelve|marshal)\b"
    r"|\btorch\.(save|load)\(|\bnp\.(save|savez|savez_compressed|load)\(|allow_pickle\s*=\s*True"
    r"|\byaml\.(load|unsafe_load|full_load|load_all)\(|\byaml\.(Unsafe|Full)?Loader\b|\b(to|read)_pickle\(",
    re.MULTILINE)


def test_no_pickle_or_unsafe_yaml_in_the_code():
    """No module of the project writes or reads pickles (torch.save, np.save, joblib, ...) or parses YAML
    with a loader that constructs objects. (Ray pickles task arguments on the wire; that is not the store.)"""
    found = []
    for folder in ("sweep", "engine", "scripts"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for match in UNSAFE_CALLS.finditer(path.read_text(encoding="utf-8")):
                found.append(f"{path.relative_to(REPO)}: {match.group(0).strip()}")
    assert not found, found


# -- the cluster ------------------------------------------------------------------------------------------------
LOCALHOST = ("127.0.0.1", "localhost", "::1")


def ray_start_default(option: str):
    from ray.scripts.scripts import start

    return next(p for p in start.params if p.name == option).default


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster.local.yaml"])
def test_cluster_dashboard_and_job_server_bound_to_localhost_with_token_auth(name):
    """The Jobs API is served by the dashboard's HTTP server (ray/dashboard/modules/job/job_head.py), so
    the dashboard's host is the job server's. Ray 2.60's own default for `ray start --dashboard-host` is
    localhost too; the configs write it out so that a change of default cannot open it."""
    config = yaml.safe_load((REPO / name).read_text(encoding="utf-8"))
    head = " ".join(config["head_start_ray_commands"])
    hosts = re.findall(r"--dashboard-host[= ](\S+)", head)
    assert hosts == ["127.0.0.1"], hosts
    assert ray_start_default("dashboard_host") in LOCALHOST  # what an unset --dashboard-host would give
    assert "0.0.0.0" not in head and "--ray-client-server-port" not in head
    for commands in ("head_start_ray_commands", "worker_start_ray_commands"):
        # `ray start` itself, or scripts/ray_node.sh (cluster.local.yaml), which runs it in this environment
        starts = [c for c in config[commands] if "ray start" in c or "ray_node.sh" in c]
        assert starts and all(re.search(r"RAY_AUTH_MODE=token (ray start|bash \S*scripts/ray_node\.sh) ", c)
                              for c in starts), starts
    assert any("export RAY_AUTH_MODE=token" in c for c in config["setup_commands"])
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_token_authentication_is_documented():
    runbook = (REPO / "docs" / "cluster.md").read_text(encoding="utf-8")
    for needed in ("ray get-auth-token --generate", "RAY_AUTH_MODE=token", "~/.ray/auth_token", "401",
                   "127.0.0.1:8265", "--dashboard-host=127.0.0.1", "keep it out of version control"):
        assert needed in runbook, needed


# -- a small real run -------------------------------------------------------------------------------------------
def nan_model(source: Path, target: Path) -> Path:
    """A copy of a demo model whose final norm holds a NaN: pruning (which touches only the decoder
    blocks' linear layers) works, every perplexity is NaN."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    weights = load_file(target / "model.safetensors")
    weights["model.norm.weight"][0] = float("nan")
    save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
    return target


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    from engine.demo import ensure_demo_assets
    from sweep.execution.driver import RunOptions, run_study
    from sweep.study.env import default_demo_dir

    ensure_demo_assets(log=print)
    directory = tmp_path_factory.mktemp("secure")
    path = light_demo_study(directory, name="secure", models=("demo-llama",), languages=["sw"],
                            pruners=[{"method": "wanda", "sparsity": 0.5}])
    study = yaml.safe_load(path.read_text(encoding="utf-8"))
    broken = nan_model(default_demo_dir() / "models" / "demo-llama", directory / "demo-nan")
    study["models"].append({**study["models"][0], "name": "demo-nan", "path": str(broken)})
    study["analyses"] = {"masks": {"enabled": True, "save_masks": True}, "lape": {"enabled": True}}
    study["save_models"] = {"enabled": True}
    path.write_text(yaml.safe_dump(study, sort_keys=False), encoding="utf-8")
    outcome = run_study(path, RunOptions(num_cpus=2, progress=False))
    return outcome, directory / "runs" / "secure"


def events(directory: Path) -> list[dict]:
    from sweep.store.study_store import StudyStore

    return [e.to_json() for e in StudyStore(directory).read_events().events]


@pytest.mark.slow
def test_no_pickle_in_the_study_directory_and_tensors_are_safetensors(small_run):
    outcome, directory = small_run
    files = [p for p in directory.rglob("*") if p.is_file()]
    assert files
    pickles = [str(p) for p in files if p.suffix in PICKLE_NAMES or PICKLE_MAGIC.match(p.read_bytes()[:2])]
    assert not pickles, pickles
    finished = {e["name"]: e for e in events(directory) if e.get("event") == "finished"}
    pruned = finished["demo-llama.wanda.s50.cal-sw.seed0"]
    masks = Path(pruned["pruning"]["masks_path"])
    assert masks.name == "masks.safetensors" and masks.is_file()
    model = Path(pruned["saved_model"])
    assert sorted(p.name for p in model.glob("*.safetensors")) == ["model.safetensors"]
    tensors = [p for p in files if p.suffix == ".safetensors"]
    assert {p.name for p in tensors} >= {"masks.safetensors", "model.safetensors", "statistics.safetensors"}
    from safetensors import safe_open

    for path in tensors:  # each one really is a safetensors file
        with safe_open(str(path), "pt") as handle:
            assert list(handle.keys()), path


@pytest.mark.slow
def test_non_finite_perplexity_is_recorded_failed_with_its_reason_and_not_averaged_in(small_run):
    """The engine half is tests/engine/test_trial.py::test_non_finite_perplexity_fails_the_trial_with_a_reason;
    this is the sweep's: the failure is final at once (retries: 1 is not spent on it), its event says
    why, and the results hold only the healthy model's trials."""
    import polars as pl

    outcome, directory = small_run
    assert outcome.code == 1 and outcome.finished == 2 and outcome.failed == 2
    evs = events(directory)
    failed = [e for e in evs if e.get("event") == "failed"]
    assert sorted(e["name"] for e in failed) == ["demo-nan.dense", "demo-nan.wanda.s50.cal-sw.seed0"]
    for event in failed:
        assert event["final"] and event["attempt"] == 1, event
        assert re.match(r"TrialFailed: non-finite perplexity in \w+ \(NLL nan\); not averaged in", event["error"]), event
    assert not [e for e in evs if e.get("event") == "finished" and e["name"].startswith("demo-nan")]
    results = pl.read_parquet(directory / "results.parquet")
    failed_keys = {e["key"] for e in failed}
    assert results.height and not results.filter(pl.col("key").is_in(list(failed_keys))).height
    assert all(math.isfinite(v) for v in results.filter(pl.col("metric") == "bits_per_byte")["value"].to_list())
