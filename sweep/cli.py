"""`sweep`: validate, plan and (as later issues land) run and report studies."""
from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from sweep.grid import Plan, expand
from sweep.problems import StudyInvalid
from sweep.study import Study, load_study

EXIT_OK = 0
EXIT_INVALID = 2


def _load(path: str) -> Study:
    from sweep.env import apply_default_env

    apply_default_env()
    return load_study(Path(path))


def _report_invalid(err: StudyInvalid) -> int:
    n = len(err.problems)
    print(f"{err.source}: invalid study file ({n} problem{'s' if n != 1 else ''}); nothing was started or written", file=sys.stderr)
    for problem in err.problems:
        print(f"  {problem}", file=sys.stderr)
    return EXIT_INVALID


def _print_warnings(study: Study) -> None:
    for warning in study.warnings:
        print(f"warning: {warning}", file=sys.stderr)


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        study = _load(args.study)
        plan = expand(study)
    except StudyInvalid as err:
        return _report_invalid(err)
    _print_warnings(study)
    print(f"{args.study}: valid study '{study.name}': {len(plan.trials)} trials "
          f"({len(plan.pruned)} pruned + {len(plan.dense)} dense baselines) over {len(study.spec.models)} model(s)")
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    try:
        study = _load(args.study)
        plan = expand(study)
    except StudyInvalid as err:
        return _report_invalid(err)
    _print_warnings(study)
    if args.json:
        print(json.dumps(plan_as_dict(plan), indent=2))
    else:
        print(format_plan(plan, show_trials=not args.summary))
    return EXIT_OK


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


def cmd_demo(args: argparse.Namespace) -> int:
    from sweep.demo import run_demo

    return run_demo(force_assets=args.rebuild_assets, report_dir=Path(args.report_dir))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sweep", description="Calibration-language pruning studies on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a study file; exit 2 listing every problem")
    p.add_argument("study")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("plan", help="print the study's trials: counts per model, dense baselines, keys and names")
    p.add_argument("study")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--summary", action="store_true", help="counts only, no trial list")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("demo", help="build the offline demo assets and run the demo study")
    p.add_argument("--rebuild-assets", action="store_true")
    p.add_argument("--report-dir", default="reports/demo")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `sweep plan ... | head` ends quietly
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
