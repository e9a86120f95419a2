"""Waiting for the machine's CPUs to be idle before a measurement (shared CI machine: test suites that
do not take /tmp/bench.lock still run beside a benchmark). Linux only (/proc/stat)."""
from __future__ import annotations

import time


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat", encoding="ascii") as handle:
        fields = [int(v) for v in handle.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]), idle


def busy_fraction(interval: float = 1.0) -> float:
    """Fraction of all CPUs' time spent busy (by anyone) over the next `interval` seconds."""
    total0, idle0 = _cpu_times()
    time.sleep(interval)
    total1, idle1 = _cpu_times()
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


class QuietGate:
    """`wait()` blocks until the CPUs were less than `threshold` busy over one second, or until
    `max_wait` seconds for this call, or `budget` seconds in all calls together, have passed. Returns
    the last busy fraction seen (recorded with each measurement)."""

    def __init__(self, budget: float, max_wait: float = 30.0, threshold: float = 0.1):
        self.budget, self.max_wait, self.threshold = budget, max_wait, threshold
        self.waited = 0.0

    def wait(self) -> float:
        started = time.perf_counter()
        while True:
            busy = busy_fraction(1.0 if self.budget > 0 else 0.2)
            spent = time.perf_counter() - started
            if busy < self.threshold or spent >= self.max_wait or self.waited + spent >= self.budget:
                self.waited += spent
                return busy
