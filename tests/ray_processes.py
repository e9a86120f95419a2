"""Ray nodes started as separate processes for tests: free ports, and stopping exactly the processes a
test started (never `ray stop`, which would stop other people's Ray on a shared machine)."""
from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent  # the venv's bin: ray, sweep


def free_ports(count: int) -> list[int]:
    """Ports free right now, all different (each socket stays bound until all are chosen)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port_range(size: int, taken: set[int]) -> int:
    """The first port of `size` consecutive free ports (for the head's worker processes)."""
    rng = secrets.SystemRandom()
    for _ in range(200):
        base = rng.randrange(20000, 60000 - size)
        span = range(base, base + size)
        if taken.intersection(span):
            continue
        try:
            for port in span:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError(f"no {size} consecutive free ports")


def started_processes(head: subprocess.Popen, marker: str) -> list[psutil.Process]:
    """Every process this test started: the `ray start` process and its descendants, every process whose
    command line names the head's unique root directory, and their descendants. Nothing else."""
    found: dict[int, psutil.Process] = {}

    def add_tree(proc: psutil.Process) -> None:
        try:
            found.setdefault(proc.pid, proc)
            for child in proc.children(recursive=True):
                found.setdefault(child.pid, child)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass

    try:
        add_tree(psutil.Process(head.pid))
    except psutil.NoSuchProcess:
        pass
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(marker in part for part in (proc.info["cmdline"] or [])):
                add_tree(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def stop_started(head: subprocess.Popen, marker: str) -> None:
    """Stops exactly the processes started for this head: SIGTERM to `ray start --block` (which shuts its
    node down), then SIGTERM to whatever of ours is left, then SIGKILL; each step waits a few seconds.
    Repeated while any is left (a raylet being stopped may still have spawned a worker)."""
    steps = [("head", signal.SIGTERM, 10.0), ("all", signal.SIGTERM, 5.0)] + [("all", signal.SIGKILL, 5.0)] * 3
    for who, signum, wait_s in steps:
        procs = started_processes(head, marker)
        if not procs:
            break
        targets = [p for p in procs if p.pid == head.pid] if who == "head" else procs
        for proc in targets or procs:
            try:
                proc.send_signal(signum)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        psutil.wait_procs(procs, timeout=wait_s)
    try:
        head.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    left = started_processes(head, marker)
    assert not left, f"processes of the test head still running: {[p.pid for p in left]}"


