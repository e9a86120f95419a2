"""cluster.yaml (AWS) and cluster.local.yaml (on-prem): valid for the Ray cluster launcher that ships with the
installed Ray, and consistent with the project (its torch pin, its Ray, the GPUs its reference study asks
for). `ray up` itself needs a cloud account or SSH machines and is not run here; scripts/run_study.py (the
`ray submit` entry script) is checked for the arguments it hands to `sweep run`.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, STUDIES

CONFIGS = ["cluster.yaml", "cluster.local.yaml"]


def load(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text(encoding="utf-8"))


def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", CONFIGS)
def test_config_validates_against_the_ray_launcher_schema(name):
    import jsonschema  # a dependency of ray[default]

    config = load(name)
    schema = ray_schema()
    jsonschema.validate(config, schema)  # the file as written: top-level keys, node types, auth, commands
    assert set(config) <= set(schema["properties"])


@pytest.mark.parametrize("name", CONFIGS)
def test_config_passes_the_launchers_own_preparation_and_validation(name):
    """What `ray up` does with the file before it contacts any machine: defaults filled in from the
    provider's defaults.yaml, setup commands merged, worker limits set, the result validated again."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(load(name)))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_aws_node_types_declare_resources_and_scale_from_zero():
    config = load("cluster.yaml")
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # the driver only: no worker actor on the head
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert len(workers) >= 2
    for name, node_type in workers.items():
        assert node_type["min_workers"] == 0, name
        assert node_type["max_workers"] >= 1, name
        assert node_type["resources"]["GPU"] >= 1 and node_type["resources"]["CPU"] >= 1, name
        assert node_type["node_config"]["InstanceType"], name
    assert sum(t["max_workers"] for t in workers.values()) <= config["max_workers"]
    # every model of the reference study fits on some worker type
    study = yaml.safe_load((STUDIES / "kurz2024.yaml").read_text(encoding="utf-8"))
    most = max(t["resources"]["GPU"] for t in workers.values())
    assert all(model["gpus"] <= most for model in study["models"])


