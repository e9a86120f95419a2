"""Before any actor is placed: does each model fit the GPUs its actors will get?

Only answerable for models with an `accelerator_type` (Ray counts GPUs, not their memory): the type
names the GPU, the table below its memory, and engine.placement makes the same block split the worker
will make, on a weightless copy built from the model's config. A model that cannot fit is reported
before `sweep run` starts anything; the worker repeats the check against the memory it actually sees.
"""
from __future__ import annotations

from engine.placement import ModelDoesNotFit, gpu_device_map
from sweep.study.load import Study
from sweep.study.problems import Problem

GIB = 2**30
# Memory a process sees on one GPU of each Ray accelerator type (torch's total_memory), in GiB.
GPU_MEMORY_GIB = {
    "H100": 79.6, "H200": 139.8, "H20": 95.0, "B200": 178.4, "GB200": 184.0, "A100-80G": 79.2,
    "A100-40G": 39.4, "A100": 39.4, "A10G": 22.1, "L4": 22.0, "L40S": 44.4, "V100": 15.8, "T4": 14.6,
}


def check_model_fit(study: Study) -> tuple[list[Problem], list[Problem]]:
    """(problems, notes): a problem is a model that cannot fit its GPUs; a note says why a model was not
    checked (no accelerator_type, an unknown type, an unreadable config)."""
    from transformers import AutoConfig

    from engine.models import DTYPES

    problems, notes = [], []
    for i, model in enumerate(study.spec.models):
        where = f"models[{i}]"
        if model.gpus == 0 or model.accelerator_type is None:
            continue
        memory = GPU_MEMORY_GIB.get(model.accelerator_type)
        if memory is None:
            notes.append(Problem(f"{where}.accelerator_type", f"memory of a {model.accelerator_type} GPU unknown here; "
                                    "the fit is checked on the worker"))
            continue
        name = model.hub if model.hub is not None else str(study.model_paths[i])
        try:
            config = AutoConfig.from_pretrained(name, revision=model.revision, trust_remote_code=model.trust_remote_code)
        except Exception as err:  # noqa: BLE001 - offline, gated: the worker checks again
            notes.append(Problem(where, f"{name}: config not readable here ({type(err).__name__}); the fit is "
                                    "checked on the worker"))
            continue
        try:
            gpu_device_map(config, DTYPES[model.dtype], [int(memory * GIB)] * model.gpus, model.trust_remote_code,
                           label=f"{model.label} on {model.gpus} x {model.accelerator_type} ({memory:g} GiB)")
        except ModelDoesNotFit as err:
            problems.append(Problem(f"{where}.gpus", str(err)))
    return problems, notes
