"""A study on a real multi-process Ray cluster: a head and two worker nodes started with `ray start` as
separate processes (their own ports, temp directories and raylets), the study directory on a path every
node sees, and one worker node killed mid-run: its raylet and its worker processes get SIGKILL, as when
a machine dies. The study must finish with every trial done once and every artifact on the shared disk.

Then the two ways a study directory gets lost are refused: a local path on a cluster without
--shared-dir (before any trial), and, with --shared-dir, a node that does not in fact see the directory:
a third worker node runs in its own mount namespace (`unshare`), where a tmpfs hides the study's folder,
so the sentinel the driver wrote is not there and that node's first actor stops the run.

Logical GPUs (`ray start --num-gpus=1`) on this CPU machine: the scheduler places one-GPU actors, and the
trials run on the CPU. Processes are stopped by pid, never with `ray stop`.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import yaml

from sweep.store.study_store import StudyStore
from tests.conftest import REPO, light_demo_study
from tests.ray_processes import BIN, free_port_range, free_ports, stop_started

pytestmark = pytest.mark.slow


@dataclass
class Node:
    name: str
    process: subprocess.Popen
    temp_dir: Path
    log: Path


@dataclass
class LocalCluster:
    root: Path
    env: dict
    gcs: str
    nodes: dict[str, Node] = field(default_factory=dict)
    files: list = field(default_factory=list)

    def start_node(self, name: str, head: bool, prefix: tuple[str, ...] = ()) -> Node:
        """`ray start --block` of one node, its own ports and temp dir; waits until the cluster lists it."""
        temp_dir = self.root / name
        ports = free_ports(7 if not head else 8)
        workers = free_port_range(32, set(ports))
        command = [str(BIN / "ray"), "start", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
                   f"--temp-dir={temp_dir}", "--object-store-memory=100000000",
                   f"--node-manager-port={ports[0]}", f"--object-manager-port={ports[1]}",
                   f"--metrics-export-port={ports[2]}", f"--dashboard-agent-listen-port={ports[3]}",
                   f"--dashboard-agent-grpc-port={ports[4]}", f"--runtime-env-agent-port={ports[5]}",
                   f"--min-worker-port={workers}", f"--max-worker-port={workers + 31}"]
        if head:
            command += ["--head", f"--port={self.gcs.split(':')[1]}", f"--ray-client-server-port={ports[6]}",
                        "--include-dashboard=false",
                        "--num-cpus=1", "--num-gpus=0"]  # the driver's node: no actor fits here
        else:
            command += [f"--address={self.gcs}", "--num-cpus=1", "--num-gpus=1"]
        log = self.root / f"{name}.log"
        handle = open(log, "w")
        self.files.append(handle)
        process = subprocess.Popen([*prefix, *command], cwd=self.root, env=self.env, stdout=handle,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        node = Node(name, process, temp_dir, log)
        self.nodes[name] = node
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text(errors="replace"):
            if process.poll() is not None:
                raise AssertionError(f"`ray start` of {name} exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            assert time.monotonic() < deadline, f"{name} did not join in 120 s:\n{log.read_text()[-4000:]}"
            time.sleep(1.0)
        return node

    def raylet(self, node: Node) -> psutil.Process:
        for proc in psutil.Process(node.process.pid).children(recursive=True):
            if "raylet" in proc.name() or any("raylet/raylet" in part for part in proc.cmdline()[:1]):
                return proc
        raise AssertionError(f"no raylet under {node.name}'s `ray start`")


@pytest.fixture(scope="module")
def assets():
    from engine.demo import ensure_demo_assets

    return ensure_demo_assets(log=print)


@pytest.fixture(scope="module")
def cluster(assets):
    from sweep.study.env import default_demo_dir

    root = Path(tempfile.mkdtemp(prefix="swm-", dir="/tmp"))  # short: Ray's socket paths must stay < 107 bytes
    token_file = root / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file), "RAY_TMPDIR": str(root),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "SWEEP_DEMO_DIR": str(default_demo_dir()),
           "RAY_USAGE_STATS_ENABLED": "0"}
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN"):
        env.pop(name, None)
    (gcs,) = free_ports(1)
    local = LocalCluster(root=root, env=env, gcs=f"127.0.0.1:{gcs}")
    try:
        local.start_node("head", head=True)
        local.start_node("worker-a", head=False)
        local.start_node("worker-b", head=False)
        yield local
    finally:
        try:
            # Every node asked to stop at once (each `ray start --block` shuts its node down on SIGTERM),
            # then whatever of ours is left stopped by pid, node by node.
            for node in local.nodes.values():
                if node.process.poll() is None:
                    node.process.send_signal(signal.SIGTERM)
            psutil.wait_procs([psutil.Process(n.process.pid) for n in local.nodes.values() if n.process.poll() is None],
                              timeout=10)
            for node in reversed(list(local.nodes.values())):
                stop_started(node.process, str(root))
        finally:
            for handle in local.files:
                handle.close()
            shutil.rmtree(root, ignore_errors=True)


def gpu_study(directory: Path, **kw) -> Path:
    """The light demo grid with one logical GPU per actor (trials run on the CPU: device cpu)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = light_demo_study(directory, **kw)
    study = yaml.safe_load(path.read_text())
    for model in study["models"]:
        model["gpus"] = 1
    study["execution"]["cpus_per_actor"] = 1
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def sweep_run(cluster: LocalCluster, study: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "sweep"), "run", str(study), "--out", str(out), "--address", cluster.gcs,
                             "--no-progress", *extra], cwd=REPO, env=cluster.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def event_lines(out: Path) -> list[dict]:
    return [e.to_json() for e in StudyStore(out).read_events().events] if (out / "events").is_dir() else []


