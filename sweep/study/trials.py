"""From a planned trial (sweep.study.grid.TrialSpec) to what the engine runs (engine.trial.TrialConfig)."""
from __future__ import annotations

import re
from pathlib import Path

from engine.data.local_files import find_language_files
from engine.data.sources import TextSourceConfig
from engine.fingerprint import files_fingerprint
from engine.models import ModelSource
from engine.trial import CalibrationConfig, EvaluationConfig, PerplexityConfig, PruningConfig, TaskConfig, TrialConfig
from sweep.study.grid import TrialSpec
from sweep.study.load import Study
from sweep.study.schema import TextSource


def text_source(study: Study, source: TextSource) -> TextSourceConfig:
    return TextSourceConfig(kind=source.kind, dataset=source.dataset, config=source.config, revision=source.revision,
                            split=source.split, text_field=source.text_field,
                            path=study.resolve(source.path) if source.path else None)


def model_source(study: Study, index: int, device: str = "cpu") -> ModelSource:
    spec = study.spec.models[index]
    name = spec.hub if spec.hub is not None else str(study.model_paths[index])
    return ModelSource(name, spec.revision, spec.dtype, spec.trust_remote_code, device, gpus=max(1, spec.gpus))


def resolved_tasks(study: Study) -> list[TaskConfig]:
    """The study's lm-eval tasks that exist, per target language (the validator resolved them)."""
    spec_tasks = study.spec.evaluation.tasks
    return [TaskConfig(name=r.name, language=r.language, shots=spec_tasks[r.index].shots, limit=spec_tasks[r.index].limit)
            for r in study.tasks]


def evaluation_config(study: Study, tasks: list[TaskConfig] | None = None) -> EvaluationConfig:
    ev = study.spec.evaluation
    perplexity = None
    if ev.perplexity is not None:
        perplexity = PerplexityConfig(text_source(study, ev.perplexity.source), ev.perplexity.window,
                                      ev.perplexity.max_tokens)
    if tasks is None:
        tasks = resolved_tasks(study)
    return EvaluationConfig(languages=tuple(ev.languages), perplexity=perplexity, tasks=tuple(tasks),
                            include_path=study.resolve(ev.include_path) if ev.include_path else None,
                            batch_size=ev.batch_size, task_scorer=ev.task_scorer)


def hub_repo(study: Study, trial: TrialSpec) -> str | None:
    """The hub repository a pruned model uploads to, from the study's template; None when not asked."""
    template = study.spec.save_models.hub_repo
    if not study.spec.save_models.enabled or template is None or trial.is_dense:
        return None
    fields = {"study": study.name, "model": trial.model_label, "pruner": trial.pruner_label,
              "sparsity": trial.sparsity.slug(), "calibration": trial.calibration.slug() if trial.calibration else "none",
              "seed": trial.seed if trial.seed is not None else 0, "name": trial.name, "key": trial.key}
    owner, name = template.format(**fields).split("/", 1)
    return f"{owner}/{re.sub(r'[^A-Za-z0-9._-]+', '-', name)[:96]}"


def trial_config(study: Study, trial: TrialSpec, artifacts_dir: Path | None = None, device: str = "cpu",
                 cache_dir: Path | None = None, evaluation: EvaluationConfig | None = None) -> TrialConfig:
    spec = study.spec
    evaluation = evaluation or evaluation_config(study)
    collect = spec.analyses.lape.enabled or spec.analyses.subspace.enabled
    token_sample = spec.analyses.subspace.token_sample if spec.analyses.subspace.enabled else 0
    masks = spec.analyses.masks
    if trial.is_dense:
        return TrialConfig(key=trial.key, name=trial.name, evaluation=evaluation, artifacts_dir=artifacts_dir,
                           collect_statistics=collect, token_sample=token_sample, device=device, cache_dir=cache_dir,
                       layer_error_tokens=masks.error_tokens if masks.enabled and masks.error_tokens else None,
                       save_model=spec.save_models.enabled)
    pruner = next(p for p in spec.pruners if p.label == trial.pruner_label)
    pruning = PruningConfig(method=pruner.method, sparsity=trial.sparsity.canonical(), params=dict(pruner.params),
                            targets=tuple(pruner.targets) if pruner.targets else None)
    calibration = None
    if trial.calibration is not None:
        cal = spec.calibration
        source = text_source(study, cal.source)
        fingerprint = None
        if source.kind == "local":
            files = [f for code in trial.calibration.codes for f in find_language_files(source.path, code, source.split)]
            fingerprint = files_fingerprint(files, source.path)
        calibration = CalibrationConfig(source=source, weights=trial.calibration.weights, samples=cal.samples,
                                        seq_len=cal.seq_len, seed=trial.seed, source_fingerprint=fingerprint,
                                        sampling=cal.sampling, separator=cal.separator)
    return TrialConfig(key=trial.key, name=trial.name, evaluation=evaluation, pruning=pruning, calibration=calibration,
                       artifacts_dir=artifacts_dir, save_masks=masks.enabled and masks.save_masks,
                       mask_sample=masks.sample_bits if masks.enabled and not masks.save_masks else None,
                       collect_statistics=collect, token_sample=token_sample, device=device, cache_dir=cache_dir,
                       layer_error_tokens=masks.error_tokens if masks.enabled and masks.error_tokens else None,
                       save_model=spec.save_models.enabled)
