"""How `sweep plan` (and the demo) print a plan: a summary and the trial list, or JSON."""
from __future__ import annotations

from sweep.study.grid import Plan


def plan_as_dict(plan: Plan) -> dict:
    return {
        "study": plan.study.name,
        "total": len(plan.trials),
        "pruned": len(plan.pruned),
        "dense": len(plan.dense),
        "per_model": plan.per_model(),
        "trials": [{"key": t.key, "name": t.name, "dense": t.is_dense} for t in plan.trials],
    }


def format_plan(plan: Plan, show_trials: bool = True) -> str:
    spec = plan.study.spec
    lines = [f"study {spec.name}: {len(plan.trials)} trials = {len(plan.pruned)} pruned + {len(plan.dense)} dense baselines"]
    cal = spec.calibration
    lines.append(
        f"  calibration: {len(plan.study.calibration_mixes)} language choice(s) x {len(cal.seeds)} seed(s), "
        f"{cal.samples} samples x {cal.seq_len} tokens")
    lines.append(f"  evaluation: {len(spec.evaluation.languages)} target language(s): {', '.join(spec.evaluation.languages)}")
    lines.append("  per model:")
    width = max(len(label) for label in plan.per_model())
    for label, counts in plan.per_model().items():
        lines.append(f"    {label:<{width}}  {counts['pruned']:>5} pruned  {counts['dense']:>2} dense  {counts['pruned'] + counts['dense']:>5} total")
    if show_trials:
        lines.append("  trials (key  name):")
        for trial in plan.trials:
            lines.append(f"    {trial.key}  {trial.name}")
    return "\n".join(lines)
