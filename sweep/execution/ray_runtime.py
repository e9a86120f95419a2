"""Joining a Ray cluster, or starting an embedded one for this driver alone."""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass

from sweep.study.load import Study
from sweep.study.problems import Problem

# Passed on to every worker actor, so workers see what the driver was told (offline mode, demo assets,
# caches, fault drills) whichever node they land on.
FORWARDED_ENV_PREFIXES = ("SWEEP_", "HF_", "TRANSFORMERS_", "HUGGINGFACE_")


@dataclass(frozen=True)
class RayTarget:
    address: str | None  # None: start an embedded local Ray
    num_cpus: int | None = None  # embedded only
    num_gpus: int | None = None  # embedded only; logical GPUs are enough for testing the scheduler


def start_ray(target: RayTarget) -> str:
    """Connects this driver to Ray; returns a line saying where it runs."""
    import ray

    common = {"include_dashboard": False, "log_to_driver": False, "namespace": "calibration-sweep",
              "configure_logging": True, "logging_level": "warning"}
    if target.address:
        ray.init(address=target.address, **{k: v for k, v in common.items() if k != "include_dashboard"})
        return f"joined the Ray cluster at {target.address}"
    global _embedded_temp_dir
    temp_dir = tempfile.mkdtemp(prefix="sweep-ray-")  # its own sockets and logs: no clash with other clusters
    _embedded_temp_dir = temp_dir
    ray.init(num_cpus=target.num_cpus, num_gpus=target.num_gpus, _temp_dir=temp_dir, **common)
    resources = ray.cluster_resources()
    return (f"started an embedded Ray ({resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs; "
            f"logs under {temp_dir})")


def worker_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}


_embedded_temp_dir: str | None = None


def stop_ray(keep_logs: bool = False) -> str | None:
    """Disconnects (and stops an embedded Ray). The embedded Ray's folder goes too unless `keep_logs`;
    returns the folder kept, if any."""
    global _embedded_temp_dir
    import ray

    if ray.is_initialized():
        ray.shutdown()
    folder, _embedded_temp_dir = _embedded_temp_dir, None
    if folder is None or keep_logs:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    return None


def known_accelerator_types() -> set[str]:
    """The accelerator types Ray detects and advertises as `accelerator_type:<name>` resources."""
    try:
        from ray.util.accelerators import accelerators
    except ImportError:  # validation without Ray installed: accept anything
        return set()
    return {v for k, v in vars(accelerators).items() if k.isupper() and isinstance(v, str)}


def accelerator_warnings(study: Study) -> list[Problem]:
    """A model's accelerator_type that Ray does not detect by itself: legal (a node can be started with
    any resource), but most often a typo, and then its actors never start."""
    known = known_accelerator_types()
    warnings = []
    for i, model in enumerate(study.spec.models):
        if model.accelerator_type is not None and model.gpus > 0 and known and model.accelerator_type not in known:
            warnings.append(Problem(
                f"models[{i}].accelerator_type",
                f"{model.accelerator_type!r} is not an accelerator type Ray detects by itself (e.g. "
                f"{', '.join(sorted(known)[:8])}, ...); its actors will only start on nodes started with that "
                "resource (accelerator_type:NAME)"))
    return warnings
