"""Loading a study file: YAML -> typed `StudySpec` -> cross-field checks -> a resolved `Study`.

Nothing here starts work or writes a file: `load_study` either returns a `Study` or raises
`StudyInvalid` listing every problem with its field path.
"""
from __future__ import annotations

import difflib
import json
import os
import re
import string
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from engine.data.local_files import find_language_files
from engine.evaluate.tasks import close_names, task_index
from engine.languages import LANGUAGES, closest_codes, resolve_task
from engine.prune.params import PRUNER_PARAMS
from engine.prune.sparsity import parse_sparsity
from sweep.study.problems import Problem, StudyInvalid, join_path
from sweep.study.pydantic_errors import problems_from_validation_error
from sweep.study.schema import HUB_ID, SLUG, MixSpec, ModelSpec, StudySpec, TextSource
from sweep.study.yaml_loader import StudyFileError, load_yaml_file

SOURCE_CODE_FIELDS = ("lang", "code", "mc4", "flores", "iso639_3")
LOCAL_SPLIT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")  # a file stem or folder name: no '/', '..' or glob


@dataclass(frozen=True)
class LanguageMix:
    """A calibration language or mixture, canonical: codes sorted, weights summing to 1."""

    weights: tuple[tuple[str, float], ...]

    @property
    def codes(self) -> tuple[str, ...]:
        return tuple(code for code, _ in self.weights)

    @property
    def is_mix(self) -> bool:
        return len(self.weights) > 1

    def canonical(self) -> str:
        if not self.is_mix:
            return self.weights[0][0]
        equal = len({w for _, w in self.weights}) == 1
        if equal:
            return "+".join(self.codes)
        return "+".join(f"{code}:{w:.6g}" for code, w in self.weights)

    def slug(self) -> str:
        return self.canonical().replace(":", "").replace(".", "p")


@dataclass(frozen=True)
class ResolvedTask:
    index: int  # evaluation.tasks[index]
    language: str
    name: str | None  # the lm-eval task name; None when the language has no code in the benchmark's scheme


@dataclass(frozen=True)
class Study:
    spec: StudySpec
    source: str  # the study file (or "<text>")
    base_dir: Path  # relative paths in the study resolve against this
    model_paths: dict[int, Path] = field(default_factory=dict)  # models[i].path, resolved
    calibration_mixes: tuple[LanguageMix, ...] = ()
    warnings: tuple[Problem, ...] = ()
    tasks: tuple[ResolvedTask, ...] = ()  # lm-eval tasks that exist, per target language
    missing_tasks: tuple[ResolvedTask, ...] = ()  # (template, language) pairs a benchmark lacks
    text: str = ""  # the study file as read; a study built from data has none

    @property
    def name(self) -> str:
        return self.spec.name

    def resolve(self, path: str) -> Path:
        return resolve_path(path, self.base_dir)

    @property
    def file_text(self) -> str:
        """The study file as written, or for a study built from data, its spec as YAML."""
        return self.text or yaml.safe_dump(self.spec.model_dump(mode="json"), sort_keys=False, allow_unicode=True)

    @property
    def output_dir(self) -> Path:
        return self.resolve(self.spec.execution.output_dir.replace("{study}", self.spec.name))

    @property
    def output_location(self) -> Path | str:
        """The study directory: a local folder, or an object-storage URL kept as written."""
        raw = self.spec.execution.output_dir.replace("{study}", self.spec.name)
        return raw.rstrip("/") if "://" in raw else self.output_dir


def resolve_path(path: str, base_dir: Path) -> Path:
    expanded = Path(os.path.expanduser(os.path.expandvars(path)))
    return expanded if expanded.is_absolute() else (base_dir / expanded)


# The offline assets study files name through these variables, and the command that builds each.
ASSET_COMMANDS = {"SWEEP_MODELS_DIR": "make real-models (python -m engine.pretrained.build)",
                  "SWEEP_CORPUS_DIR": "make corpus (python -m engine.demo.build --corpus-only)",
                  "SWEEP_DEMO_DIR": "make assets (python -m engine.demo.build)"}


def asset_hint(raw_path: str) -> str:
    """What builds a missing path that lies under one of the offline asset directories."""
    for variable, command in ASSET_COMMANDS.items():
        if f"${{{variable}}}" in raw_path or f"${variable}" in raw_path:
            return f"; the offline assets there are built by `{command}`"
    return ""


