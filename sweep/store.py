"""The study directory: a frozen study file, append-only event logs, artifacts, a driver lock, and the
results compacted to Parquet for the reducer.

    <root>/study.yaml                  the study file as first run (later versions: study.<run>.yaml)
    <root>/events/<run>.jsonl          one log per driver run, written only by that driver
    <root>/artifacts/<key>/<file>      masks, statistics (written under a temporary name, then renamed)
    <root>/results.parquet             one row per (trial, target language, task, metric)
    <root>/driver.lock                 which driver owns the directory

Each event is one JSON line, flushed and fsynced before the driver moves on, so a killed driver loses
at most the line it was writing; readers drop a cut-off last line and say so. No pickle anywhere.
"""
from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

TERMINAL = ("finished", "failed")


class StoreLocked(RuntimeError):
    pass


@dataclass
class LogReading:
    events: list[dict]
    cut_off: list[str] = field(default_factory=list)  # log files whose last line was incomplete
    unreadable: list[str] = field(default_factory=list)  # "file:line" of lines that were not JSON objects


@dataclass
class StudyState:
    finished: dict[str, dict]  # key -> its (latest) finished event
    failed: dict[str, dict]  # key -> latest failed event, for keys not finished
    attempts: dict[str, int]  # key -> started events seen

    def is_done(self, key: str) -> bool:
        return key in self.finished


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StudyStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.events_dir = self.root / "events"
        self.artifacts_dir = self.root / "artifacts"
        self.lock_path = self.root / "driver.lock"
        self._log = None
        self.run_id: str | None = None

    # -- the driver lock ----------------------------------------------------------------------
    def acquire(self) -> None:
        """Takes the directory for this driver; refuses if a live driver holds it, takes over a lock
        left by a dead driver on this host."""
        self.root.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        for _ in range(3):
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read_lock()
                if holder is not None and not self._stale(holder):
                    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
                    raise StoreLocked(
                        f"{self.root} is in use by another driver (pid {holder.get('pid')} on {holder.get('host')}, "
                        f"since {since}); wait for it to finish, or stop it first. If that driver is gone "
                        f"(another host crashed), delete {self.lock_path}.") from None
                # stale (or unreadable): move it aside atomically, then try again
                try:
                    os.replace(self.lock_path, self.lock_path.with_name(f"driver.lock.stale-{uuid.uuid4().hex[:8]}"))
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(me, handle)
            return
        raise StoreLocked(f"could not take {self.lock_path}: another driver keeps taking it")

    def _read_lock(self) -> dict | None:
        try:
            return json.loads(self.lock_path.read_text())
        except (OSError, ValueError):
            return None

    def _stale(self, holder: dict) -> bool:
        return holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", -1)))

    def release(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        holder = self._read_lock()
        if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.lock_path.unlink(missing_ok=True)

    def __enter__(self) -> "StudyStore":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # -- the frozen study file ----------------------------------------------------------------
    def freeze_study(self, text: str) -> Path:
        """Keeps the study file as it was when each new version was first run."""
        self.root.mkdir(parents=True, exist_ok=True)
        first = self.root / "study.yaml"
        if not first.exists():
            self._write_atomic(first, text.encode())
            return first
        versions = [first, *sorted(self.root.glob("study.*.yaml"))]
        if any(v.read_text(encoding="utf-8") == text for v in versions):
            return next(v for v in versions if v.read_text(encoding="utf-8") == text)
        path = self.root / f"study.{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}.yaml"
        self._write_atomic(path, text.encode())
        return path

    # -- events --------------------------------------------------------------------------------
    def append(self, event: dict) -> None:
        """Appends one event to this driver run's log, durably. Only the lock holder calls this."""
        if self._log is None:
            self.events_dir.mkdir(parents=True, exist_ok=True)
            self.run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
            self._log = open(self.events_dir / f"{self.run_id}.jsonl", "a", encoding="utf-8")
        line = json.dumps({"time": time.time(), "run": self.run_id, **event}, allow_nan=False, default=str)
        self._log.write(line + "\n")
        self._log.flush()
        os.fsync(self._log.fileno())

    def read_events(self) -> LogReading:
        reading = LogReading(events=[])
        if not self.events_dir.is_dir():
            return reading
        for path in sorted(self.events_dir.glob("*.jsonl")):
            data = path.read_bytes()
            lines = data.split(b"\n")
            if lines and lines[-1] != b"":
                reading.cut_off.append(path.name)  # the writer died mid-line
            for number, raw in enumerate(lines[:-1], 1):
                if not raw.strip():
                    continue
                try:
                    event = json.loads(raw)
                except ValueError:
                    reading.unreadable.append(f"{path.name}:{number}")
                    continue
                if isinstance(event, dict):
                    reading.events.append(event)
                else:
                    reading.unreadable.append(f"{path.name}:{number}")
        reading.events.sort(key=lambda e: e.get("time", 0))
        return reading

    def state(self, events: Iterable[dict] | None = None) -> StudyState:
        events = self.read_events().events if events is None else events
        finished: dict[str, dict] = {}
        failed: dict[str, dict] = {}
        attempts: dict[str, int] = {}
        for event in events:
            key = event.get("key")
            if key is None:
                continue
            kind = event.get("event")
            if kind == "started":
                attempts[key] = attempts.get(key, 0) + 1
            elif kind == "finished":
                finished[key] = event
                failed.pop(key, None)
            elif kind == "failed" and key not in finished:
                failed[key] = event
        return StudyState(finished=finished, failed=failed, attempts=attempts)

    # -- artifacts ------------------------------------------------------------------------------
    def artifact_dir(self, key: str) -> Path:
        return self.artifacts_dir / key

    def write_artifact(self, key: str, name: str, data: bytes) -> Path:
        path = self.artifact_dir(key) / name
        self._write_atomic(path, data)
        return path

    @staticmethod
    def _write_atomic(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)

    # -- compaction -------------------------------------------------------------------------------
    def compact(self) -> Path:
        """results.parquet: one row per (trial, target language, task, metric) of finished trials, each
        trial once (its latest finished event)."""
        import polars as pl

        rows = []
        for key, event in sorted(self.state().finished.items()):
            for metric in event.get("metrics", []):
                rows.append({"key": key, "name": event.get("name"), "run": event.get("run"),
                             "language": metric.get("language"), "task": metric.get("task"),
                             "metric": metric.get("metric"), "value": float(metric["value"])
                             if metric.get("value") is not None else None})
        schema = {"key": pl.String, "name": pl.String, "run": pl.String, "language": pl.String, "task": pl.String,
                  "metric": pl.String, "value": pl.Float64}
        frame = pl.DataFrame(rows, schema=schema)
        path = self.root / "results.parquet"
        temporary = path.with_name(f".results.{os.getpid()}.tmp.parquet")
        frame.write_parquet(temporary)
        os.replace(temporary, path)
        return path