@pytest.mark.parametrize("name", CONFIGS)
def test_every_node_installs_this_project_with_the_pinned_torch_and_this_ray(name):
    import ray

    config = load(name)
    pin = next(line.strip() for line in (REPO / "constraints.txt").read_text().splitlines()
               if line.strip().startswith("torch=="))
    setup = config["setup_commands"]
    assert any(f"-c ~/calibration-sweep/constraints.txt {pin}" in cmd for cmd in setup), setup
    project = [cmd for cmd in setup if "-e " in cmd and "calibration-sweep" in cmd]
    assert len(project) == 1 and "constraints.txt" in project[0]
    # the launcher on the laptop and Ray on the cluster must be the same version
    assert f'"ray[default]=={ray.__version__}"' in project[0]
    # the torch install comes before the project's (so the project cannot pull another torch)
    assert setup.index(next(c for c in setup if pin in c)) < setup.index(project[0])
    # GPU workers refuse a CPU build of torch
    assert any("torch.cuda.is_available()" in cmd for cmd in config["worker_setup_commands"])
    # the project tree and the token are mounted on every node
    mounts = config["file_mounts"]
    assert (REPO / mounts["~/calibration-sweep"] / "pyproject.toml").is_file()  # `ray up` from the repo root
    assert mounts["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert ".gitignore" in config["rsync_filter"]  # keeps .venv, .cache and runs/ off the nodes


@pytest.mark.parametrize("name", CONFIGS)
def test_every_node_starts_ray_with_token_authentication(name):
    config = load(name)
    head = " ".join(config["head_start_ray_commands"])
    workers = " ".join(config["worker_start_ray_commands"])
    if name == "cluster.local.yaml":  # machines that may be shared: no `ray stop`, our own script
        assert re.search(r"RAY_AUTH_MODE=token bash ~/calibration-sweep/scripts/ray_node.sh head\b", head)
        assert re.search(r"RAY_AUTH_MODE=token bash ~/calibration-sweep/scripts/ray_node.sh worker\b", workers)
        assert "ray stop" not in head + workers
    else:
        assert re.search(r"RAY_AUTH_MODE=token ray start --head\b", head)
        assert re.search(r"RAY_AUTH_MODE=token ray start --address=\$RAY_HEAD_IP:6379", workers)
    assert "--dashboard-port=8265" in head  # what `ray dashboard CONFIG` forwards and the README uses
    assert any("export RAY_AUTH_MODE=token" in cmd for cmd in config["setup_commands"])  # ray submit / attach


def test_local_provider_variant_lists_head_and_worker_ips():
    config = load("cluster.local.yaml")
    provider = config["provider"]
    assert provider["type"] == "local" and provider["head_ip"] and provider["worker_ips"]
    assert "available_node_types" not in config  # the local provider makes its own single node type


# -- scripts/run_study.py, the `ray submit` entry script ------------------------------------------------
@pytest.fixture(scope="module")
def run_study_script():
    spec = importlib.util.spec_from_file_location("run_study", REPO / "scripts" / "run_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_entry_script_joins_the_running_cluster_unless_told_where(run_study_script, monkeypatch):
    build = run_study_script.build_argv
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert build(["s.yaml", "--out", "s3://b/s"]) == ["run", "s.yaml", "--out", "s3://b/s", "--address", "auto"]
    assert build(["s.yaml", "--address", "10.0.0.5:6379"]) == ["run", "s.yaml", "--address", "10.0.0.5:6379"]
    assert build(["s.yaml", "--address=10.0.0.5:6379"]) == ["run", "s.yaml", "--address=10.0.0.5:6379"]
    assert build([]) == ["run", "--help"]
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")  # `sweep run` reads it itself
    assert build(["s.yaml"]) == ["run", "s.yaml"]


# -- scripts/ray_node.sh: cluster.local.yaml's start and stop, by process id only ------------------------
def _ours(marker: str) -> list:
    """Processes whose command line names this test's unique directory (Ray passes its temp dir to
    every process of the node), read-only."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(marker in part for part in proc.info["cmdline"] or []):
            found.append(proc)
    return found


@pytest.mark.slow
def test_ray_node_script_restarts_and_stops_only_the_ray_it_started():
    import os
    import secrets
    import shutil
    import subprocess
    import tempfile
    import time

    import psutil

    from tests.ray_processes import BIN, free_port_range, free_ports

    root = Path(tempfile.mkdtemp(prefix="swn-", dir="/tmp"))  # short: Ray's socket paths stay < 107 bytes
    token_file = root / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    gcs, node_manager, object_manager, metrics, agent_http, agent_grpc, runtime_env_agent = ports = free_ports(7)
    workers = free_port_range(16, set(ports))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file), "RAY_TMPDIR": str(root),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0",
           "SWEEP_RAY_STATE": str(root / "state"), "SWEEP_RAY_PORT": str(gcs)}
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):
        env.pop(name, None)
    script = ["bash", str(REPO / "scripts" / "ray_node.sh")]
    options = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0", f"--temp-dir={root / 'ray'}",
               "--object-store-memory=100000000", "--include-dashboard=false", "--disable-usage-stats",
               f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
               f"--metrics-export-port={metrics}", f"--dashboard-agent-listen-port={agent_http}",
               f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env_agent}",
               f"--min-worker-port={workers}", f"--max-worker-port={workers + 15}"]
    pidfile = root / "state" / "ray.pid"
    started: list[int] = []

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*script, *args], env=env, capture_output=True, text=True, timeout=300)

    try:
        assert run().returncode == 2  # no subcommand: usage
        first = run("head", *options)
        assert first.returncode == 0, first.stderr + (root / "state" / "ray.log").read_text()[-3000:]
        started.append(int(pidfile.read_text()))
        assert psutil.pid_exists(started[0])
        assert any("raylet" in " ".join(p.cmdline()) for p in _ours(str(root)))

        again = run("head", *options)  # what `ray up` does on a restart: our old Ray first, by its pid
        assert again.returncode == 0, again.stderr
        started.append(int(pidfile.read_text()))
        assert started[1] != started[0] and not psutil.pid_exists(started[0])

        stopped = run("stop")
        assert stopped.returncode == 0, stopped.stderr
        assert not pidfile.exists() and not psutil.pid_exists(started[1])
        deadline = time.monotonic() + 30
        while _ours(str(root)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _ours(str(root)), "the node's processes outlived its `ray start --block`"
        assert run("stop").returncode == 0  # nothing of ours left: a no-op
    finally:
        for proc in _ours(str(root)):  # only if an assertion failed midway: our processes, by pid
            try:
                proc.kill()
            except psutil.Error:
                pass
        shutil.rmtree(root, ignore_errors=True)
