"""`sweep`: validate, plan and (as later issues land) run and report studies."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

from sweep.cli.export import register as register_export
from sweep.cli.forget import forget_trials
from sweep.cli.forget import register as register_forget
from sweep.cli.format import format_plan, plan_as_dict
from sweep.cli.push import register as register_push
from sweep.cli.status import register as register_status
from sweep.execution.driver import RunOptions, print_warnings, run_plan
from sweep.execution.prefetch_nodes import prefetch_each_node
from sweep.exit_codes import ExitCode
from sweep.plan.estimate import format_estimates, format_time_estimates, study_estimates, study_time_estimates
from sweep.plan.prefetch.caches import OFFLINE_ENV, cache_env, cache_problems
from sweep.plan.prefetch.items import plan_prefetch
from sweep.plan.prefetch.models import offline_gaps
from sweep.plan.prefetch.results import format_item, format_summary
from sweep.plan.prefetch.run import run_prefetch
from sweep.store.records import ModelLoaded
from sweep.store.study_store import StoreLocked, StudyStore
from sweep.study.env import apply_default_env
from sweep.study.grid import Plan, expand
from sweep.study.load import Study, load_study
from sweep.study.problems import StudyInvalid
from sweep.study.slices import SliceError, TrialSlice
from sweep.study.smoke import smoke_location, smoke_study, smoke_trials


def _load(path: str) -> Study:
    apply_default_env()
    return load_study(Path(path))


def report_invalid(err: StudyInvalid, stream=None) -> int:
    print(err.describe(), file=stream or sys.stderr)
    return ExitCode.INVALID


def _checked_study(path: str) -> tuple[Study, Plan] | int:
    """The study and its plan, its warnings printed; or the exit code after printing its problems."""
    try:
        study = _load(path)
        plan = expand(study)
    except StudyInvalid as err:
        return report_invalid(err)
    print_warnings(study)
    return study, plan


def cmd_validate(args: argparse.Namespace) -> int:
    checked = _checked_study(args.study)
    if isinstance(checked, int):
        return checked
    study, plan = checked
    print(f"{args.study}: valid study '{study.name}': {len(plan.trials)} trials "
          f"({len(plan.pruned)} pruned + {len(plan.dense)} dense baselines) over {len(study.spec.models)} model(s)")
    return ExitCode.OK


def cmd_plan(args: argparse.Namespace) -> int:
    if args.tasks and not args.estimate:
        print("error: --tasks counts the lm-eval tasks' work into --estimate; give both", file=sys.stderr)
        return ExitCode.INVALID
    if args.estimate and (args.gpu_tflops <= 0 or args.gpu_memory_gib <= 0):
        print("error: --gpu-tflops and --gpu-memory-gib must be positive (one GPU's bf16 peak and memory)",
              file=sys.stderr)
        return ExitCode.INVALID
    checked = _checked_study(args.study)
    if isinstance(checked, int):
        return checked
    study, plan = checked
    if args.json:
        print(json.dumps(plan_as_dict(plan), indent=2))
    else:
        print(format_plan(plan, show_trials=not args.summary and not args.estimate))
    if args.estimate:
        try:
            table, problems = format_estimates(study_estimates(study), args.gpu_memory_gib)
            times = format_time_estimates(
                study_time_estimates(study, plan.trials, args.gpu_tflops, count_tasks=args.tasks), args.gpu_tflops)
        except RuntimeError as err:
            print(f"error: {err}", file=sys.stderr)
            return ExitCode.INVALID
        print(table)
        print(times)
        for problem in problems:
            print(f"warning: {problem}", file=sys.stderr)
    return ExitCode.OK


def cmd_demo(args: argparse.Namespace) -> int:
    from sweep.cli.demo import run_demo  # deferred: the report's polars and matplotlib

    return run_demo(force_assets=args.rebuild_assets, report_dir=Path(args.report_dir) if args.report_dir else None,
                    tiny=args.tiny)


def cmd_run(args: argparse.Namespace) -> int:
    _apply_cache_env(args.cache_dir)  # before any Hugging Face library reads its environment
    if args.offline:
        os.environ.update(OFFLINE_ENV)  # HF_* and TRANSFORMERS_* reach every worker (sweep.execution.ray_runtime)
    checked = _checked_study(args.study)
    if isinstance(checked, int):
        return checked
    study, plan = checked
    if args.offline:
        _warn_offline_gaps(study, args.study)
    try:
        only = TrialSlice.parse(args.only) if args.only else None
    except SliceError as problem:
        print(f"error: --only: {problem}. Nothing was run.", file=sys.stderr)
        return ExitCode.INVALID
    options = RunOptions(out=args.out, address=args.address, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                         max_actors=args.max_actors, retry_failed=args.retry_failed, progress=not args.no_progress,
                         only=only, shared_dir=args.shared_dir)
    if args.smoke:
        return _run_smoke(study, plan, options, args.study)
    return run_plan(plan, options).code


def _run_smoke(study: Study, plan: Plan, options: RunOptions, study_path: str) -> int:
    """`sweep run --smoke`: one cheap trial per model into `<study directory>-smoke`, then what it measured."""
    try:
        smoke = smoke_study(study)
        smoke_plan = expand(smoke)
        pool = smoke_plan
        if options.only is not None:
            chosen = options.only.select([t.slice_fields() for t in smoke_plan.trials])
            pool = Plan(study=smoke, trials=tuple(smoke_plan.trials[i] for i in chosen))
    except StudyInvalid as err:
        return report_invalid(err)
    except SliceError as problem:
        print(f"error: --only: {problem}. Nothing was run.", file=sys.stderr)
        return ExitCode.INVALID
    trials = smoke_trials(pool)
    where = smoke_location(str(options.out or study.output_location))
    print(f"smoke run of {study.name}: {len(trials)} trial(s), one per model, with tiny budgets, into {where} (the "
          f"study directory {options.out or study.output_location} is not touched)")
    code = _forget_earlier_smoke(where, [t.key for t in trials])
    if code != ExitCode.OK:
        return code
    # Every smoke runs afresh (a smoke that passed last week says nothing of today's nodes and code).
    outcome = run_plan(Plan(study=smoke, trials=tuple(trials)), replace(options, out=where, only=None,
                                                                        retry_failed=True))
    if outcome.code in (ExitCode.INVALID, ExitCode.LOCKED):
        return outcome.code  # refused before anything ran: its own message says why
    for line in smoke_timings(StudyStore(where)):
        print(line)
    if outcome.code == ExitCode.OK:
        rest = f" --out {options.out}" if options.out else ""
        print(f"smoke passed; the real run: sweep run {study_path}{rest}")
    else:
        print(f"smoke failed: `sweep status {where} --failures` shows why; the real run would meet the same",
              file=sys.stderr)
    return outcome.code


def _forget_earlier_smoke(where: str, keys: list[str]) -> int:
    """An earlier smoke run's trials in `where` are forgotten (an event; their history stays)."""
    try:
        store = StudyStore(where)
    except ValueError as problem:
        print(f"error: --out: {problem}", file=sys.stderr)
        return ExitCode.INVALID
    if store.read_plan() is None:
        return ExitCode.OK
    events = store.read_events().events
    state = store.state(events)
    ran = [k for k in keys if state.is_done(k) or k in state.failed]
    if not ran:
        return ExitCode.OK
    try:
        forget_trials(store, events, ran, "--smoke", "a new smoke run")
    except StoreLocked as locked:
        print(f"error: {locked}", file=sys.stderr)
        return ExitCode.LOCKED
    return ExitCode.OK


