"""Expanding a study into trials, each with a deterministic key.

A trial key is `v<KEY_VERSION>-` + a hash of the canonical JSON of only what changes the trial's
result: the model (hub id and revision, or a local model's content fingerprint) and its dtype; the
calibration source, language or mix, samples, sequence length and seed (and the sampling rule and
separator when not the defaults); the pruner with all its
parameters (defaults filled in) and targets; the sparsity; and the evaluation suite. Labels, batch
sizes, devices, retries and output directories are left out, so changing them never re-runs work.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from engine.data.local_files import find_language_files
from engine.fingerprint import files_fingerprint, model_dir_fingerprint
from engine.languages import get_language
from engine.prune.params import PRUNER_PARAMS
from engine.prune.sparsity import Sparsity, parse_sparsity
from sweep.study.load import LanguageMix, Study
from sweep.study.schema import ModelSpec, PrunerSpec, TextSource
from sweep.study.slices import SliceFields

KEY_VERSION = 1


@dataclass(frozen=True)
class TrialSpec:
    """One unit of work. `pruner is None` marks the dense baseline of `model_label`."""

    model_index: int
    model_label: str
    pruner_label: str | None
    sparsity: Sparsity | None
    calibration: LanguageMix | None
    seed: int | None
    identity: str  # canonical JSON of the fields that change the result
    key: str

    @property
    def is_dense(self) -> bool:
        return self.pruner_label is None

    @property
    def name(self) -> str:
        if self.is_dense:
            return f"{self.model_label}.dense"
        parts = [self.model_label, self.pruner_label, self.sparsity.slug()]
        if self.calibration is not None:
            parts += [f"cal-{self.calibration.slug()}", f"seed{self.seed}"]
        return ".".join(parts)

    def payload(self) -> dict[str, Any]:
        return json.loads(self.identity)

    def slice_fields(self) -> SliceFields:
        return SliceFields(model=self.model_label, pruner=self.pruner_label or "dense",
                           sparsity=self.sparsity.canonical() if self.sparsity else "0",
                           calibration=self.calibration.canonical() if self.calibration else None, seed=self.seed)


@dataclass(frozen=True)
class Plan:
    study: Study
    trials: tuple[TrialSpec, ...]  # dense baselines first, then pruned trials in grid order

    @property
    def dense(self) -> list[TrialSpec]:
        return [t for t in self.trials if t.is_dense]

    @property
    def pruned(self) -> list[TrialSpec]:
        return [t for t in self.trials if not t.is_dense]

    def per_model(self) -> dict[str, dict[str, int]]:
        counts: dict[str, dict[str, int]] = {}
        for trial in self.trials:
            entry = counts.setdefault(trial.model_label, {"pruned": 0, "dense": 0})
            entry["dense" if trial.is_dense else "pruned"] += 1
        return counts


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def key_of(identity: str) -> str:
    return f"v{KEY_VERSION}-" + hashlib.sha256(identity.encode("ascii")).hexdigest()[:20]


class _Identities:
    """Canonical identities of the study's parts, computed once per plan (fingerprints read files)."""

    def __init__(self, study: Study):
        self.study = study

    def model(self, index: int) -> dict[str, Any]:
        return self._models[index]

    @cached_property
    def _models(self) -> dict[int, dict[str, Any]]:
        out = {}
        for i, model in enumerate(self.study.spec.models):
            out[i] = self._model_identity(i, model)
        return out

    def _model_identity(self, index: int, model: ModelSpec) -> dict[str, Any]:
        if model.hub is not None:
            return {"hub": model.hub, "revision": model.revision or "main", "dtype": model.dtype}
        path = self.study.model_paths[index]
        identity = {"local": model_dir_fingerprint(path), "dtype": model.dtype}
        if model.revision is not None:
            identity["revision"] = model.revision
        return identity

    def text_source(self, source: TextSource, languages: tuple[str, ...]) -> dict[str, Any]:
        if source.kind == "hub":
            identity = {"hub": source.dataset, "config": source.config or "{lang}", "revision": source.revision or "main",
                        "split": source.split or "train", "text_field": source.text_field}
            if source.config and "{mc4}" in source.config:
                # The configs `{mc4}` names where they are not the ISO code: English became `en-multi` (mC4's
                # English, not C4's), so trials that read it must not match results from the old mapping.
                renamed = {code: get_language(code).mc4 for code in sorted(languages)
                           if get_language(code).mc4 not in (None, code)}
                if renamed:
                    identity["mc4_configs"] = renamed
            return identity
        root = self.study.resolve(source.path)
        files = [f for code in languages for f in find_language_files(root, code, source.split)]
        return {"local": files_fingerprint(files, root), "split": source.split, "text_field": source.text_field}

    @cached_property
    def evaluation(self) -> dict[str, Any]:
        ev = self.study.spec.evaluation
        languages = tuple(sorted(ev.languages))
        suite: dict[str, Any] = {"languages": list(languages)}
        if ev.perplexity is not None:
            suite["perplexity"] = {
                "source": self.text_source(ev.perplexity.source, languages),
                "window": ev.perplexity.window,
                "max_tokens": ev.perplexity.max_tokens,
            }
        if ev.include_path is not None:
            # Local task definitions change results as much as task names do.
            folder = self.study.resolve(ev.include_path)
            suite["task_files"] = files_fingerprint([p for p in folder.rglob("*") if p.is_file()], folder)
        suite["tasks"] = sorted(
            ({"task": t.task, "shots": t.shots, "limit": t.limit, "languages": sorted(t.languages or languages)}
             for t in ev.tasks),
            key=canonical_json,
        )
        return suite

    def pruner(self, pruner: PrunerSpec) -> dict[str, Any]:
        params = PRUNER_PARAMS[pruner.method].model_validate(pruner.params)
        return {"method": pruner.method, "params": params.model_dump(mode="json"), "targets": pruner.targets}


