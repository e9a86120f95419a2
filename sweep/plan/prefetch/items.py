"""The prefetch plan: every model, calibration set, evaluation text and lm-eval task a study's trials read, from the study alone (pure)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.io import calibration_cache_dir
from sweep.store.locations import LocalLocation, is_url
from sweep.study.grid import Plan
from sweep.study.load import Study


@dataclass(frozen=True)
class ModelItem:
    index: int  # models[index]
    label: str
    hub: str | None
    path: str | None
    revision: str | None
    trust_remote_code: bool

    @property
    def name_or_path(self) -> str:
        return self.hub if self.hub is not None else str(self.path)

    @property
    def name(self) -> str:
        if self.hub is not None:
            return f"{self.label} ({self.hub}@{short_revision(self.revision)})"
        return f"{self.label} (local)"


def short_revision(revision: str | None) -> str:
    """`main`, a tag, or a commit hash cut to 12 characters as the hub shows it."""
    if revision is None:
        return "main"
    is_commit = len(revision) == 40 and all(c in "0123456789abcdef" for c in revision)
    return revision[:12] if is_commit else revision


@dataclass(frozen=True)
class CalibrationItem:
    mix: str  # canonical language or mix
    seed: int
    config: Any  # engine.trial.CalibrationConfig, exactly as the trials get it
    models: tuple[str, ...]  # labels of the models whose trials read it

    @property
    def name(self) -> str:
        return f"cal-{self.mix} seed {self.seed}"


@dataclass(frozen=True)
class EvaluationItem:
    language: str
    config: Any  # engine.trial.PerplexityConfig
    models: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"perplexity text {self.language}"


@dataclass(frozen=True)
class TaskItem:
    name: str  # resolved lm-eval task name
    language: str
    include_path: Path | None


@dataclass(frozen=True)
class PrefetchPlan:
    study: str
    models: tuple[ModelItem, ...]
    calibration: tuple[CalibrationItem, ...]
    evaluation: tuple[EvaluationItem, ...]
    tasks: tuple[TaskItem, ...]
    cache_dir: Path | None  # where trials cache windows and text; None: each node's $SWEEP_CACHE_DIR/calibration
    local_evaluation: str | None = None  # a local perplexity source: read at trial time, nothing to fetch

    def count(self) -> int:
        return len(self.models) + len(self.calibration) + len(self.evaluation) + len(self.tasks)


def trial_cache_dir(study: Study, out: str | Path | None = None) -> Path | None:
    """The cache directory `sweep run` hands its trials (sweep.execution.driver.build_jobs): `<study dir>/cache` for a
    local study directory; None for object storage, where each worker uses its node's default."""

    location = out or study.output_location
    if is_url(location):
        return None
    return LocalLocation(Path(location)).local_path("cache")


def node_cache_dir() -> Path:
    """The cache a worker uses when the study directory is not local (sweep.execution.worker), on this node."""
    return calibration_cache_dir()


def plan_prefetch(study: Study, plan: Plan, out: str | Path | None = None) -> PrefetchPlan:
    """What the study's trials would read from outside: no network, no tokenizer (grouping by tokenizer
    happens when the tokenizers are at hand)."""
    from sweep.study.trials import evaluation_config, resolved_tasks, trial_config

    spec = study.spec
    models = tuple(ModelItem(i, m.label, m.hub, str(study.model_paths[i]) if m.hub is None else None, m.revision,
                             m.trust_remote_code) for i, m in enumerate(spec.models))
    cache_dir = trial_cache_dir(study, out)

    calibration: dict[Any, tuple[str, int, list[str]]] = {}
    seen: set[tuple[int, str, int]] = set()
    for trial in plan.pruned:
        if trial.calibration is None:
            continue  # magnitude: no calibration data
        spot = (trial.model_index, trial.calibration.canonical(), trial.seed)
        if spot in seen:
            continue
        seen.add(spot)
        config = trial_config(study, trial, cache_dir=cache_dir).calibration
        mix, seed, labels = calibration.setdefault(config, (trial.calibration.canonical(), trial.seed, []))
        if trial.model_label not in labels:
            labels.append(trial.model_label)
    calibration_items = tuple(CalibrationItem(mix, seed, config, tuple(labels))
                              for config, (mix, seed, labels) in calibration.items())

    evaluation = evaluation_config(study, tasks=[])
    evaluation_items: tuple[EvaluationItem, ...] = ()
    local_evaluation = None
    if evaluation.perplexity is not None:
        if evaluation.perplexity.source.kind == "hub":
            labels = tuple(m.label for m in models)
            evaluation_items = tuple(EvaluationItem(lang, evaluation.perplexity, labels) for lang in evaluation.languages)
        else:
            local_evaluation = str(evaluation.perplexity.source.path)
    include = study.resolve(spec.evaluation.include_path) if spec.evaluation.include_path else None
    tasks = tuple(TaskItem(t.name, t.language, include) for t in resolved_tasks(study))
    return PrefetchPlan(study.name, models, calibration_items, evaluation_items, tasks, cache_dir, local_evaluation)