def load_study(path: str | Path) -> Study:
    path = Path(path)
    try:
        data = load_yaml_file(path)
    except StudyFileError as err:
        raise StudyInvalid(err.where, [Problem("", err.message)]) from None
    study = study_from_data(data, source=str(path), base_dir=path.resolve().parent)
    return replace(study, text=path.read_text(encoding="utf-8"))


def study_from_data(data: Any, source: str, base_dir: Path) -> Study:
    if not isinstance(data, dict):
        kind = "an empty file" if data is None else f"a {type(data).__name__}"
        raise StudyInvalid(source, [Problem("", f"a study file is a mapping with keys such as name, models, calibration, pruners, evaluation; this is {kind}")])
    non_string = [k for k in data if not isinstance(k, str)]
    if non_string:
        raise StudyInvalid(source, [Problem(str(k), "keys must be names (strings)") for k in non_string])
    try:
        spec = StudySpec.model_validate(data)
    except ValidationError as err:
        raise StudyInvalid(source, problems_from_validation_error(err, StudySpec, data)) from None
    checker = _Checker(spec, base_dir)
    checker.run()
    if checker.problems:
        raise StudyInvalid(source, checker.problems)
    return Study(
        spec=spec,
        source=source,
        base_dir=base_dir,
        model_paths=checker.model_paths,
        calibration_mixes=tuple(checker.mixes),
        warnings=tuple(checker.warnings),
        tasks=tuple(checker.tasks),
        missing_tasks=tuple(checker.missing_tasks),
    )


def parse_language_choice(choice: str | MixSpec) -> LanguageMix:
    """'en', 'en+de' (equal weights), 'en:3+de:1', or {mix: {en: 3, de: 1}} -> LanguageMix. ValueError if malformed."""
    if isinstance(choice, MixSpec):
        raw = []
        for code, weight in choice.mix.items():
            try:
                raw.append((code, float(weight)))
            except OverflowError:
                raise ValueError(f"weight of {code!r} is too large; weights are relative, e.g. {{en: 3, de: 1}}") from None
    else:
        raw = []
        for part in choice.split("+"):
            code, sep, weight = part.strip().partition(":")
            if not code:
                raise ValueError(f"{choice!r} is not a language or mix; write 'en', 'en+de' or 'en:3+de:1'")
            try:
                raw.append((code.strip(), float(weight) if sep else 1.0))
            except ValueError:
                raise ValueError(f"{choice!r}: weight {weight!r} of {code!r} is not a number") from None
    if not raw:
        raise ValueError("a mix needs at least one language")
    codes = [code for code, _ in raw]
    dupes = sorted({c for c in codes if codes.count(c) > 1})
    if dupes:
        raise ValueError(f"{', '.join(dupes)} appears twice in one mix")
    for code, weight in raw:
        if not weight > 0 or weight != weight or weight == float("inf"):
            raise ValueError(f"weight of {code!r} must be a positive number, got {weight}")
    total = sum(w for _, w in raw)
    if total == float("inf"):
        raise ValueError("the weights are too large to add up; weights are relative, e.g. en:3+de:1")
    weights = tuple(sorted((code, round(w / total, 9)) for code, w in raw))
    for code, weight in weights:
        if weight <= 0:
            raise ValueError(f"weight of {code!r} is negligible next to the others (under 1e-9 of their sum)")
    return LanguageMix(weights)


