"""The units an evaluation averages over, kept per trial so that two trials can be compared on the same
units: every evaluation token's negative log-likelihood, and every task document's own score.

Perplexity and accuracy are means over units (tokens, documents) that every trial of a model shares: the
same evaluation tokens in the same order, the same documents. A paired test between two calibration
languages resamples those units, so it needs each unit's value rather than the mean alone. They are
written to `units.safetensors` in the trial's artifacts (one float32 per token and per document and
metric: for 7 languages of 2^17 tokens, 3.7 MB), not into the event log.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.evaluate.perplexity import PerplexityResult
from engine.io import atomic_path

UNITS_FILE = "units.safetensors"


@dataclass(frozen=True)
class TokenLosses:
    token_nll: np.ndarray  # [tokens] float32, nats, in text order
    bytes: int  # UTF-8 bytes the tokens spell (the bits-per-byte denominator)


@dataclass(frozen=True)
class TaskScores:
    language: str
    doc_id: np.ndarray  # [documents] int64, ascending
    choices: np.ndarray  # [documents] int32: answer options of a multiple-choice document, 0 when not one
    metrics: dict[str, np.ndarray]  # metric -> [documents] float32, lm-eval's per-document value


@dataclass
class EvaluationUnits:
    perplexity: dict[str, TokenLosses] = field(default_factory=dict)  # by target language
    tasks: dict[str, TaskScores] = field(default_factory=dict)  # by lm-eval task name

    @property
    def empty(self) -> bool:
        return not self.perplexity and not self.tasks

    def add_perplexity(self, language: str, result: PerplexityResult) -> None:
        if len(result.token_nll) != result.tokens:
            return  # a result without its per-token losses: nothing to pair on
        self.perplexity[language] = TokenLosses(np.asarray(result.token_nll, dtype=np.float32), result.bytes)

    def add_task(self, name: str, language: str, units: dict | None) -> None:
        """`units` as engine.evaluate.tasks returns them: doc_id, choices and per-metric lists."""
        if not units or not units.get("doc_id"):
            return
        self.tasks[name] = TaskScores(
            language=language, doc_id=np.asarray(units["doc_id"], dtype=np.int64),
            choices=np.asarray([c or 0 for c in units["choices"]], dtype=np.int32),
            metrics={m: np.asarray(v, dtype=np.float32) for m, v in units["metrics"].items()})

    def save(self, path: Path, metadata: dict[str, str] | None = None) -> Path:
        from safetensors.numpy import save_file

        tensors: dict[str, np.ndarray] = {}
        index = {"perplexity": {}, "tasks": {}}
        for number, (language, losses) in enumerate(self.perplexity.items()):
            tensors[f"perplexity.{number}.token_nll"] = losses.token_nll
            index["perplexity"][language] = {"tensor": number, "bytes": losses.bytes}
        for number, (name, scores) in enumerate(self.tasks.items()):
            tensors[f"task.{number}.doc_id"] = scores.doc_id
            tensors[f"task.{number}.choices"] = scores.choices
            for position, values in enumerate(scores.metrics.values()):
                tensors[f"task.{number}.metric.{position}"] = values
            index["tasks"][name] = {"tensor": number, "language": scores.language, "metrics": list(scores.metrics)}
        path = Path(path)
        with atomic_path(path) as temporary:
            save_file(tensors, str(temporary), metadata={**(metadata or {}), "index": json.dumps(index)})
        return path


def load_units(path: Path) -> EvaluationUnits:
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as handle:
        index = json.loads(handle.metadata()["index"])
        units = EvaluationUnits()
        for language, entry in index["perplexity"].items():
            units.perplexity[language] = TokenLosses(handle.get_tensor(f"perplexity.{entry['tensor']}.token_nll"),
                                                     int(entry["bytes"]))
        for name, entry in index["tasks"].items():
            number = entry["tensor"]
            units.tasks[name] = TaskScores(
                language=entry["language"], doc_id=handle.get_tensor(f"task.{number}.doc_id"),
                choices=handle.get_tensor(f"task.{number}.choices"),
                metrics={m: handle.get_tensor(f"task.{number}.metric.{i}") for i, m in enumerate(entry["metrics"])})
    return units
