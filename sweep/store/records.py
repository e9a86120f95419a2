"""The typed records of a study directory: plan.json, and the trial fields events carry.

Each record is written with `to_json` and read with `from_json`, so the format on disk has one definition.
Readers take missing fields as their defaults: a study directory written by an earlier version, which
lacked a field added since, still reads (tests/store/test_study_dir_compat.py).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


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
