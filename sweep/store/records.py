"""The typed records of a study directory: plan.json, and the trial fields events carry.

Each record is written with `to_json` and read with `from_json`, so the format on disk has one definition.
Readers take missing fields as their defaults: a study directory written by an earlier version, which
lacked a field added since, still reads (tests/store/test_study_dir_compat.py).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar


@dataclass(frozen=True)
class TrialFields:
    """What a trial is, as every finished or failed event and plan.json carry it."""

    model: str
    pruner: str  # "dense" for a dense baseline
    sparsity: str  # canonical: "0.5", "2:4"; "0" for dense
    calibration: str | None  # canonical language or mix; None for trials without calibration
    seed: int | None
    dense: bool

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrialFields:
        return cls(model=data.get("model", ""), pruner=data.get("pruner", ""), sparsity=data.get("sparsity", ""),
                   calibration=data.get("calibration"), seed=data.get("seed"), dense=bool(data.get("dense", False)))


@dataclass(frozen=True)
class PlannedTrial(TrialFields):
    """One trial of plan.json: its key and readable name beside its fields."""

    key: str = ""
    name: str = ""

    @property
    def fields(self) -> TrialFields:
        return TrialFields(self.model, self.pruner, self.sparsity, self.calibration, self.seed, self.dense)

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "name": self.name, **self.fields.to_json()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PlannedTrial:
        fields = TrialFields.from_json(data)
        return cls(**asdict(fields), key=data["key"], name=data.get("name", data["key"]))


@dataclass(frozen=True)
class PlanRecord:
    """plan.json: the trials of the latest run's study version, and what `sweep status` and the report
    need to read the results without the study file."""

    study: str
    trials: tuple[PlannedTrial, ...]
    languages: tuple[str, ...] = ()  # evaluation (target) languages
    calibration_languages: tuple[str, ...] = ()
    gpus: dict[str, int] = field(default_factory=dict)  # model label -> GPUs per replica
    analyses: dict[str, Any] = field(default_factory=dict)  # the study's `analyses:` section, defaults filled in
    written: float = 0.0  # unix time

    @property
    def keys(self) -> set[str]:
        return {t.key for t in self.trials}

    def analysis_enabled(self, name: str) -> bool:
        return bool((self.analyses.get(name) or {}).get("enabled"))

    def to_json(self) -> dict[str, Any]:
        return {"study": self.study, "written": self.written, "languages": list(self.languages),
                "calibration_languages": list(self.calibration_languages), "gpus": dict(self.gpus),
                "analyses": self.analyses, "trials": [t.to_json() for t in self.trials]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PlanRecord:
        return cls(study=data.get("study", ""), written=data.get("written", 0.0),
                   languages=tuple(data.get("languages") or ()),
                   calibration_languages=tuple(data.get("calibration_languages") or ()),
                   gpus=dict(data.get("gpus") or {}), analyses=dict(data.get("analyses") or {}),
                   trials=tuple(PlannedTrial.from_json(t) for t in data.get("trials") or ()))


# -- events ---------------------------------------------------------------------------------------------
# One JSON object per line in events/<run>.jsonl: {"time", "run", "event": <kind>, ...its fields}. Every
# field has a default, so a line from an earlier version that lacks a field still reads; fields a reader
# does not know are dropped, kinds it does not know read as UnknownEvent.

@dataclass(frozen=True, kw_only=True)
class Event:
    KIND: ClassVar[str] = ""
    time: float = 0.0  # set by the store when it appends
    run: str = ""  # the driver run that wrote it (set by the store)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"time": self.time, "run": self.run, "event": self.KIND}
        for f in fields(self):
            if f.name not in ("time", "run") and f.metadata.get("stored", True):
                value = getattr(self, f.name)
                out[f.name] = value.to_json() if isinstance(value, TrialFields) else value
        return out


@dataclass(frozen=True, kw_only=True)
class OnActor(Event):
    """An event about work on one worker actor: where it ran."""

    actor: int | None = None
    node: str | None = None
    host: str | None = None
    gpus: list | None = None  # GPU ids the actor holds
    pid: int | None = None


@dataclass(frozen=True, kw_only=True)
class RunStarted(Event):
    KIND: ClassVar[str] = "run_started"
    study: str = ""
    study_file: str = ""  # the frozen study file this run read
    trials: int = 0
    to_run: int = 0
    finished_before: int = 0
    git: str | None = None
    versions: dict = field(default_factory=dict)  # the driver's library versions
    address: str | None = None
    retries: int = 0
    timeout_s: float | None = None
    only: str | None = None  # `sweep run --only`: the slice as typed
    selected: list | None = None  # with --only: the keys of the slice (the rest of the plan waits)


@dataclass(frozen=True, kw_only=True)
class RunEnded(Event):
    """run_finished, or run_stopped (interrupted, or the scheduler gave up: `reason`)."""

    KIND: ClassVar[str] = "run_finished"
    seconds: float | None = None
    finished: int | None = None
    failed: int | None = None
    model_loads: int | None = None
    loads_by_model: dict = field(default_factory=dict)
    actors_started: int | None = None
    actors_lost: int | None = None
    reason: str | None = None


@dataclass(frozen=True, kw_only=True)
class RunStopped(RunEnded):
    KIND: ClassVar[str] = "run_stopped"


@dataclass(frozen=True, kw_only=True)
class ActorStarted(OnActor):
    KIND: ClassVar[str] = "actor_started"
    shape: str = ""
    versions: dict = field(default_factory=dict)  # the worker's library versions


@dataclass(frozen=True, kw_only=True)
class ActorFailed(Event):
    """An actor that died before running anything."""

    KIND: ClassVar[str] = "actor_failed"
    actor: int | None = None
    error: str = ""


@dataclass(frozen=True, kw_only=True)
class ActorReleased(Event):
    KIND: ClassVar[str] = "actor_released"
    actor: int | None = None
    why: str = ""
    model: str | None = None


@dataclass(frozen=True, kw_only=True)
class ActorLost(OnActor):
    KIND: ClassVar[str] = "actor_lost"
    model: str | None = None
    error: str = ""


@dataclass(frozen=True, kw_only=True)
class ModelLoaded(OnActor):
    KIND: ClassVar[str] = "model_loaded"
    model: str = ""
    seconds: float = 0.0
    load: dict | None = None  # what loading measured (engine.models)


@dataclass(frozen=True, kw_only=True)
class OnTrial(OnActor):
    """An event about one attempt of one trial."""

    key: str = ""
    name: str = ""
    model: str = ""
    attempt: int = 1
    trial: TrialFields | None = None  # what the trial is (set by the driver)


@dataclass(frozen=True, kw_only=True)
class TrialStarted(OnTrial):
    KIND: ClassVar[str] = "started"


@dataclass(frozen=True, kw_only=True)
class TrialFinished(OnTrial):
    KIND: ClassVar[str] = "finished"
    seconds: float = 0.0  # the attempt's wall time, seen by the driver
    worker_seconds: float | None = None
    load: dict | None = None  # set when this attempt loaded the model
    versions: dict | None = None  # the worker's library versions
    # the worker's raw record, kept in memory only: the fields below are what is stored of it
    result: dict | None = field(default=None, metadata={"stored": False})
    spec: dict | None = None  # the trial's spec (sweep.study.grid.TrialSpec.payload)
    metrics: list = field(default_factory=list)  # {language, task, metric, value[, stderr]}
    pruning: dict | None = None  # the pruning report (method, sparsity reached, timings, ...)
    statistics: str | None = None  # the statistics artifact
    saved_model: str | None = None
    hub_repo: str | None = None  # where `sweep push` uploads its saved model (save_models.hub_repo)
    timings: dict | None = None  # seconds per stage (engine.trial)
    git: str | None = None


@dataclass(frozen=True, kw_only=True)
class TrialFailed(OnTrial):
    KIND: ClassVar[str] = "failed"
    final: bool = True  # no retry follows
    error: str = ""
    traceback: str = ""
    seconds: float = 0.0
    git: str | None = None


@dataclass(frozen=True, kw_only=True)
class TrialAbandoned(OnTrial):
    """A trial in flight when the driver stopped: neither finished nor failed."""

    KIND: ClassVar[str] = "abandoned"


@dataclass(frozen=True, kw_only=True)
class Unschedulable(Event):
    KIND: ClassVar[str] = "unschedulable"
    shape: str = ""
    error: str = ""


@dataclass(frozen=True, kw_only=True)
class TrialsForgotten(Event):
    """`sweep forget`: these trials count as not run from now on (their earlier events stay in the log,
    and their artifacts are replaced when they run again). An older version reading this line takes it
    for an unknown kind and would still see the trials finished."""

    KIND: ClassVar[str] = "forgotten"
    keys: list = field(default_factory=list)
    # key -> the time of the latest finished or failed event of it when it was forgotten: those events and
    # earlier ones no longer count, later ones do. Times are their writers' own, so the order does not hang
    # on the clock of the machine that ran `sweep forget`.
    until: dict = field(default_factory=dict)
    selection: str = ""  # what the user asked for, as typed
    reason: str = ""
    user: str = ""
    host: str = ""


@dataclass(frozen=True, kw_only=True)
class UnknownEvent(Event):
    """A line of a kind this version does not know (a newer version wrote it): kept as read."""

    kind: str = ""
    raw: dict = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dict(self.raw)


EVENT_KINDS: dict[str, type[Event]] = {cls.KIND: cls for cls in (
    RunStarted, RunEnded, RunStopped, ActorStarted, ActorFailed, ActorReleased, ActorLost, ModelLoaded,
    TrialStarted, TrialFinished, TrialFailed, TrialAbandoned, Unschedulable, TrialsForgotten)}


def parse_event(data: dict[str, Any]) -> Event:
    """One event line, as its record. Unknown fields are dropped, missing ones take their defaults."""
    kind = data.get("event")
    cls = EVENT_KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        return UnknownEvent(time=_number(data.get("time")), run=str(data.get("run") or ""), kind=str(kind),
                            raw=dict(data))
    known = {f.name for f in fields(cls) if f.metadata.get("stored", True)}
    values = {k: v for k, v in data.items() if k in known}
    if isinstance(values.get("trial"), dict):
        values["trial"] = TrialFields.from_json(values["trial"])
    values["time"] = _number(values.get("time"))
    values["run"] = str(values.get("run") or "")
    return cls(**values)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0
