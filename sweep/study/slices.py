"""Slices of a study: `sweep run --only model=...,calibration=...` and `sweep forget DIR model=...`.

A slice selects trials by their fields, so the trials it runs keep the keys they have in the whole
study, and the full run later reuses their results. Within a field, `|` separates alternatives; fields
are joined by `,` and must all match. A slice always keeps the dense baselines of its models: every
comparison the report makes is against them, and each runs once per model (`pruner=dense` selects the
baselines alone).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

FIELDS = ("model", "pruner", "sparsity", "calibration", "seed")


class SliceError(ValueError):
    pass


@dataclass(frozen=True)
class SliceFields:
    """A trial's fields as a slice reads them (a TrialSpec's or a plan.json record's)."""

    model: str
    pruner: str  # "dense" for a baseline
    sparsity: str  # canonical: "0.5", "2:4"; "0" for a baseline
    calibration: str | None  # canonical language or mix; None without calibration
    seed: int | None

    @property
    def dense(self) -> bool:
        return self.pruner == "dense"

    def value(self, name: str) -> str | None:
        raw = getattr(self, name)
        return None if raw is None else str(raw)


@dataclass(frozen=True)
class TrialSlice:
    """field -> the values it may take; a field not named may take any."""

    wanted: tuple[tuple[str, frozenset[str]], ...]
    text: str

    @classmethod
    def parse(cls, text: str) -> TrialSlice:
        wanted: dict[str, frozenset[str]] = {}
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            name, sep, values = part.partition("=")
            name = name.strip()
            if not sep or not values.strip():
                raise SliceError(f"{part!r} is not FIELD=VALUE; write e.g. 'model=llama3-8b,calibration=de|en' (in quotes: the shell takes | for a pipe)")
            if name not in FIELDS:
                raise SliceError(f"unknown field {name!r} in {part!r}; slice by {', '.join(FIELDS)}")
            if name in wanted:
                raise SliceError(f"{name} is given twice; list its values with '|' (e.g. '{name}=a|b', quoted)")
            wanted[name] = frozenset(v.strip() for v in values.split("|") if v.strip())
        if not wanted:
            raise SliceError(f"{text!r} selects nothing; write e.g. 'model=llama3-8b,calibration=de|en' (in quotes: the shell takes | for a pipe)")
        return cls(wanted=tuple(sorted(wanted.items())), text=text)

    def matches(self, trial: SliceFields, baselines_follow_model: bool = True) -> bool:
        """With `baselines_follow_model` (running a slice) a dense baseline matches when its model does;
        without (forgetting) its fields are matched as they are: pruner dense, sparsity 0, no calibration."""
        for name, values in self.wanted:
            if (baselines_follow_model and trial.dense and name != "model"
                    and not (name == "pruner" and "dense" in values)):
                continue  # a baseline follows its model, whatever the pruned trials' fields
            if trial.value(name) not in values:
                return False
        return True

    def check_values(self, trials: Iterable[SliceFields]) -> None:
        """Every value named occurs in the study: a typo would otherwise select nothing, silently."""
        trials = list(trials)
        for name, values in self.wanted:
            known = {t.value(name) for t in trials if t.value(name) is not None}
            if name == "pruner":
                known.add("dense")
            unknown = sorted(values - known)
            if unknown:
                raise SliceError(f"{name}={'|'.join(unknown)} matches no trial of the study; its {name} values "
                                 f"are {', '.join(sorted(known)) or 'none'}")

    def select(self, trials: Iterable[SliceFields], baselines_follow_model: bool = True) -> list[int]:
        """Indices of the matching trials; SliceError if a value is unknown or nothing matches."""
        trials = list(trials)
        self.check_values(trials)
        chosen = [i for i, trial in enumerate(trials) if self.matches(trial, baselines_follow_model)]
        if not chosen:
            raise SliceError(f"{self.text!r} matches no trial of the study")
        return chosen
