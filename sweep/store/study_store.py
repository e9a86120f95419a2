"""The study directory: a frozen study file, append-only event logs, artifacts, a driver lock, and the
results compacted to Parquet for the reducer. A local folder or an object-store URL (see sweep.store.locations).

    <root>/study.yaml                  the study file as first run (later versions: study.<time>.yaml)
    <root>/plan.json                   the trials of the latest run's study version (for `sweep status`)
    <root>/events/<run>.jsonl          one log per driver run, written only by that driver
                                       (object storage: <run>-<segment>.jsonl, each rewritten until full)
    <root>/artifacts/<key>/<file>      masks, statistics (written under a temporary name, then renamed)
    <root>/results.parquet             one row per (trial, target language, task, metric)
    <root>/driver.lock                 which driver owns the directory, with a heartbeat

Each event is one JSON line, flushed and fsynced before the driver moves on, so a killed driver loses
at most the line it was writing; readers drop a cut-off last line and say so. No pickle anywhere.
"""
from __future__ import annotations

import errno
import io
import json
import os
import socket
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from sweep.store.locations import Location, open_location
from sweep.store.records import (
    Event,
    PlanRecord,
    RunStarted,
    TrialFailed,
    TrialFields,
    TrialFinished,
    TrialsForgotten,
    TrialStarted,
    parse_event,
)

LEASE_S = 900.0  # a lock whose heartbeat is older than this, held from another host, is stale
HEARTBEAT_S = 60.0
SEGMENT_EVENTS = 200  # object storage: events per log segment (each append rewrites one segment)


class StoreLocked(RuntimeError):
    pass


STORE_FAULTS_ENV = "SWEEP_INJECT_DISK_FULL"


def injected_disk_full(appended: int) -> bool:
    """Fault injection for tests and drills: with $SWEEP_INJECT_DISK_FULL=N, the driver's N-th event
    append on a local study directory writes half its line and fails as a full disk would (ENOSPC)."""
    raw = os.environ.get(STORE_FAULTS_ENV)
    return bool(raw) and appended >= int(raw)


@dataclass
class LogReading:
    events: list[Event]
    cut_off: list[str] = field(default_factory=list)  # log files whose last line was incomplete
    unreadable: list[str] = field(default_factory=list)  # "file:line" of lines that were not JSON objects


@dataclass
class StudyState:
    finished: dict[str, TrialFinished]  # key -> its (latest) finished event
    failed: dict[str, TrialFailed]  # key -> latest failed event, for keys not finished
    attempts: dict[str, int]  # key -> started events seen

    def is_done(self, key: str) -> bool:
        return key in self.finished

    def gave_up(self, key: str) -> bool:
        """Failed with its retries used up (and not finished since)."""
        return key in self.failed and self.failed[key].final


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def forgotten_until(events: Iterable[Event]) -> dict[str, float]:
    """key -> the time up to which its finished and failed events were forgotten (`sweep forget`)."""
    until: dict[str, float] = {}
    for event in events:
        if isinstance(event, TrialsForgotten):
            for key, time_ in event.until.items():
                until[key] = max(until.get(key, float("-inf")), float(time_))
    return until


def is_forgotten(event: TrialFinished | TrialFailed, until: dict[str, float]) -> bool:
    return event.key in until and event.time <= until[event.key]


def study_state(events: Iterable[Event]) -> StudyState:
    """Which trials finished, which failed last (and not finished since), how often each started. The
    finished and failed events `sweep forget` named do not count, wherever they fall in the logs."""
    events = list(events)
    until = forgotten_until(events)
    finished: dict[str, TrialFinished] = {}
    failed: dict[str, TrialFailed] = {}
    attempts: dict[str, int] = {}
    for event in events:
        if not isinstance(event, Event):
            raise TypeError(f"study_state reads typed events (sweep.store.records), not {type(event).__name__}")
        if isinstance(event, TrialStarted) and event.key:
            attempts[event.key] = attempts.get(event.key, 0) + 1
        elif isinstance(event, TrialFinished) and event.key and not is_forgotten(event, until):
            finished[event.key] = event
            failed.pop(event.key, None)
        elif (isinstance(event, TrialFailed) and event.key and event.key not in finished
              and not is_forgotten(event, until)):
            failed[event.key] = event
    return StudyState(finished=finished, failed=failed, attempts=attempts)