def expand(study: Study) -> Plan:
    """Every trial of the study in a stable order; equal trials (e.g. magnitude under two
    calibration languages, which it ignores) appear once."""
    spec = study.spec
    ids = _Identities(study)
    trials: list[TrialSpec] = []
    seen: set[str] = set()

    def add(identity_dict: dict[str, Any], **fields: Any) -> None:
        identity = canonical_json({"key_version": KEY_VERSION, **identity_dict})
        key = key_of(identity)
        if key not in seen:
            seen.add(key)
            trials.append(TrialSpec(identity=identity, key=key, **fields))

    cal = spec.calibration
    for m, model in enumerate(spec.models):
        base = {"model": ids.model(m), "evaluation": ids.evaluation}
        if spec.baselines.dense:
            add({**base, "dense": True}, model_index=m, model_label=model.label, pruner_label=None,
                sparsity=None, calibration=None, seed=None)
        for pruner in spec.pruners:
            uses_calibration = PRUNER_PARAMS[pruner.method].needs_calibration
            for sparsity_value in pruner.sparsity_values:
                sparsity = parse_sparsity(sparsity_value)
                pruned = {**base, "pruner": ids.pruner(pruner), "sparsity": sparsity.canonical()}
                if not uses_calibration:
                    add(pruned, model_index=m, model_label=model.label, pruner_label=pruner.label,
                        sparsity=sparsity, calibration=None, seed=None)
                    continue
                for mix in study.calibration_mixes:
                    for seed in cal.seeds:
                        calibration = {
                            "source": ids.text_source(cal.source, mix.codes),
                            "languages": [[code, weight] for code, weight in mix.weights],
                            "samples": cal.samples,
                            "seq_len": cal.seq_len,
                            "seed": seed,
                        }
                        # Only when not the default, so that packed studies keep the keys they had before.
                        if cal.sampling != "packed":
                            calibration["sampling"] = cal.sampling
                        if cal.separator is not None:
                            calibration["separator"] = cal.separator
                        add({**pruned, "calibration": calibration}, model_index=m, model_label=model.label,
                            pruner_label=pruner.label, sparsity=sparsity, calibration=mix, seed=seed)
    return Plan(study=study, trials=tuple(trials))