def smoke_timings(store: StudyStore) -> list[str]:
    """What the smoke run measured, per trial: its stages and the model's load."""
    events = store.read_events().events
    loads = {e.model: e.seconds for e in events if isinstance(e, ModelLoaded)}
    lines = []
    for event in sorted(store.state(events).finished.values(), key=lambda e: e.name):
        stages = ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in (event.timings or {}).items()
                           if isinstance(seconds, (int, float)))
        load = loads.get(event.model)
        lines.append(f"  {event.name}: {event.seconds:.1f} s ({stages})"
                     + (f"; model load {load:.1f} s" if load is not None else ""))
    return lines


def _apply_cache_env(cache_dir: str | None) -> None:
    if cache_dir:
        os.environ.update(cache_env(cache_dir))


def _warn_offline_gaps(study: Study, study_path: str) -> None:
    """`sweep run --offline`: hub models this machine's cache cannot serve (workers elsewhere may have them)."""
    for gap in offline_gaps(study):
        print(f"warning: --offline: {gap}; `sweep prefetch {study_path}` fetches it (on every node: --each-node)",
              file=sys.stderr)


def cmd_prefetch(args: argparse.Namespace) -> int:
    _apply_cache_env(args.cache_dir)  # before any Hugging Face library reads its environment
    checked = _checked_study(args.study)
    if isinstance(checked, int):
        return checked
    study, plan = checked
    if args.each_node and not args.address:
        print("error: --each-node: no Ray cluster to run on; give --address or set RAY_ADDRESS (without "
              "--each-node the prefetch runs here, into this machine's or a shared cache); nothing was fetched",
              file=sys.stderr)
        return ExitCode.INVALID
    work = plan_prefetch(study, plan, out=args.out)
    if not args.each_node:  # on --each-node every node checks its own caches
        problems = cache_problems(work)
        if problems:
            for what, problem in problems:
                print(f"error: {'--cache-dir' if args.cache_dir else what}: cannot write {problem}", file=sys.stderr)
            print("nothing was fetched or written", file=sys.stderr)
            return ExitCode.INVALID
    progress = sys.stderr if args.json else sys.stdout
    print(f"prefetch {study.name}: {len(work.models)} model(s), {len(work.calibration)} calibration set(s), "
          f"{len(work.evaluation)} evaluation text(s), {len(work.tasks)} lm-eval task(s)"
          + ("; dry run: nothing is fetched or written" if args.dry_run else ""), file=progress, flush=True)
    if args.each_node:
        results = prefetch_each_node(work, args.address, dry_run=args.dry_run,
                                     on_node=lambda node: print(node.describe(), file=progress, flush=True))
    else:
        results = [run_prefetch(work, dry_run=args.dry_run,
                                on_item=lambda item: print(format_item(item), file=progress, flush=True))]
    ok = all(node.ok for node in results)
    if args.json:
        print(json.dumps({"study": study.name, "dry_run": args.dry_run, "ok": ok,
                          "nodes": [node.as_dict() for node in results]}, indent=2, default=str))
    elif not args.each_node:
        print(format_summary(results[0]))
    failures = [(node, item) for node in results for item in node.failures]
    if failures or any(node.error for node in results):
        print(f"{len(failures) + sum(1 for n in results if n.error)} failure(s):", file=sys.stderr)
        for node in results:
            where = f"{node.host}: " if args.each_node else ""
            if node.error:
                print(f"  error: {where}node task failed: {node.error}", file=sys.stderr)
            for item in node.failures:
                print(f"  error: {where}{item.error}", file=sys.stderr)
    elif not args.dry_run and not args.json:
        flags = "".join(f" {flag} {value}" for flag, value in (("--out", args.out), ("--cache-dir", args.cache_dir))
                        if value)
        print(f"ready: sweep run {args.study}{flags} --offline")
    return ExitCode.OK if ok else ExitCode.FAILED_TRIALS


