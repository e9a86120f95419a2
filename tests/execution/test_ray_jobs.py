"""`sweep run` on a Ray cluster started with `ray start --head`, as docs/cluster.md
describes it: token authentication on; the study submitted with `ray job submit --working-dir .`, stopped
with `ray job stop`, read back with `ray job logs`, resumed by submitting the same job again; then grown
through the `ray submit` entry script (scripts/run_study.py), which joins the cluster with `--address auto`.

The head is this machine's own (one node, 2 CPUs, CPU trials on the demo model): this checks the Ray Jobs
path and the CLI commands, not a cloud. It gets its own ports, temp dir and token file, and is stopped by
killing exactly the processes it started (never `ray stop`: other people's Ray may run on this machine).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from sweep.store.study_store import StudyStore
from tests.conftest import REPO, light_demo_study
from tests.ray_processes import BIN, free_port_range, free_ports, stop_started

pytestmark = pytest.mark.slow

@dataclass
class Head:
    dashboard: str  # http://127.0.0.1:PORT, for `ray job ...`
    gcs: str  # 127.0.0.1:PORT, for ray.init / `sweep run --address`
    env: dict  # a client's environment: token authentication, the venv first on PATH
    token: str
    work: Path  # study files and study directories (under the head's unique root)
    process: subprocess.Popen


# -- the head ---------------------------------------------------------------------------------------
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1, never through a proxy


def http_json(url: str, token: str | None, timeout: float = 5.0) -> tuple[int, object]:
    """(HTTP status, JSON body) of a GET; status 0 while nothing listens."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with _DIRECT.open(request, timeout=timeout) as reply:
            body = reply.read()
            return reply.status, json.loads(body) if body else None
    except urllib.error.HTTPError as error:
        return error.code, None
    except (urllib.error.URLError, OSError):
        return 0, None


@pytest.fixture(scope="module")
def assets():
    from engine.demo import ensure_demo_assets

    return ensure_demo_assets(log=print)


@pytest.fixture(scope="module")
def head(assets):
    from sweep.study.env import default_demo_dir

    root = Path(tempfile.mkdtemp(prefix="swj-", dir="/tmp"))  # short: Ray's socket paths must stay < 107 bytes
    marker = str(root)
    token = secrets.token_hex(32)  # the same form as `ray get-auth-token --generate`
    token_file = root / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    work = root / "w"
    work.mkdir()
    # RAY_TMPDIR: this head's address file (<root>/ray/ray_current_cluster) is what `--address auto`
    # finds, for clients given this environment, instead of a shared /tmp/ray.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file), "RAY_TMPDIR": str(root),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "SWEEP_DEMO_DIR": str(default_demo_dir()),
           "RAY_USAGE_STATS_ENABLED": "0"}
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN"):
        env.pop(name, None)

    (gcs, dashboard, agent_http, agent_grpc, client, node_manager, object_manager, metrics,
     runtime_env_agent) = ports = free_ports(9)
    workers = free_port_range(64, set(ports))
    command = [str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
               "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=2", "--num-gpus=0",
               f"--temp-dir={root / 'ray'}", "--object-store-memory=200000000",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
               f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--ray-client-server-port={client}", f"--node-manager-port={node_manager}",
               f"--object-manager-port={object_manager}", f"--metrics-export-port={metrics}",
               f"--runtime-env-agent-port={runtime_env_agent}",
               f"--min-worker-port={workers}", f"--max-worker-port={workers + 63}"]
    log = open(root / "head.log", "w")
    process = subprocess.Popen(command, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        url = f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                raise AssertionError(f"`ray start --head` exited with {process.returncode}:\n"
                                     f"{(root / 'head.log').read_text()[-4000:]}")
            if http_json(f"{url}/api/jobs/", token)[0] == 200:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"the head's job API did not answer in 90 s:\n"
                                     f"{(root / 'head.log').read_text()[-4000:]}")
            time.sleep(0.5)
        yield Head(dashboard=url, gcs=f"127.0.0.1:{gcs}", env=env, token=token, work=work, process=process)
    finally:
        try:
            stop_started(process, marker)
        finally:
            log.close()
            shutil.rmtree(root, ignore_errors=True)


# -- helpers ------------------------------------------------------------------------------------------
def ray_cli(head: Head, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], cwd=REPO, env=head.env, capture_output=True, text=True,
                          timeout=timeout)


def submit(head: Head, submission_id: str, *entrypoint: str, wait: bool = True,
           env_vars: dict | None = None) -> subprocess.CompletedProcess:
    """docs/cluster.md's `ray job submit --working-dir .` of this repository (Ray leaves out what .gitignore
    names, and .git and .venv by default); the demo assets' location goes with the job's runtime env."""
    runtime_env = {"env_vars": {"SWEEP_DEMO_DIR": head.env["SWEEP_DEMO_DIR"], **(env_vars or {})}}
    return ray_cli(head, "job", "submit", "--address", head.dashboard, "--submission-id", submission_id,
                   "--working-dir", ".", "--runtime-env-json", json.dumps(runtime_env),
                   *([] if wait else ["--no-wait"]), "--", *entrypoint)


def job_status(head: Head, submission_id: str) -> str:
    code, info = http_json(f"{head.dashboard}/api/jobs/{submission_id}", head.token)
    assert code == 200, code
    return info["status"]


def planned(head: Head, study: Path) -> dict[str, str]:
    """key -> trial name, from `sweep plan --json`."""
    plan = subprocess.run([str(BIN / "sweep"), "plan", str(study), "--json"], cwd=REPO, env=head.env,
                          capture_output=True, text=True, timeout=120)
    assert plan.returncode == 0, plan.stderr
    return {t["key"]: t["name"] for t in json.loads(plan.stdout)["trials"]}