class StudyStore:
    def __init__(self, root: str | Path):
        self.location: Location = open_location(root)
        self._log = None
        self._segment: list[bytes] = []
        self._segment_number = 0
        self._appended = 0
        self._last_heartbeat = 0.0
        self._lock_token: str | None = None
        self.run_id: str | None = None

    @property
    def root(self) -> Path | str:
        return self.location.local_path() if self.location.is_local else self.location.url

    @property
    def is_local(self) -> bool:
        return self.location.is_local

    def ref(self, rel: str) -> Path | str:
        """A file of the study directory: a Path when local, else its URL."""
        return self.location.local_path(rel) if self.location.is_local else self.location.join(rel)

    @property
    def lock_path(self) -> Path | str:
        return self.ref("driver.lock")

    # -- the driver lock ----------------------------------------------------------------------
    def acquire(self) -> None:
        """Takes the directory for this driver; refuses while another driver holds it. A lock is stale,
        and taken over, when its driver was on this host and is gone, or its heartbeat is older than
        LEASE_S (a driver on another host that crashed). On object storage the take is best effort
        (no exclusive create there): start one driver per study."""
        for _ in range(3):
            self._lock_token = uuid.uuid4().hex
            me = self._lock_record(time.time())
            if self.location.create_exclusive("driver.lock", me):
                self._last_heartbeat = time.time()
                return
            holder = self.lock_holder()
            if holder is not None and not self._stale(holder):
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
                raise StoreLocked(
                    f"{self.location.url} is in use by another driver (pid {holder.get('pid')} on "
                    f"{holder.get('host')}, since {since}); wait for it to finish or stop it first. If that "
                    f"driver is gone (its host crashed), delete {self.lock_path}; a lock whose heartbeat is "
                    f"older than {LEASE_S:.0f} s is taken over by itself.")
            # stale (or unreadable): move it aside, then try again
            try:
                self.location.move("driver.lock", f"driver.lock.stale-{uuid.uuid4().hex[:8]}")
            except (FileNotFoundError, OSError):
                pass
        raise StoreLocked(f"could not take {self.lock_path}: another driver keeps taking it")

    def _lock_record(self, since: float) -> bytes:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since,
                           "heartbeat": time.time(), "token": self._lock_token}).encode()

    def lock_holder(self) -> dict | None:
        raw = self.location.read_bytes("driver.lock")
        if raw is None:
            return None
        try:
            holder = json.loads(raw)
        except ValueError:
            return None
        return holder if isinstance(holder, dict) else None

    def holder_alive(self, holder: dict | None = None) -> bool:
        holder = self.lock_holder() if holder is None else holder
        return holder is not None and not self._stale(holder)

    @staticmethod
    def _stale(holder: dict) -> bool:
        if holder.get("host") == socket.gethostname():
            return not _pid_alive(int(holder.get("pid", -1)))
        return time.time() - float(holder.get("heartbeat", holder.get("since", 0))) > LEASE_S

    def heartbeat(self, force: bool = False) -> None:
        """Refreshes the lock's heartbeat (the driver calls this from its loop)."""
        if self._lock_token is None or (not force and time.time() - self._last_heartbeat < HEARTBEAT_S):
            return
        holder = self.lock_holder()
        if holder is None or holder.get("token") != self._lock_token:
            raise StoreLocked(f"{self.lock_path} was taken by another driver (pid {holder and holder.get('pid')} "
                              f"on {holder and holder.get('host')}); this driver stops")
        self.location.write_atomic("driver.lock", self._lock_record(float(holder.get("since", time.time()))))
        self._last_heartbeat = time.time()

    def release(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        holder = self.lock_holder()
        if self._lock_token is not None and holder is not None and holder.get("token") == self._lock_token:
            self.location.delete("driver.lock")
        self._lock_token = None

    def __enter__(self) -> StudyStore:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # -- the frozen study file and the plan ---------------------------------------------------
    def freeze_study(self, text: str) -> Path | str:
        """Keeps the study file as it was when each new version was first run."""
        data = text.encode("utf-8")
        if self.location.create_exclusive("study.yaml", data):
            return self.ref("study.yaml")
        for rel in ["study.yaml", *sorted(self.location.list("", ".yaml"))]:
            if rel.startswith("study.") and self.location.read_bytes(rel) == data:
                return self.ref(rel)
        rel = f"study.{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}.yaml"
        self.location.write_atomic(rel, data)
        return self.ref(rel)

    def latest_study_file(self, events: Iterable[Event]) -> str | None:
        """The frozen study file the latest driver run read, as a name inside the study directory: the one
        its RunStarted names (by base name, so a moved or remote directory still finds it), else the newest
        frozen version; None when there is none."""
        named = [e.study_file for e in events if isinstance(e, RunStarted) and e.study_file]
        if named:
            rel = named[-1].replace("\\", "/").rsplit("/", 1)[-1]
            if self.location.exists(rel):
                return rel
        versions = [rel for rel in self.location.list("", ".yaml") if rel.startswith("study.")]
        later = sorted(rel for rel in versions if rel != "study.yaml")  # study.<time>-<id>.yaml sorts by time
        return later[-1] if later else ("study.yaml" if "study.yaml" in versions else None)

    def write_plan(self, plan: PlanRecord) -> None:
        self.location.write_atomic("plan.json", json.dumps(plan.to_json(), indent=1).encode())

    def read_plan(self) -> PlanRecord | None:
        raw = self.location.read_bytes("plan.json")
        return PlanRecord.from_json(json.loads(raw)) if raw is not None else None

    # -- events --------------------------------------------------------------------------------
    def append(self, event: Event) -> None:
        """Appends one event to this driver run's log, durably. Only the lock holder calls this."""
        if self.run_id is None:
            self.run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        stamped = replace(event, time=time.time(), run=self.run_id)
        line = json.dumps(stamped.to_json(), allow_nan=False, default=str)
        if self.location.is_local:
            if self._log is None:
                folder = self.location.local_path("events")
                folder.mkdir(parents=True, exist_ok=True)
                self._log = open(folder / f"{self.run_id}.jsonl", "a", encoding="utf-8")
            self._appended += 1
            full = injected_disk_full(self._appended)
            data = line + "\n"
            self._log.write(data[: len(data) // 2] if full else data)
            self._log.flush()
            os.fsync(self._log.fileno())
            if full:
                raise OSError(errno.ENOSPC, f"No space left on device (injected by ${STORE_FAULTS_ENV})",
                              str(self.location.local_path("events")))
        else:
            if len(self._segment) >= SEGMENT_EVENTS:
                self._segment, self._segment_number = [], self._segment_number + 1
            self._segment.append(line.encode() + b"\n")
            self.location.write_atomic(f"events/{self.run_id}-{self._segment_number:05d}.jsonl",
                                       b"".join(self._segment))
        self.heartbeat()

    def read_events(self) -> LogReading:
        reading = LogReading(events=[])
        for rel in self.location.list("events", ".jsonl"):
            data = self.location.read_bytes(rel) or b""
            name = rel.rsplit("/", 1)[-1]
            lines = data.split(b"\n")
            if lines and lines[-1] != b"":
                reading.cut_off.append(name)  # the writer died mid-line
            for number, raw in enumerate(lines[:-1], 1):
                if not raw.strip():
                    continue
                try:
                    event = json.loads(raw)
                except ValueError:
                    reading.unreadable.append(f"{name}:{number}")
                    continue
                if isinstance(event, dict):
                    reading.events.append(parse_event(event))
                else:
                    reading.unreadable.append(f"{name}:{number}")
        reading.events.sort(key=lambda e: e.time)
        return reading

    def state(self, events: Iterable[Event] | None = None) -> StudyState:
        return study_state(self.read_events().events if events is None else events)

    # -- artifacts ------------------------------------------------------------------------------
    def artifact_dir(self, key: str) -> Path | str:
        return self.ref(f"artifacts/{key}")

    # -- compaction -------------------------------------------------------------------------------
    def compact(self, current_keys: set[str] | None = None) -> Path | str:
        """results.parquet: `results_frame` written atomically (a cache for readers outside this project;
        the event logs stay the truth)."""
        buffer = io.BytesIO()
        self.results_frame(current_keys).write_parquet(buffer)
        self.location.write_atomic("results.parquet", buffer.getvalue())
        return self.ref("results.parquet")

    def results_frame(self, current_keys: set[str] | None = None, events: Iterable[Event] | None = None):
        """One row per (trial, target language, task, metric) of finished trials, folded from the event
        logs as they are now: each trial once (its latest finished event). `current` marks trials of the
        latest study version; results of earlier versions (an older evaluation suite) stay readable
        beside them. `events`: the logs already read (else they are read here). Writes nothing."""
        import polars as pl

        rows = []
        for key, event in sorted(self.state(events).finished.items()):
            trial = event.trial or TrialFields(model="", pruner="", sparsity="", calibration=None, seed=None, dense=False)
            for metric in event.metrics:
                value = metric.get("value")
                rows.append({
                    "key": key, "name": event.name or None, "run": event.run or None,
                    "model": trial.model or None, "pruner": trial.pruner or None, "sparsity": trial.sparsity or None,
                    "calibration": trial.calibration, "seed": trial.seed,
                    "language": metric.get("language"), "task": metric.get("task"), "metric": metric.get("metric"),
                    "value": _number(value),
                    "stderr": _number(metric.get("stderr")),
                    "higher_is_better": metric.get("higher_is_better") if isinstance(metric.get("higher_is_better"), bool) else None,
                    "current": current_keys is None or key in current_keys,
                })
        schema = {"key": pl.String, "name": pl.String, "run": pl.String, "model": pl.String, "pruner": pl.String,
                  "sparsity": pl.String, "calibration": pl.String, "seed": pl.Int64, "language": pl.String,
                  "task": pl.String, "metric": pl.String, "value": pl.Float64, "stderr": pl.Float64,
                  "higher_is_better": pl.Boolean, "current": pl.Boolean}
        return pl.DataFrame(rows, schema=schema)


def _number(value: object) -> float | None:
    """A metric's number as a float; None for a missing, boolean or non-numeric one."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