def test_a_local_directory_on_a_cluster_is_refused_without_shared_dir(cluster):
    study = gpu_study(cluster.root / "refused", models=("demo-llama",), languages=["en"])
    out = cluster.root / "refused" / "out"
    run = sweep_run(cluster, study, out)
    output, _ = run.communicate(timeout=120)
    assert run.returncode == 2, output
    assert "is a local path, and this run joins a Ray cluster" in output and "--shared-dir" in output, output
    assert "Nothing was run." in output
    assert not out.exists(), "a refused run wrote into the study directory"


def test_worker_node_killed_mid_run_loses_nothing_and_repeats_nothing(cluster):
    work = cluster.root / "shared"
    study = gpu_study(work, models=("demo-llama", "demo-cohere"), languages=["en", "sw"])
    out = work / "out"
    plan = subprocess.run([str(BIN / "sweep"), "plan", str(study), "--json"], cwd=REPO, env=cluster.env,
                          capture_output=True, text=True, timeout=120)
    keys = {t["key"] for t in json.loads(plan.stdout)["trials"]}
    assert len(keys) == 16

    run = sweep_run(cluster, study, out, "--shared-dir")
    victim = cluster.nodes["worker-b"]
    raylet = cluster.raylet(victim)
    victim_node = next(part.split("=", 1)[1] for part in raylet.cmdline() if part.startswith("--node_id="))
    deadline = time.monotonic() + 240
    # Kill worker-b once it has finished a trial and holds another: a node lost mid-run, mid-trial.
    while True:
        events = event_lines(out)
        finished_there = [e for e in events if e["event"] == "finished" and e.get("node") == victim_node]
        busy_there = {e["key"] for e in events if e["event"] == "started" and e.get("node") == victim_node} - {
            e["key"] for e in events if e["event"] in ("finished", "failed")}
        if finished_there and busy_there:
            break
        assert run.poll() is None, f"the run ended before worker-b was killed:\n{run.stdout.read()[-6000:]}"
        assert time.monotonic() < deadline, "worker-b never held a trial"
        time.sleep(0.05)
    doomed = [raylet, *raylet.children(recursive=True)]
    for proc in doomed:
        proc.send_signal(signal.SIGKILL)
    psutil.wait_procs(doomed, timeout=10)

    output, _ = run.communicate(timeout=600)
    assert run.returncode == 0, output[-6000:]
    events = event_lines(out)
    finished = Counter(e["key"] for e in events if e["event"] == "finished")
    lost = keys - set(finished)
    duplicates = {k: n for k, n in finished.items() if n > 1}
    kills = [e for e in events if e["event"] == "actor_lost"]
    print(f"multi-node: {len(keys)} trials, {len(kills)} worker(s) lost with node {victim_node[:8]}, "
          f"{len(lost)} lost, {len(duplicates)} duplicated")
    assert not lost and not duplicates, (lost, duplicates)
    assert kills and all(e["node"] == victim_node for e in kills), kills
    # The trial in flight on the dead node ran again elsewhere, and every artifact is on the shared disk.
    assert any(e["event"] == "failed" and e.get("node") == victim_node and not e["final"] for e in events)
    for key in keys:
        assert (out / "artifacts" / key / "units.safetensors").is_file(), key
    status = subprocess.run([str(BIN / "sweep"), "status", str(out)], cwd=REPO, env=cluster.env,
                            capture_output=True, text=True, timeout=120)
    assert "16/16 done" in status.stdout, status.stdout


def test_a_node_that_does_not_see_the_study_directory_stops_the_run(cluster):
    if shutil.which("unshare") is None or subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"],
                                                         capture_output=True).returncode != 0:
        pytest.skip("user and mount namespaces (unshare -Urm) are not available here")
    hidden = cluster.root / "hidden"
    hidden.mkdir(exist_ok=True)
    # worker-c's own view of the machine: an empty tmpfs over `hidden`, where the study directory will be.
    cluster.start_node("worker-c", head=False, prefix=(
        "unshare", "--user", "--map-root-user", "--mount", "sh", "-c", f'mount -t tmpfs none "{hidden}" && exec "$@"',
        "worker-c"))
    study = gpu_study(hidden, models=("demo-llama", "demo-cohere"), languages=["en", "sw"])
    out = hidden / "out"
    run = sweep_run(cluster, study, out, "--shared-dir")
    output, _ = run.communicate(timeout=600)
    assert run.returncode == 4, output[-6000:]
    assert "cannot see the study directory" in output and "sentinel.json" in output, output[-6000:]
    assert "every finished trial is kept" in output
    assert "abandoned" not in {e["event"] for e in event_lines(out)}  # the other workers' trials finished
    stopped = [e for e in event_lines(out) if e["event"] == "run_stopped"]
    assert stopped and "cannot see the study directory" in stopped[-1]["reason"]
