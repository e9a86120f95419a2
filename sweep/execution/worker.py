"""The worker actor: keeps one model loaded and runs the engine's trials on it.

`ModelWorker` is a plain class (the scheduler wraps it with `ray.remote`), so it runs the same in a
test without Ray. Each call answers a `WorkerReply`: ok, the result or the error and its traceback, the
model it holds now, and whether this call loaded it (the driver counts loads).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import shutil
import socket
import tempfile
import time
import traceback
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from engine.io import calibration_cache_dir
from engine.placement import ModelDoesNotFit
from sweep.execution.replies import WorkerReply
from sweep.store.artifacts import publish_directory
from sweep.store.visibility import SentinelCheck, sentinel_problem
from sweep.study.env import quiet_libraries


@dataclass(frozen=True)
class TrialTask:
    model_source: Any  # engine.models.ModelSource
    config: Any  # engine.trial.TrialConfig
    device: str = "auto"  # auto | cpu | cuda
    artifacts: str | None = None  # where this trial's artifacts go: a local directory or an fsspec URL
    log_dir: str | None = None  # library output (progress bars, notices) goes to a file here


FAULTS_ENV = "SWEEP_INJECT_FAULTS"


def injected_fault(name: str, attempt: int) -> str | None:
    """Fault injection for tests and drills: $SWEEP_INJECT_FAULTS is a JSON list of
    {"match": <substring of the trial name>, "kind": "raise"|"exit"|"hang", "attempts": N}; the fault
    fires on attempts 1..N of matching trials."""
    raw = os.environ.get(FAULTS_ENV)
    if not raw:
        return None
    for fault in json.loads(raw):
        if fault["match"] in name and attempt <= int(fault.get("attempts", 1)):
            return fault["kind"]
    return None


def library_versions() -> dict[str, str]:
    out = {}
    for dist in ("calibration-sweep", "torch", "transformers", "datasets", "lm_eval", "ray", "polars", "pyarrow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


class ModelWorker:
    def __init__(self, study_dir_check: SentinelCheck | None = None) -> None:
        self.model_id: str | None = None
        self.loaded = None
        self.study_dir_check = study_dir_check
        self._quiet()

    @staticmethod
    def _quiet() -> None:
        quiet_libraries()

    def info(self) -> dict:
        gpus: list = []
        node = None
        try:
            import ray

            if ray.is_initialized():
                gpus = [str(g) for g in ray.get_gpu_ids()]
                node = ray.get_runtime_context().get_node_id()
        except Exception:  # noqa: BLE001 - info is best effort outside Ray
            pass
        import torch

        cpus = os.environ.get("OMP_NUM_THREADS")
        if cpus and cpus.isdigit():
            torch.set_num_threads(int(cpus))
        # Checked before the first trial, so a node that does not mount the study directory stops the run
        # instead of writing artifacts onto its own disk.
        refusal = sentinel_problem(self.study_dir_check) if self.study_dir_check is not None else None
        return {"node": node, "host": socket.gethostname(), "pid": os.getpid(), "gpus": gpus,
                "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(), "versions": library_versions(),
                "refusal": refusal}

    def load(self, task: TrialTask, model_id: str) -> WorkerReply:
        """Makes this actor hold `model_id` (freeing the model it held first)."""
        started = time.perf_counter()
        reply = WorkerReply()
        try:
            if self.model_id != model_id:
                reply.load = self._load(task.model_source, model_id, self._device(task.device))
                reply.loaded = True
            reply.ok = True
        except Exception as err:  # noqa: BLE001

            fatal = isinstance(err, (DeviceUnavailable, ModelDoesNotFit))
            reply.failed(err, traceback.format_exc(), retryable=not fatal, model_fatal=fatal)
        reply.model = self.model_id
        reply.seconds = time.perf_counter() - started
        return reply

    def run(self, task: TrialTask, model_id: str, attempt: int = 1) -> WorkerReply:
        started = time.perf_counter()
        reply = WorkerReply()
        try:
            fault = injected_fault(task.config.name, attempt)
            if fault == "exit":
                os._exit(17)
            if fault == "hang":
                time.sleep(10**9)
            device = self._device(task.device)
            if self.model_id != model_id:
                reply.load = self._load(task.model_source, model_id, device)
                reply.loaded = True
            if fault == "raise":
                raise RuntimeError(f"injected fault ({FAULTS_ENV}) on attempt {attempt}")
            reply.result = self._run_trial(task, device)
            reply.ok = True
        except Exception as err:  # noqa: BLE001 - every failure goes back to the driver as data
            from engine.trial import TrialFailed

            # A result that is not usable (non-finite perplexity) will not change on a retry.
            reply.failed(err, traceback.format_exc(),
                         retryable=not isinstance(err, (TrialFailed, DeviceUnavailable, ModelDoesNotFit)))
            self._check_dense_weights()
        reply.model = self.model_id
        reply.seconds = time.perf_counter() - started
        return reply

    @staticmethod
    def _device(wanted: str) -> str:
        import torch

        if wanted == "cpu":
            return "cpu"
        if torch.cuda.is_available():
            return "cuda"
        if wanted == "cuda":
            raise DeviceUnavailable("execution.device is cuda but this worker sees no GPU "
                                    f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
        return "cpu"

    def _load(self, source, model_id: str, device: str) -> dict:
        from engine.trial import load

        self._free()
        loaded = load(dataclasses.replace(source, device=device))
        self.loaded, self.model_id = loaded, model_id
        devices = sorted({str(p.device) for p in loaded.model.parameters()})
        return {"seconds": loaded.seconds, "device": device, "devices": devices}

    def _free(self) -> None:
        if self.loaded is None:
            return
        self.loaded, self.model_id = None, None
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _check_dense_weights(self) -> None:
        """After a failure the trial has already restored the dense weights; if even that fails the
        model is dropped, so the next trial reloads it rather than run on half-pruned weights."""
        if self.loaded is None:
            return
        try:
            self.loaded.snapshot.restore()
        except Exception:  # noqa: BLE001
            self._free()

    def _run_trial(self, task: TrialTask, device: str) -> dict:
        from engine.trial import run_trial

        local_artifacts, staging = _artifact_target(task.artifacts)
        cache_dir = task.config.cache_dir or calibration_cache_dir()
        config = dataclasses.replace(task.config, device=device, artifacts_dir=local_artifacts, cache_dir=cache_dir)
        try:
            with _library_output(task.log_dir):
                result = run_trial(config, self.loaded)
            if staging and task.artifacts:
                published = publish_directory(local_artifacts, task.artifacts)
                if "pruning" in result and "masks_path" in result["pruning"]:
                    result["pruning"]["masks_path"] = published.get("masks.safetensors")
                if "pruning" in result and "mask_sample_path" in result["pruning"]:
                    result["pruning"]["mask_sample_path"] = published.get("mask_sample.safetensors")
                if "model_path" in result:
                    result["model_path"] = f"{task.artifacts.rstrip('/')}/model"
                if "statistics_path" in result:
                    result["statistics_path"] = published.get("statistics.safetensors")
        finally:
            if staging:
                shutil.rmtree(local_artifacts, ignore_errors=True)
        return result


class DeviceUnavailable(RuntimeError):
    pass


def _artifact_target(artifacts: str | None) -> tuple[Path | None, bool]:
    """A local directory to write into, and whether it is a staging copy to publish afterwards."""
    if artifacts is None:
        return None, False
    if "://" not in artifacts:
        return Path(artifacts.removeprefix("file://")), False
    return Path(tempfile.mkdtemp(prefix="sweep-artifacts-")), True


@contextlib.contextmanager
def _library_output(log_dir: str | None):
    """lm-eval and datasets draw progress bars on stderr whatever they are told; into a log they go."""
    if log_dir is None:
        yield
        return
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    path = Path(log_dir) / f"worker-{socket.gethostname()}-{os.getpid()}.log"
    with open(path, "a", encoding="utf-8") as log, contextlib.redirect_stderr(log):
        yield
