"""`sweep push`: a study directory's saved pruned models, uploaded to the hub off the GPU actors.

The upload used to run inside each trial, on its GPU actor and under its timeout; here it runs wherever the
study directory is on disk, beside a running sweep or after it. It only reads the study directory (the
frozen study file, plan.json, the event logs) and never takes the driver lock: the driver stays the only
writer of the event logs. What it pushed is recorded per trial in `artifacts/<key>/pushed.json`, written
whole (engine.io) and only after the upload succeeded, so a second push skips what is done, and an
interrupted one resumes (huggingface_hub skips files the repository already holds).

The card goes up as the hub needs it: a saved card names a local base model by its path, which the hub
refuses as `base_model`, so the uploaded README.md names the base's hub origin instead (or no base model);
the card on disk is left as it is.
"""
from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pydantic import ValidationError

from engine.io import atomic_write_bytes
from engine.prune.sparsity import parse_sparsity
from sweep.exit_codes import ExitCode
from sweep.store.locations import is_url
from sweep.store.records import TrialFields, TrialFinished
from sweep.store.study_store import StudyStore
from sweep.study.grid import TrialSpec
from sweep.study.load import Study, parse_language_choice
from sweep.study.schema import StudySpec
from sweep.study.yaml_loader import StudyFileError, load_yaml_file

MARKER = "pushed.json"  # artifacts/<key>/pushed.json: this trial's model is on the hub
CARD = "README.md"
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# Exception class names (httpx, requests, the standard library) that mean the hub was never reached.
NETWORK_ERRORS = frozenset({"ConnectError", "ConnectTimeout", "ReadTimeout", "NetworkError", "TimeoutException",
                            "TransportError", "ConnectionError", "Timeout"})


class PushError(Exception):
    """Why nothing (more) is pushed, in one line that says what to do; `code` is the command's exit code."""

    def __init__(self, message: str, code: ExitCode = ExitCode.INVALID):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class PushMarker:
    """artifacts/<key>/pushed.json."""

    repo: str
    revision: str | None  # the commit that completed the upload (the card's)
    private: bool
    endpoint: str
    pushed_at: str  # UTC, ISO 8601
    trial_finished_at: float  # the finished event's time: a trial run again (sweep forget) is pushed again
    commit_url: str | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> PushMarker:
        return cls(repo=str(data.get("repo", "")), revision=data.get("revision"), private=bool(data.get("private")),
                   endpoint=str(data.get("endpoint", "")), pushed_at=str(data.get("pushed_at", "")),
                   trial_finished_at=float(data.get("trial_finished_at") or 0.0), commit_url=data.get("commit_url"))


@dataclass(frozen=True)
class PushItem:
    """One finished pruned trial's saved model and the repository it goes to."""

    key: str
    name: str
    repo: str
    folder: Path
    marker_path: Path
    finished_at: float
    pushed: PushMarker | None = None  # a marker of this very run of the trial, to this repo: done before

    @property
    def done(self) -> bool:
        return self.pushed is not None


@dataclass(frozen=True)
class PushPlan:
    directory: Path
    study_file: Path  # where the hub_repo template and `private` were read
    private: bool  # save_models.private
    items: tuple[PushItem, ...]
    missing: tuple[str, ...] = ()  # finished pruned trials whose saved model is not in this directory


@dataclass
class PushResult:
    pushed: list[PushItem] = field(default_factory=list)
    skipped: list[PushItem] = field(default_factory=list)
    failed: list[tuple[PushItem, str]] = field(default_factory=list)  # (item, one-line reason)
    stopped: str | None = None  # why the items after the last failure were not tried (the hub is unreachable)


# -- what to push -------------------------------------------------------------------------------------------
def frozen_study_file(store: StudyStore, events: list) -> Path:
    """The study file the latest run of this study directory read (its frozen copy)."""
    rel = store.latest_study_file(events)
    if rel is None:
        raise PushError(f"{store.root} holds no study.yaml: is it a study directory (the folder `sweep run` wrote)? "
                        "Give its path, or the study file with --study")
    return store.location.local_path(rel)


def read_study(path: Path) -> Study:
    """The study file's settings, schema-checked only: naming repositories needs its save_models and name,
    not its models, text and tasks (which may not exist on this machine)."""
    try:
        data = load_yaml_file(path)
        spec = StudySpec.model_validate(data)
    except StudyFileError as err:
        raise PushError(f"cannot read the study file {err.where}: {err.message}") from None
    except ValidationError as err:
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": str(err)}
        where = ".".join(str(p) for p in first["loc"])
        raise PushError(f"{path} is not a valid study file ({where}: {first['msg']}); check it with "
                        f"`sweep validate {path}`") from None
    return Study(spec=spec, source=str(path), base_dir=path.parent)


