"""Fault injection over a demo study, at random moments: the driver SIGKILLed and resumed, worker actors
killed mid-trial, a node removed mid-trial, the event log cut off at a random byte, an artifact
half-written, the disk full under the event log. In every case the study completes (or stops with a
clear message and then completes), and its results equal an uninterrupted run's: the same keys, the same
metrics, no trial recorded twice.

Sizes: SWEEP_RELIABILITY_KILLS (driver kills, default 2; 20 or more for the long run) and
SWEEP_RELIABILITY_ROUNDS (log cuts and artifact damage, default 1). SWEEP_RELIABILITY_SEED picks the
moments (default 0). With SWEEP_RELIABILITY_REPORT=FILE each test appends its figures to FILE as a JSON
line: `python -m tests.reliability.summarize FILE` turns them into the table of reports/reliability.md.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from safetensors.torch import load_file

from sweep.execution.driver import RunOptions, run_study
from tests.conftest import in_process_cluster, light_demo_study
from tests.execution.test_sweep_run import (
    assert_same_results,
    events,
    of_kind,
    results_table,
    spawn_sweep,
    sweep_cli,
    sweep_env,
)

pytestmark = pytest.mark.slow

KILLS = int(os.environ.get("SWEEP_RELIABILITY_KILLS", "2"))
ROUNDS = int(os.environ.get("SWEEP_RELIABILITY_ROUNDS", "1"))
SEED = int(os.environ.get("SWEEP_RELIABILITY_SEED", "0"))


@pytest.fixture(scope="module")
def assets():
    from engine.demo import ensure_demo_assets

    return ensure_demo_assets(log=print)


def fault_study(directory: Path) -> Path:
    """Both demo models, three calibration languages, Wanda and SparseGPT with sampled masks: 14 trials
    of about half a second, each writing an artifact."""
    return light_demo_study(directory, languages=["en", "de", "sw"],
                            pruners=[{"method": "wanda", "sparsity": 0.5}, {"method": "sparsegpt", "sparsity": "2:4"}],
                            retries=3)


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    directory = tmp_path_factory.mktemp("reference")
    study = fault_study(directory)
    outcome = run_study(study, RunOptions(num_cpus=2, progress=False))
    assert outcome.code == 0
    return study, directory / "runs" / "light"


def check_complete(out: Path, reference_out: Path) -> dict:
    """The study is complete and equals the reference; returns the figures."""
    evs = events(out)
    plan = {t["key"] for t in json.loads((out / "plan.json").read_text())["trials"]}
    finished = Counter(e["key"] for e in of_kind(evs, "finished"))
    lost = len(plan - set(finished))
    duplicates = sum(n - 1 for n in finished.values())
    assert lost == 0, f"{lost} trial(s) never finished"
    assert duplicates == 0, f"{duplicates} trial(s) recorded as finished more than once"
    assert_same_results(results_table(out), results_table(reference_out))
    started = Counter(e["key"] for e in of_kind(evs, "started"))
    return {"trials": len(plan), "lost": lost, "duplicates": duplicates, "completed": True,
            "attempts": sum(started.values()), "driver_runs": len(of_kind(evs, "run_started"))}


def record(kind: str, figures: dict) -> None:
    path = os.environ.get("SWEEP_RELIABILITY_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"kind": kind, "seed": SEED, **figures}) + "\n")


def kill_tree(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)  # the driver and the embedded Ray it started
    except ProcessLookupError:
        pass
    process.wait(timeout=60)


@pytest.fixture(scope="module")
def kill_reference(assets, tmp_path_factory):
    """For a long run (10 kills or more): the whole light demo grid with two seeds (88 trials), so that
    every kill still finds trials to interrupt, uninterrupted."""
    import yaml

    directory = tmp_path_factory.mktemp("kill-reference")
    study = light_demo_study(directory, name="kills", retries=3)
    data = yaml.safe_load(study.read_text())
    data["calibration"]["seeds"] = [0, 1]
    study.write_text(yaml.safe_dump(data))
    outcome = run_study(study, RunOptions(num_cpus=2, progress=False))
    assert outcome.code == 0
    return study, directory / "runs" / "kills"


def wait_for_a_trial(out: Path, started_before: int, process: subprocess.Popen, timeout: float = 120) -> bool:
    """Until this driver has dispatched its first trial (a `started` event beyond those before it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if (out / "events").is_dir() and len(of_kind(events(out), "started")) > started_before:
            return True
        time.sleep(0.05)
    return False


def test_driver_sigkilled_at_random_moments_then_resumed(request, tmp_path):
    """Each kill lands either while the driver starts (a quarter of them: during Ray's start, the lock,
    the log read, actors loading models) or a random 0-2 s after its first trial was dispatched (mid-trial,
    mid-append, between trials)."""
    # a few kills (CI) fit the 14-trial study; a long run needs the bigger grid to keep finding trials
    study, reference_out = request.getfixturevalue("kill_reference" if KILLS >= 10 else "reference")
    out = tmp_path / "killed"
    rng = random.Random(SEED)
    kills, moments = 0, []
    for attempt in range(KILLS):
        started_before = len(of_kind(events(out), "started")) if (out / "events").is_dir() else 0
        process = spawn_sweep("run", str(study), "--out", str(out), "--num-cpus", "2", "--no-progress",
                              log=tmp_path / f"run{attempt}.log")
        if rng.random() < 0.25:
            delay, phase = rng.uniform(0.5, 5.0), "start-up"
        else:
            if not wait_for_a_trial(out, started_before, process):
                if process.poll() is not None:
                    break  # exited before starting trials: nothing was left to run
                delay, phase = 0.0, "start-up (slow)"
            delay, phase = rng.uniform(0.0, 2.0), "trials"
        try:
            process.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            kill_tree(process)
            kills += 1
            moments.append(f"{phase}+{delay:.2f}s")
            continue
        break  # finished before its kill: the study is done
    final = sweep_cli("run", str(study), "--out", str(out), "--num-cpus", "2", "--no-progress")
    assert final.returncode == 0, final.stdout + final.stderr
    figures = check_complete(out, reference_out)
    assert not (out / "driver.lock").exists()
    record("driver SIGKILL", {"faults": kills, "moments": moments, **figures})


def test_worker_actors_killed_mid_trial(reference, tmp_path):
    """A thread SIGKILLs the worker process of a running trial at random moments while the driver runs
    in this process."""
    study, reference_out = reference
    out = tmp_path / "workers"
    rng = random.Random(SEED + 1)
    wanted = 3
    killed: list[str] = []

    def killer() -> None:
        deadline = time.monotonic() + 240
        while len(killed) < wanted and time.monotonic() < deadline:
            time.sleep(rng.uniform(0.5, 3.0))
            if not (out / "events").is_dir():
                continue
            evs = events(out)
            ended = {(e["key"], e.get("attempt")) for e in evs if e.get("event") in ("finished", "failed")}
            running = [e for e in of_kind(evs, "started") if (e["key"], e.get("attempt")) not in ended and e.get("pid")]
            if not running:
                continue
            victim = rng.choice(running)
            try:
                os.kill(int(victim["pid"]), signal.SIGKILL)
                killed.append(victim["name"])
            except ProcessLookupError:
                pass

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    outcome = run_study(study, RunOptions(out=str(out), num_cpus=2, progress=False))
    thread.join(timeout=1)
    assert outcome.code == 0, outcome
    figures = check_complete(out, reference_out)
    lost_actors = len(of_kind(events(out), "actor_lost"))
    assert lost_actors >= 1 and killed
    record("worker actor SIGKILL", {"faults": len(killed), "actors_lost": lost_actors, **figures})


def test_node_removed_mid_trial(reference, tmp_path, monkeypatch):
    study, reference_out = reference
    out = tmp_path / "nodes"
    rng = random.Random(SEED + 2)
    removed: list[str] = []
    after = rng.randint(1, 6)
    with in_process_cluster(monkeypatch, *[{"num_cpus": 1}] * 3) as (cluster, workers):

        def remover() -> None:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                time.sleep(0.2)
                if (out / "events").is_dir() and len(of_kind(events(out), "finished")) >= after:
                    busy = {e.get("node") for e in of_kind(events(out), "started")}
                    node = rng.choice([n for n in workers if n.node_id in busy] or workers)
                    cluster.remove_node(node)
                    removed.append(node.node_id)
                    return

        thread = threading.Thread(target=remover, daemon=True)
        thread.start()
        outcome = run_study(study, RunOptions(out=str(out), address=cluster.address, progress=False, shared_dir=True))
        thread.join(timeout=5)
    assert removed and outcome.code == 0, outcome
    figures = check_complete(out, reference_out)
    record("node removed", {"faults": len(removed), "after_finished": after,
                            "actors_lost": len(of_kind(events(out), "actor_lost")), **figures})


def test_event_log_cut_at_random_bytes(reference, tmp_path):
    """The state a driver killed mid-write leaves: the log ends anywhere, mid-line included."""
    study, reference_out = reference
    rng = random.Random(SEED + 3)
    figures = []
    for round_ in range(ROUNDS):
        out = tmp_path / f"cut{round_}"
        shutil.copytree(reference_out, out)
        (out / "results.parquet").unlink()
        [log] = sorted((out / "events").glob("*.jsonl"))
        data = log.read_bytes()
        cut = rng.randrange(len(data) // 4, len(data) - 1)
        log.write_bytes(data[:cut])
        again = sweep_cli("run", str(study), "--out", str(out), "--num-cpus", "2", "--no-progress")
        assert again.returncode == 0, again.stdout + again.stderr
        mid_line = not data[:cut].endswith(b"\n")
        if mid_line:
            assert "cut-off" in again.stdout + again.stderr
        figures.append({"cut_at": cut, "of_bytes": len(data), "mid_line": mid_line, **check_complete(out, reference_out)})
    record("event log cut", {"faults": len(figures), "mid_line": sum(f["mid_line"] for f in figures),
                             "completed": all(f["completed"] for f in figures),
                             "lost": sum(f["lost"] for f in figures), "duplicates": sum(f["duplicates"] for f in figures)})


def test_half_written_artifact(reference, tmp_path):
    """A worker that died writing a trial's artifact, before the driver logged the trial: the artifact is
    half there and the trial unfinished. The next run redoes the trial and writes the artifact whole."""
    study, reference_out = reference
    rng = random.Random(SEED + 4)
    damaged = 0
    for round_ in range(ROUNDS):
        out = tmp_path / f"art{round_}"
        shutil.copytree(reference_out, out)
        (out / "results.parquet").unlink()
        [log] = sorted((out / "events").glob("*.jsonl"))
        lines = log.read_text().splitlines(keepends=True)
        with_artifact = [i for i, line in enumerate(lines)
                         if '"event": "finished"' in line and json.loads(line).get("pruning", {}) and
                         json.loads(line)["pruning"].get("mask_sample_path")]
        victim_line = rng.choice(with_artifact)
        victim = json.loads(lines[victim_line])
        artifact = out / "artifacts" / victim["key"] / "mask_sample.safetensors"
        whole = artifact.read_bytes()
        artifact.write_bytes(whole[: len(whole) // 2])
        # the driver's log ends before this trial's finished event
        log.write_text("".join(lines[:victim_line]))
        again = sweep_cli("run", str(study), "--out", str(out), "--num-cpus", "2", "--no-progress")
        assert again.returncode == 0, again.stdout + again.stderr
        check_complete(out, reference_out)
        redone = load_file(artifact)
        expected = load_file(reference_out / "artifacts" / victim["key"] / "mask_sample.safetensors")
        assert redone.keys() == expected.keys() and all((redone[k] == expected[k]).all() for k in expected)
        damaged += 1
    record("artifact half-written", {"faults": damaged, "completed": True, "lost": 0, "duplicates": 0})


def test_disk_full_under_the_event_log_stops_cleanly_then_resumes(reference, tmp_path):
    study, reference_out = reference
    out = tmp_path / "full"
    rng = random.Random(SEED + 5)
    after = rng.randint(4, 20)
    env = sweep_env(SWEEP_INJECT_DISK_FULL=str(after))
    full = subprocess.run([*spawn_cmd(), "run", str(study), "--out", str(out), "--num-cpus", "2", "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[2])
    assert full.returncode == 4, full.stdout + full.stderr
    assert "cannot write the study directory" in full.stderr and "No space left on device" in full.stderr
    assert "Traceback" not in full.stderr
    assert not (out / "driver.lock").exists()
    kept = {e["key"] for e in of_kind(events(out), "finished")}
    again = sweep_cli("run", str(study), "--out", str(out), "--num-cpus", "2", "--no-progress")
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"{len(kept)} finished earlier" in again.stdout
    figures = check_complete(out, reference_out)
    record("disk full (injected ENOSPC)", {"faults": 1, "after_events": after, "finished_before_full": len(kept),
                                           **figures})


def spawn_cmd() -> list[str]:
    import sys

    return [sys.executable, "-m", "sweep.cli.main"]
