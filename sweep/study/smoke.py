"""`sweep run STUDY --smoke`: the whole path of a study, cheaply, before its real run.

One trial per model (each model is its own actor shape and its own load), with tiny calibration and
evaluation budgets, so that a wrong path, a missing token, a model that does not fit or an lm-eval task
that does not load shows in minutes instead of hours into the sweep. Its budgets change the trials'
keys, so it runs in a directory of its own beside the study directory (`<out>-smoke`) and leaves the
real study directory untouched.
"""
from __future__ import annotations

from dataclasses import replace

from engine.prune.params import PRUNER_PARAMS
from sweep.study.grid import Plan, TrialSpec
from sweep.study.load import Study, study_from_data

CALIBRATION_SAMPLES = 4
SEQ_LEN = 256  # tokens per calibration and evaluation window at most
EVALUATION_TOKENS = 512  # per language
TASK_DOCUMENTS = 4  # per lm-eval task
MASK_SAMPLE_BITS = 4096
ERROR_TOKENS = 256
SNR_TOKENS = 4


def smoke_study(study: Study) -> Study:
    """The same study with every budget cut down; validated again like a study file."""
    data = study.spec.model_dump(mode="json", exclude_none=True)
    cal = data["calibration"]
    cal["samples"] = min(cal["samples"], CALIBRATION_SAMPLES)
    cal["seq_len"] = min(cal["seq_len"], SEQ_LEN)
    cal["seeds"] = cal["seeds"][:1]
    evaluation = data["evaluation"]
    if "perplexity" in evaluation:
        ppl = evaluation["perplexity"]
        ppl["window"] = min(ppl["window"], SEQ_LEN)
        ppl["max_tokens"] = min(ppl.get("max_tokens") or EVALUATION_TOKENS, EVALUATION_TOKENS)
    for task in evaluation.get("tasks", []):
        limit = task.get("limit")
        task["limit"] = TASK_DOCUMENTS if limit is None or isinstance(limit, float) else min(limit, TASK_DOCUMENTS)
    analyses = data.get("analyses", {})
    if "masks" in analyses:
        analyses["masks"]["sample_bits"] = min(analyses["masks"]["sample_bits"], MASK_SAMPLE_BITS)
        analyses["masks"]["error_tokens"] = min(analyses["masks"]["error_tokens"], ERROR_TOKENS)
    if "subspace" in analyses:
        analyses["subspace"]["token_sample"] = min(analyses["subspace"]["token_sample"], SNR_TOKENS)
    data.setdefault("save_models", {})["hub_repo"] = None  # a smoke model is never worth uploading
    smoke = study_from_data(data, source=f"{study.source} (smoke)", base_dir=study.base_dir)
    return replace(smoke, text="")


def _heaviness(trial: TrialSpec, study: Study) -> tuple:
    """Pruned trials with calibration first, the ones that also gather Hessians before them."""
    if trial.is_dense:
        return (2,)
    params = PRUNER_PARAMS[study.spec.pruners[_pruner_index(study, trial)].method]
    return (0 if params.needs_hessian else 1 if params.needs_calibration else 2,)


def _pruner_index(study: Study, trial: TrialSpec) -> int:
    return next(i for i, p in enumerate(study.spec.pruners) if p.label == trial.pruner_label)


def smoke_trials(plan: Plan) -> list[TrialSpec]:
    """One trial per model: its heaviest kind (a Hessian-based pruner with calibration if the study has
    one), so the smoke meets the study's largest memory and every stage of a trial."""
    chosen: dict[str, TrialSpec] = {}
    for trial in plan.trials:
        best = chosen.get(trial.model_label)
        if best is None or _heaviness(trial, plan.study) < _heaviness(best, plan.study):
            chosen[trial.model_label] = trial
    return list(chosen.values())


def smoke_location(location: str) -> str:
    """Where the smoke run of a study directory goes: beside it, `-smoke` appended."""
    return location.rstrip("/") + "-smoke"
