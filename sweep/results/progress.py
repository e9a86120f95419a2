"""One summary of a study's progress, drawn live by the driver and printed by `sweep status`."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field


@dataclass
class Summary:
    total: int  # trials in the plan
    done: int  # finished, this run or earlier
    running: int
    failed: int  # gave up after their retries
    left: int  # neither finished nor failed nor running
    eta_s: float | None = None
    actors: list[dict] = field(default_factory=list)  # {"actor", "model", "busy"}

    def bar(self, width: int = 24) -> str:
        filled = int(width * self.done / self.total) if self.total else width
        return "#" * filled + "." * (width - filled)


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def format_summary(summary: Summary, with_actors: bool = True) -> str:
    line = (f"[{summary.bar()}] {summary.done}/{summary.total} done, {summary.running} running, "
            f"{summary.failed} failed, {summary.left} left, ETA {format_duration(summary.eta_s)}")
    if with_actors and summary.actors:
        held = " ".join(f"#{a['actor']}:{a.get('model') or '-'}{'*' if a.get('busy') else ''}" for a in summary.actors)
        line += f" | actors {held}"
    return line


def estimate_eta(durations: list[float], left: int, running: int, actors: int) -> float | None:
    """Mean trial time over the actors working in parallel; None until a trial has finished."""
    if not durations or actors <= 0:
        return None if left + running else 0.0
    mean = sum(durations[-200:]) / len(durations[-200:])
    return mean * (left + running / 2) / actors


class LiveProgress:
    """A bar redrawn in place on a terminal; on a pipe or log file, a summary line at most every
    `every_s` seconds. Event lines (a trial finished, failed) print above the bar."""

    def __init__(self, stream=None, every_s: float = 30.0, enabled: bool = True):
        self.stream = stream or sys.stdout
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.enabled = enabled
        self.every_s = every_s
        self._last_line = ""
        self._last_print = float("-inf")

    def log(self, line: str) -> None:
        if self.tty and self._last_line:
            self.stream.write("\r\x1b[K")
        self.stream.write(line + "\n")
        if self.tty and self._last_line:
            self.stream.write(self._last_line)
        self.stream.flush()

    def update(self, summary: Summary) -> None:
        if not self.enabled:
            return
        line = format_summary(summary)
        if self.tty:
            if line != self._last_line:
                self.stream.write("\r\x1b[K" + line)
                self.stream.flush()
                self._last_line = line
        elif time.monotonic() - self._last_print >= self.every_s and line != self._last_line:
            self.stream.write(line + "\n")
            self.stream.flush()
            self._last_line, self._last_print = line, time.monotonic()

    def close(self) -> None:
        if self.tty and self._last_line:
            self.stream.write("\n")
            self.stream.flush()
        self._last_line = ""