def trial_spec(study: Study, key: str, fields: TrialFields) -> TrialSpec:
    """The planned trial an event names, rebuilt from its recorded fields: as much of a TrialSpec as naming
    its repository reads (its identity stays empty; nothing here hashes it)."""
    index = next((i for i, m in enumerate(study.spec.models) if m.label == fields.model), 0)
    return TrialSpec(model_index=index, model_label=fields.model, pruner_label=None if fields.dense else fields.pruner,
                     sparsity=None if fields.dense else parse_sparsity(fields.sparsity),
                     calibration=parse_language_choice(fields.calibration) if fields.calibration else None,
                     seed=fields.seed, identity="", key=key)


def read_marker(path: Path) -> PushMarker | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # absent, or not ours to trust: push again
    return PushMarker.from_json(data) if isinstance(data, dict) else None


def _saved_folder(directory: Path, key: str, event: TrialFinished) -> Path | None:
    """The saved model: under this study directory (which may have moved since), else where the worker said."""
    here = directory / "artifacts" / key / "model"
    if (here / CARD).is_file():
        return here
    logged = Path(event.saved_model) if event.saved_model and not is_url(event.saved_model) else None
    return logged if logged is not None and (logged / CARD).is_file() else None


def plan_push(directory: str | Path, study_file: str | Path | None = None, only_key: str | None = None) -> PushPlan:
    """Every finished pruned trial with a saved model, and its repository from the study's
    `save_models.hub_repo` template; raises PushError when there is nothing to push or no way to name it."""
    from sweep.study.trials import hub_repo  # deferred: it loads the engine's trial code (torch)

    if is_url(directory):
        raise PushError(f"sweep push reads a local study directory and {directory} is a URL: run it on a machine "
                        "that has the directory on disk (copy it down, or mount the bucket)")
    directory = Path(directory).expanduser().resolve()
    if not directory.is_dir():
        raise PushError(f"{directory} is not a directory: give the study directory (the folder `sweep run` wrote)")
    store = StudyStore(directory)
    plan = store.read_plan()
    events = store.read_events().events
    source = Path(study_file).expanduser().resolve() if study_file else frozen_study_file(store, events)
    study = read_study(source)
    if plan is not None and plan.study and study.name != plan.study:
        raise PushError(f"{source} is the study {study.name!r} but {directory} holds {plan.study!r}: give the study "
                        "file of this directory")
    if study.spec.save_models.hub_repo is None or not study.spec.save_models.enabled:
        what = "hub_repo is not set" if study.spec.save_models.enabled else "enabled is false"
        raise PushError(f"save_models.{what} in {source}: set save_models: {{enabled: true, hub_repo: "
                        "'me/{model}-{pruner}-{sparsity}-cal-{calibration}-seed{seed}'} in the study file and give "
                        "it with --study FILE")
    planned = {t.key: t for t in plan.trials} if plan is not None else {}
    items, missing = [], []
    for key, event in sorted(store.state(events).finished.items(), key=lambda kv: kv[1].time):
        fields = event.trial or (planned[key].fields if key in planned else None)
        if fields is None or fields.dense or (only_key and not key.startswith(only_key)):
            continue
        folder = _saved_folder(directory, key, event)
        if folder is None:
            if event.saved_model:
                missing.append(event.name or key)
            continue
        # The repository the driver recorded when the trial ran; a study file given with --study (a template
        # set after the run) names it afresh.
        repo = event.hub_repo if event.hub_repo and not study_file else hub_repo(study, trial_spec(study, key, fields))
        marker_path = directory / "artifacts" / key / MARKER
        marker = read_marker(marker_path)
        done = marker if marker is not None and marker.repo == repo and marker.trial_finished_at == event.time else None
        items.append(PushItem(key=key, name=event.name or key, repo=repo, folder=folder, marker_path=marker_path,
                              finished_at=event.time, pushed=done))
    if not items:
        if only_key:
            raise PushError(f"--only-key {only_key} names no finished pruned trial with a saved model in {directory} "
                            "(`sweep status` lists the trials)")
        why = (f"their saved models are not under {directory / 'artifacts'}" if missing else
               "save_models.enabled was off when they ran, or no pruned trial has finished yet")
        raise PushError(f"no saved models to push in {directory}: {why}; set save_models.enabled: true in the "
                        "study file and run it, then push")
    return PushPlan(directory=directory, study_file=source, private=study.spec.save_models.private,
                    items=tuple(items), missing=tuple(missing))


# -- the card as the hub takes it ----------------------------------------------------------------------------
def hub_card(text: str) -> str:
    """The saved card with `base_model` a hub id: a local base's path becomes the hub origin its
    provenance named (`pruning.base_model_hub_id`), or is left out; the hub refuses a path there."""
    from huggingface_hub import ModelCard

    card = ModelCard(text)
    base = card.data.get("base_model")
    if isinstance(base, str) and not HUB_REPO_ID.match(base):
        origin = (card.data.get("pruning") or {}).get("base_model_hub_id")
        if isinstance(origin, str) and HUB_REPO_ID.match(origin):
            card.data.base_model = origin
        else:
            card.data.base_model = None
    return str(card)