def events(out: Path) -> list[dict]:
    return [e.to_json() for e in StudyStore(out).read_events().events] if (out / "events").is_dir() else []


def finished_and_failed(out: Path) -> tuple[set[str], set[str]]:
    state = StudyStore(out).state() if (out / "events").is_dir() else StudyStore(out).state([])
    return set(state.finished), set(state.failed)


def wait_for(condition, what: str, head: Head, submission_id: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        status = job_status(head, submission_id)
        assert status in ("PENDING", "RUNNING"), f"job {submission_id} is {status} while waiting for {what}"
        assert time.monotonic() < deadline, f"no {what} in {timeout} s"
        time.sleep(0.5)


# -- the tests ----------------------------------------------------------------------------------------
def test_job_api_refuses_a_client_without_the_token(head):
    assert http_json(f"{head.dashboard}/api/jobs/", None)[0] == 401
    assert http_json(f"{head.dashboard}/api/jobs/", "0" * 64)[0] == 403


def test_sweep_run_as_a_ray_job_stopped_resumed_and_grown_through_the_entry_script(head):
    study = light_demo_study(head.work, models=("demo-llama",), languages=["en", "sw"])
    out = head.work / "out"
    plan = planned(head, study)
    assert len(plan) == 8  # dense + magnitude + (wanda 50%, wanda 2:4, sparsegpt 50%) x 2 languages
    # One machine: the head's disk is every node's disk, which --shared-dir says (and each worker checks).
    run = ["sweep", "run", str(study), "--out", str(out), "--no-progress", "--shared-dir"]

    # Submitted without waiting; one trial hangs (the workers' fault drill) so the job is still running
    # when every other trial has finished; then `ray job stop`.
    hung = next(key for key, name in plan.items() if "sparsegpt.s50.cal-sw" in name)
    drill = [{"match": "sparsegpt.s50.cal-sw", "kind": "hang", "attempts": 1}]
    first = submit(head, "light-1", *run, wait=False, env_vars={"SWEEP_INJECT_FAULTS": json.dumps(drill)})
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    wait_for(lambda: finished_and_failed(out)[0] == set(plan) - {hung}
             and any(e.get("event") == "started" and e.get("key") == hung for e in events(out)),
             "7 finished trials and the hung one started", head, "light-1")
    stop = ray_cli(head, "job", "stop", "--address", head.dashboard, "light-1")
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert job_status(head, "light-1") == "STOPPED"
    logs = ray_cli(head, "job", "logs", "--address", head.dashboard, "light-1")
    assert logs.returncode == 0, logs.stderr
    assert "joined the Ray cluster" in logs.stdout and "8 trials; 0 finished earlier" in logs.stdout, logs.stdout

    # Resuming is submitting the same job again: only the unfinished trial runs.
    second = submit(head, "light-2", *run)
    assert second.returncode == 0, second.stdout[-6000:] + second.stderr[-6000:]
    assert job_status(head, "light-2") == "SUCCEEDED"
    assert "7 finished earlier" in second.stdout and "1 to run" in second.stdout, second.stdout[-4000:]
    finished, failed = finished_and_failed(out)
    assert finished == set(plan) and not failed
    assert [e["key"] for e in events(out) if e.get("event") == "finished"].count(hung) == 1
    assert (out / "results.parquet").is_file() and not (out / "driver.lock").exists()

    # A grown grid (one more calibration language) through the `ray submit` entry script, which joins
    # the running cluster with --address auto, as on a head node.
    grown = light_demo_study(head.work, name="light", models=("demo-llama",), languages=["en", "sw", "de"])
    grown_plan = planned(head, grown)
    assert set(plan) < set(grown_plan) and len(grown_plan) == 11
    entry = subprocess.run([sys.executable, str(REPO / "scripts" / "run_study.py"), str(grown), "--out", str(out),
                            "--no-progress", "--shared-dir"], cwd=head.work, env=head.env, capture_output=True, text=True,
                           timeout=300)
    assert entry.returncode == 0, entry.stdout[-6000:] + entry.stderr[-6000:]
    assert "8 finished earlier" in entry.stdout and "3 to run" in entry.stdout, entry.stdout
    assert "joined the Ray cluster at auto" in entry.stdout, entry.stdout
    finished, failed = finished_and_failed(out)
    assert finished == set(grown_plan) and not failed

    status = subprocess.run([str(BIN / "sweep"), "status", str(out)], cwd=REPO, env=head.env, capture_output=True,
                            text=True, timeout=120)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "11/11 done" in status.stdout, status.stdout


def test_a_job_whose_study_directory_would_be_lost_is_refused_before_any_trial(head):
    """A relative --out in a job lands in Ray's copy of the working directory, which Ray deletes with the
    job: the job fails, saying why, before any trial. (A local --out without --shared-dir on a cluster is
    refused the same way: tests/execution/test_multinode.py.)"""
    study = light_demo_study(head.work, name="lost", models=("demo-llama",), languages=["en"])
    job = submit(head, "lost-1", "sweep", "run", str(study), "--out", "runs/lost", "--no-progress")
    assert job.returncode != 0 and job_status(head, "lost-1") == "FAILED", job.stdout[-4000:]
    logs = ray_cli(head, "job", "logs", "--address", head.dashboard, "lost-1").stdout
    assert "lies inside Ray's temporary copy of the job's working directory" in logs, logs[-4000:]
    assert "Nothing was run." in logs and "started an embedded Ray" not in logs