def cmd_report(args: argparse.Namespace) -> int:
    from sweep.results.report import ReportError, build_report  # deferred: polars and matplotlib

    try:
        plan = StudyStore(args.directory).read_plan()
        if plan is None:
            raise ReportError(f"{args.directory} is not a study directory (no plan.json); `sweep run STUDY --out "
                              f"{args.directory}` makes one")
        out = Path(args.out or Path("reports") / plan.study)
        path = build_report(args.directory, out)
    except (ReportError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return ExitCode.INVALID
    print(f"report: {path}")
    return ExitCode.OK


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
    p.add_argument("--estimate", action="store_true", help="parameters and GPU memory per worker actor")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU, for --estimate")
    p.add_argument("--tasks", action="store_true",
                   help="with --estimate: count each model's lm-eval task work per trial from lm-eval's own requests "
                        "(reads the tasks' data and the tokenizers: local, cached by `sweep prefetch`, or the hub)")
    p.add_argument("--gpu-tflops", type=float, default=989.0,
                   help="one GPU's dense bf16 peak in TFLOP/s, for --estimate (989: H100 SXM; A100 312, L40S 362)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("run", help="run what is left of a study on Ray (embedded, or a cluster with --address)")
    p.add_argument("study")
    p.add_argument("--out", help="study directory (a folder or s3://, gs:// URL); default: execution.output_dir")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS") or None,
                   help="Ray cluster to join (default $RAY_ADDRESS); without it an embedded Ray starts")
    p.add_argument("--num-cpus", type=int, help="embedded Ray: CPUs to offer (default: all)")
    p.add_argument("--num-gpus", type=int, help="embedded Ray: GPUs to offer (default: those detected)")
    p.add_argument("--max-actors", type=int, help="at most this many worker actors (overrides execution.max_actors)")
    p.add_argument("--retry-failed", action="store_true", help="run again the trials that failed in earlier runs")
    p.add_argument("--no-progress", action="store_true", help="no live progress bar")
    p.add_argument("--offline", action="store_true",
                   help="no hub access: HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 here and on every worker "
                        "(after `sweep prefetch`)")
    p.add_argument("--cache-dir", help="the caches `sweep prefetch --cache-dir` filled (sets HF_HUB_CACHE, "
                                       "HF_DATASETS_CACHE, SWEEP_CACHE_DIR under it, here and on the workers)")
    p.add_argument("--only", metavar="FIELD=VALUE[,...]",
                   help="run a slice: e.g. 'model=llama3-8b,pruner=wanda,calibration=de|en' (quoted) (fields: model, pruner, "
                        "sparsity, calibration, seed; '|' between alternatives). Its trials keep their keys, so the "
                        "full run reuses them; the dense baselines of its models are always included")
    p.add_argument("--smoke", action="store_true",
                   help="first, cheaply: one trial per model with tiny calibration and evaluation budgets, into "
                        "<study directory>-smoke; prints what each stage took")
    p.add_argument("--shared-dir", action="store_true",
                   help="with --address and a local --out: every node mounts this directory at the same path (a "
                        "local path on a cluster is refused without it; each worker checks that it sees it)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("prefetch", help="fetch models, calibration windows, evaluation text and lm-eval data "
                                        "into the caches the trials read, before the sweep")
    p.add_argument("study")
    p.add_argument("--out", help="the study directory `sweep run` will use (its cache/ holds the calibration "
                                 "windows); default: execution.output_dir")
    p.add_argument("--cache-dir", help="put the hub, datasets and sweep caches under this folder (sets "
                                       "HF_HUB_CACHE, HF_DATASETS_CACHE, SWEEP_CACHE_DIR); give `sweep run` the same")
    p.add_argument("--each-node", action="store_true",
                   help="prefetch on every alive node of the Ray cluster (--address / $RAY_ADDRESS) into its "
                        "own caches; without it, here (a shared file system cache serves every node)")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS") or None,
                   help="Ray cluster for --each-node (default $RAY_ADDRESS)")
    p.add_argument("--dry-run", action="store_true", help="list what would be fetched or built; no network")
    p.add_argument("--json", action="store_true", help="machine-readable result on stdout (progress on stderr)")
    p.set_defaults(func=cmd_prefetch)

    register_forget(sub)
    register_push(sub)
    register_export(sub)

    register_status(sub)

    p = sub.add_parser("report", help="tables, heat maps and findings of a study directory -> reports/<study>/")
    p.add_argument("directory")
    p.add_argument("--out", help="where to write the report (default reports/<study>)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="build the offline assets and run the demo study (Gemma 3 270M; --tiny: the "
                                    "small models trained here)")
    p.add_argument("--tiny", action="store_true", help="the two small demo models over the whole demo grid")
    p.add_argument("--rebuild-assets", action="store_true")
    p.add_argument("--report-dir", default=None, help="default reports/demo (reports/demo-tiny with --tiny)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `sweep plan ... | head` ends quietly
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