# -- pushing -------------------------------------------------------------------------------------------------
def hub_endpoint() -> str:
    """HF_ENDPOINT as set now (huggingface_hub reads it once, when first imported)."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def check_hub_access() -> str:
    """The token sweep push will use; PushError when there is none, or offline mode forbids the hub."""
    from huggingface_hub import constants, get_token

    if constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise PushError("HF_HUB_OFFLINE is set, so the hub cannot be reached: unset it where sweep push runs")
    token = get_token()
    if not token:
        raise PushError("no Hugging Face token: set HF_TOKEN to a token with write access (or run `hf auth login`) "
                        "on the machine that runs sweep push")
    return token


def unreachable(err: BaseException) -> bool:
    """The hub was never reached (a refused connection, DNS, a timeout), as opposed to an HTTP answer."""
    seen: BaseException | None = err
    while seen is not None:
        if getattr(seen, "response", None) is None and any(c.__name__ in NETWORK_ERRORS for c in type(seen).__mro__):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def explain(err: Exception, item: PushItem, endpoint: str) -> str:
    """One line: what went wrong with this upload and what to do."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    if unreachable(err):
        return (f"cannot reach the hub at {endpoint} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                "check the network (or HF_ENDPOINT) and run sweep push again: finished uploads are skipped")
    if status == 401:
        return "the hub refused the token (401): set HF_TOKEN to a valid token with write access"
    if status == 403:
        return f"the token may not create or write {item.repo} (403): use a token with write access to its owner"
    first = str(err).splitlines()[0] if str(err) else ""
    return f"uploading {item.folder} to {item.repo} failed: {type(err).__name__}: {first}"


def upload(item: PushItem, private: bool, api) -> PushMarker:
    """Creates the repository (if new) and uploads the model folder, then the hub-ready card; returns the
    marker to write. Raises what huggingface_hub raises."""
    api.create_repo(item.repo, private=private, exist_ok=True, repo_type="model")
    message = f"pruned model {item.name} (calibration-sweep trial {item.key})"
    if hasattr(api, "upload_large_folder"):
        # huggingface_hub before 2.0: upload_folder is one commit that starts over when interrupted, while
        # upload_large_folder resumes (its progress kept under the folder's .cache/huggingface).
        api.upload_large_folder(repo_id=item.repo, folder_path=str(item.folder), repo_type="model",
                                ignore_patterns=[CARD], private=private)
    else:
        # 2.x has no upload_large_folder: upload_folder itself streams through hf_xet in several commits and
        # resumes when run again (files already committed are skipped).
        api.upload_folder(repo_id=item.repo, folder_path=str(item.folder), repo_type="model",
                          ignore_patterns=[CARD], commit_message=message)
    card = hub_card((item.folder / CARD).read_text(encoding="utf-8"))
    commit = api.upload_file(path_or_fileobj=card.encode("utf-8"), path_in_repo=CARD, repo_id=item.repo,
                             repo_type="model", commit_message=f"model card: {message}")
    return PushMarker(repo=item.repo, revision=getattr(commit, "oid", None), private=private, endpoint=api.endpoint,
                      pushed_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      trial_finished_at=item.finished_at, commit_url=getattr(commit, "commit_url", None))


def write_marker(item: PushItem, marker: PushMarker) -> None:
    try:
        atomic_write_bytes(item.marker_path, (json.dumps(marker.to_json(), indent=1) + "\n").encode(), durable=True)
    except OSError as err:
        raise PushError(f"{item.repo} was uploaded but its marker {item.marker_path} could not be written ({err}); "
                        "free the disk or fix its permissions: the next push uploads it again (nothing changes on "
                        "the hub)", ExitCode.STORE) from None


def push(plan: PushPlan, private: bool, log: Callable[[str], None] = print) -> PushResult:
    """Uploads every item not pushed before, in order; stops at the first upload that cannot reach the hub
    (the others would fail the same way). A failed upload writes no marker. Raises PushError before any
    upload when there is no token, and when a marker cannot be written."""
    from huggingface_hub import HfApi

    token = check_hub_access()
    endpoint = hub_endpoint()
    api = HfApi(endpoint=endpoint, token=token)
    result = PushResult()
    for item in plan.items:
        if item.done:
            result.skipped.append(item)
            continue
        log(f"pushing {item.name}: {item.folder} -> {item.repo} ({'private' if private else 'public'})")
        try:
            marker = upload(item, private, api)
        except Exception as err:  # any failure of the hub or the network: reported, no marker written
            reason = explain(err, item, endpoint)
            result.failed.append((item, reason))
            if unreachable(err):
                result.stopped = reason
                break
            continue
        write_marker(item, marker)
        result.pushed.append(item)
        log(f"  pushed {item.repo} at revision {marker.revision or 'unknown'}")
    return result