def template_fields(template: str) -> list[str]:
    """The {placeholders} of a template; ValueError if it is not a valid template."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


class _Checker:
    """Cross-field rules pydantic cannot express; collects every problem rather than stopping at one."""

    def __init__(self, spec: StudySpec, base_dir: Path):
        self.spec = spec
        self.base_dir = base_dir
        self.problems: list[Problem] = []
        self.warnings: list[Problem] = []
        self.model_paths: dict[int, Path] = {}
        self.mixes: list[LanguageMix] = []
        self.tasks: list[ResolvedTask] = []
        self.missing_tasks: list[ResolvedTask] = []

    def fail(self, path: str, message: str) -> None:
        self.problems.append(Problem(path, message))

    def warn(self, path: str, message: str) -> None:
        self.warnings.append(Problem(path, message))

    def run(self) -> None:
        self.check_models()
        self.check_calibration()
        self.check_pruners()
        self.check_evaluation()
        if not self.problems:
            self.check_task_names()
        self.check_execution()

    # -- models ---------------------------------------------------------------------------------
    def check_models(self) -> None:
        seen_identity: dict[tuple, int] = {}
        seen_label: dict[str, int] = {}
        for i, model in enumerate(self.spec.models):
            where = join_path("models", i)
            identity = self._check_model_source(i, model, where)
            if model.name is not None and not SLUG.match(model.name):
                self.fail(join_path(where, "name"), f"{model.name!r} must be a short slug: lowercase letters, digits, '.', '_' or '-'")
            if identity is not None and identity in seen_identity:
                self.fail(where, f"duplicates models[{seen_identity[identity]}] (same model and revision); list each model once")
            else:
                if identity is not None:
                    seen_identity[identity] = i
                if model.label in seen_label:
                    self.fail(join_path(where, "name"), f"label {model.label!r} is already used by models[{seen_label[model.label]}]; give each model a distinct name")
                seen_label.setdefault(model.label, i)
            if model.accelerator_type is not None:
                if model.gpus == 0:
                    self.fail(join_path(where, "accelerator_type"), "needs gpus of 1 or more (gpus: 0 runs on CPU)")
            for what, needed in (("calibration.seq_len", self.spec.calibration.seq_len),
                                 ("evaluation.perplexity.window", self.spec.evaluation.perplexity.window if self.spec.evaluation.perplexity else 0)):
                if needed > model.max_seq_len:
                    self.fail(what, f"{needed} exceeds models[{i}].max_seq_len ({model.max_seq_len}) of {model.label!r}")

    def _check_model_source(self, i: int, model: ModelSpec, where: str) -> tuple | None:
        if (model.hub is None) == (model.path is None):
            self.fail(where, "give exactly one of hub: (a hub id such as meta-llama/Meta-Llama-3-8B) or path: (a local model directory)")
            return None
        if model.hub is not None:
            if not HUB_ID.match(model.hub):
                self.fail(join_path(where, "hub"), f"{model.hub!r} is not a hub id; expected 'owner/name'")
                return None
            if model.revision is None:
                self.warn(join_path(where, "revision"), f"{model.hub} is not pinned to a revision; results may change if the hub repository does (pin a commit hash)")
            return ("hub", model.hub, model.revision or "main")
        resolved = resolve_path(model.path, self.base_dir)
        if not resolved.exists():
            self.fail(join_path(where, "path"), f"{resolved} does not exist (relative paths are read from the study file's "
                                                f"folder, {self.base_dir}){asset_hint(model.path)}")
            return None
        config = resolved / "config.json"
        if not config.is_file():
            self.fail(join_path(where, "path"), f"{resolved} has no config.json: not a Hugging Face model directory")
            return None
        try:
            config_data = json.loads(config.read_text(encoding="utf-8"))
        except (ValueError, OSError) as err:
            self.fail(join_path(where, "path"), f"{config} is not readable JSON ({err})")
            return None
        if not isinstance(config_data, dict):
            self.fail(join_path(where, "path"), f"{config} is not a JSON object: not a model configuration")
            return None
        if config_data.get("auto_map") and not model.trust_remote_code:
            self.fail(join_path(where, "trust_remote_code"),
                      f"{config} asks to run code shipped with the model (auto_map); set trust_remote_code: true only if you trust its source")
        self.model_paths[i] = resolved
        return ("path", str(resolved.resolve()), model.revision)

    # -- text sources and languages -------------------------------------------------------------
    def _check_source(self, source: TextSource, where: str) -> Path | None:
        if source.kind == "hub":
            if source.path is not None:
                self.fail(join_path(where, "path"), "is for kind: local; a hub source names dataset: and config:")
            if not source.dataset:
                self.fail(join_path(where, "dataset"), "is required for kind: hub (for example allenai/c4)")
            elif not HUB_ID.match(source.dataset):
                self.fail(join_path(where, "dataset"), f"{source.dataset!r} is not a hub dataset id; expected 'owner/name'")
            if source.config is not None:
                try:
                    names = template_fields(source.config)
                except ValueError as err:
                    self.fail(join_path(where, "config"), f"{source.config!r} is not a valid template: {err}")
                else:
                    for name in names:
                        if name not in SOURCE_CODE_FIELDS:
                            self.fail(join_path(where, "config"), f"unknown placeholder {{{name}}}; allowed: " + ", ".join(f"{{{f}}}" for f in SOURCE_CODE_FIELDS))
            if source.dataset and source.revision is None:
                self.warn(join_path(where, "revision"), f"{source.dataset} is not pinned to a revision")
            return None
        for name in ("dataset", "config", "revision"):
            if getattr(source, name) is not None:
                self.fail(join_path(where, name), "is for kind: hub; a local source names path: (and optionally split:)")
        if source.path is None:
            self.fail(join_path(where, "path"), "is required for kind: local (a directory with one folder or file per language)")
            return None
        if source.split is not None and not LOCAL_SPLIT.match(source.split):
            self.fail(join_path(where, "split"), f"{source.split!r} must be one folder or file name (letters, digits, "
                                                 "'.', '_', '-'), such as calibration: <lang>/<split>.* or <lang>/<split>/")
            return None
        resolved = resolve_path(source.path, self.base_dir)
        if not resolved.is_dir():
            self.fail(join_path(where, "path"), f"{resolved} is not a directory{asset_hint(source.path)}")
            return None
        return resolved

    def _language_available(self, source: TextSource, root: Path | None, code: str) -> str | None:
        """None if `source` has text for `code`, else why not."""
        if source.kind == "local":
            if root is None:
                return None  # the source itself is already reported
            if not find_language_files(root, code, source.split):
                split = f" for split {source.split!r}" if source.split else ""
                return f"no text for {code!r}{split} under {root} (expected {code}/ with .jsonl/.txt/.parquet files, or {code}.jsonl)"
            return None
        try:
            names = template_fields(source.config) if source.config else ["lang"]
        except ValueError:
            return None  # the template itself is already reported
        language = LANGUAGES[code]
        for name in names:
            if name in SOURCE_CODE_FIELDS and language.source_code(name) is None:
                return f"{language.name} ({code}) has no {{{name}}} code: {source.dataset} has no such language"
        return None

    def _check_code(self, code: str, where: str) -> bool:
        if code in LANGUAGES:
            return True
        near = closest_codes(code)
        hint = f" (did you mean {', '.join(repr(c) for c in near)}?)" if near else ""
        self.fail(where, f"unknown language code {code!r}{hint}; use ISO 639-1 codes such as {', '.join(sorted(LANGUAGES)[:8])}, ...")
        return False

    def check_calibration(self) -> None:
        cal = self.spec.calibration
        root = self._check_source(cal.source, "calibration.source")
        seen: dict[LanguageMix, int] = {}
        for j, choice in enumerate(cal.languages):
            where = join_path("calibration", "languages", j)
            try:
                mix = parse_language_choice(choice)
            except ValueError as err:
                self.fail(where, str(err))
                continue
            if not all([self._check_code(code, where) for code in mix.codes]):
                continue
            for code in mix.codes:
                missing = self._language_available(cal.source, root, code)
                if missing:
                    self.fail(where, f"no calibration source: {missing}")
            if mix in seen:
                self.fail(where, f"{mix.canonical()!r} repeats calibration.languages[{seen[mix]}]")
            else:
                seen[mix] = j
                self.mixes.append(mix)
        self._check_unique(cal.seeds, "calibration.seeds")

    def _check_unique(self, values: list, where: str) -> None:
        seen: dict = {}
        for j, value in enumerate(values):
            if value in seen:
                self.fail(join_path(where, j), f"{value!r} repeats {where}[{seen[value]}]")
            seen.setdefault(value, j)

    # -- pruners ----------------------------------------------------------------------------------
    def check_pruners(self) -> None:
        seen_identity: dict[str, int] = {}
        seen_label: dict[str, int] = {}
        for i, pruner in enumerate(self.spec.pruners):
            where = join_path("pruners", i)
            params_cls = PRUNER_PARAMS.get(pruner.method)
            if params_cls is None:
                near = difflib.get_close_matches(pruner.method.lower(), list(PRUNER_PARAMS), n=1, cutoff=0.5)
                hint = f" (did you mean '{near[0]}'?)" if near else ""
                self.fail(join_path(where, "method"), f"unknown pruner {pruner.method!r}{hint}; available: {', '.join(PRUNER_PARAMS)}")
            else:
                try:
                    params = params_cls.model_validate(pruner.params)
                except ValidationError as err:
                    for problem in problems_from_validation_error(err, params_cls, pruner.params):
                        self.fail(join_path(where, "params", problem.path) if problem.path else join_path(where, "params"), problem.message)
                else:
                    identity = json.dumps([pruner.method, params.model_dump(mode="json"), pruner.targets], sort_keys=True)
                    if identity in seen_identity:
                        self.fail(where, f"duplicates pruners[{seen_identity[identity]}] (same method, params and targets); merge their sparsities")
                    seen_identity.setdefault(identity, i)
            if pruner.name is not None and not SLUG.match(pruner.name):
                self.fail(join_path(where, "name"), f"{pruner.name!r} must be a short slug: lowercase letters, digits, '.', '_' or '-'")
            if pruner.label in seen_label:
                self.fail(join_path(where, "name"), f"label {pruner.label!r} is already used by pruners[{seen_label[pruner.label]}]; give each a distinct name:")
            seen_label.setdefault(pruner.label, i)
            values = pruner.sparsity_values
            listed = isinstance(pruner.sparsity, list)
            if listed and not values:
                self.fail(join_path(where, "sparsity"), "is empty; list at least one value (an empty axis gives no trials)")
            canonical_seen: dict[str, int] = {}
            for k, value in enumerate(values):
                spot = join_path(where, "sparsity", k) if listed else join_path(where, "sparsity")
                try:
                    canonical = parse_sparsity(value).canonical()
                except ValueError as err:
                    self.fail(spot, str(err))
                    continue
                if canonical in canonical_seen:
                    self.fail(spot, f"{value!r} repeats {join_path(where, 'sparsity', canonical_seen[canonical])} ({canonical})")
                canonical_seen.setdefault(canonical, k)
            for k, pattern in enumerate(pruner.targets or []):
                try:
                    re.compile(pattern)
                except re.error as err:
                    self.fail(join_path(where, "targets", k), f"{pattern!r} is not a regular expression: {err}")

    # -- evaluation -------------------------------------------------------------------------------
    def check_evaluation(self) -> None:
        ev = self.spec.evaluation
        known = [code for j, code in enumerate(ev.languages) if self._check_code(code, join_path("evaluation", "languages", j))]
        self._check_unique(ev.languages, "evaluation.languages")
        if ev.perplexity is not None:
            root = self._check_source(ev.perplexity.source, "evaluation.perplexity.source")
            for j, code in enumerate(ev.languages):
                if code in known:
                    missing = self._language_available(ev.perplexity.source, root, code)
                    if missing:
                        self.fail(join_path("evaluation", "languages", j), f"no perplexity text: {missing}")
        if ev.include_path is not None:
            resolved = resolve_path(ev.include_path, self.base_dir)
            if not resolved.is_dir():
                self.fail("evaluation.include_path",
                          f"{resolved} is not a directory of lm-eval task YAML files{asset_hint(ev.include_path)}")
        if ev.perplexity is None and not ev.tasks:
            self.fail("evaluation", "measures nothing: add perplexity: and/or tasks:")
        for t, task in enumerate(ev.tasks):
            where = join_path("evaluation", "tasks", t)
            try:
                for name in template_fields(task.task):
                    if name not in SOURCE_CODE_FIELDS:
                        self.fail(join_path(where, "task"), f"unknown placeholder {{{name}}}; allowed: " + ", ".join(f"{{{f}}}" for f in SOURCE_CODE_FIELDS))
            except ValueError as err:
                self.fail(join_path(where, "task"), f"{task.task!r} is not a valid template: {err}")
            for j, code in enumerate(task.languages or []):
                if code not in ev.languages:
                    self.fail(join_path(where, "languages", j), f"{code!r} is not among evaluation.languages ({', '.join(ev.languages)})")

    def check_task_names(self) -> None:
        """Each template must name a real lm-eval task in at least one target language; a language the
        benchmark lacks is reported as missing (a warning here, a missing cell in the results)."""
        ev = self.spec.evaluation
        if not ev.tasks:
            return

        include = resolve_path(ev.include_path, self.base_dir) if ev.include_path else None
        known = task_index(include)
        for t, task in enumerate(ev.tasks):
            resolved = [ResolvedTask(t, lang, resolve_task(task.task, lang)) for lang in (task.languages or ev.languages)]
            present = [r for r in resolved if r.name is not None and r.name in known]
            if not present:
                example = next((r.name for r in resolved if r.name), task.task)
                near = close_names(example, known, n=5)
                hint = f"; close names: {', '.join(near)}" if near else ""
                self.fail(join_path("evaluation", "tasks", t, "task"),
                          f"lm-eval has no task {example!r} (from {task.task!r}) in any target language{hint}")
                continue
            self.tasks.extend(present)
            for r in resolved:
                if r not in present:
                    self.missing_tasks.append(r)
                    self.warn(join_path("evaluation", "tasks", t),
                              f"{r.name or task.task} does not exist: {r.language} is reported as missing for this task")

    def check_execution(self) -> None:
        if "\x00" in self.spec.execution.output_dir:
            self.fail("execution.output_dir", "contains a NUL character, which no file system accepts")
            return
        try:
            names = template_fields(self.spec.execution.output_dir)
        except ValueError as err:
            self.fail("execution.output_dir", f"not a valid template: {err}")
            return
        for name in names:
            if name != "study":
                self.fail("execution.output_dir", f"unknown placeholder {{{name}}}; only {{study}} is allowed")
