"""`sweep push DIR`: upload a study directory's saved pruned models to the hub (sweep.share.push).

Runs beside a running sweep or after it, on any machine that has the study directory on disk and a token
(HF_TOKEN); never on the GPU actors. A second push skips what the first pushed (artifacts/<key>/pushed.json).
"""
from __future__ import annotations

import argparse
import sys

from sweep.exit_codes import ExitCode
from sweep.share.push import PushError, PushPlan, plan_push, push


def register(subparsers) -> None:
    """Adds `push` to the `sweep` command's sub-commands."""
    p = subparsers.add_parser(
        "push", help="upload the saved pruned models of a study directory to the hub (save_models.hub_repo); "
                     "a second push skips what is done")
    p.add_argument("directory", help="the study directory (local; the folder `sweep run` wrote)")
    p.add_argument("--dry-run", action="store_true", help="list what would be uploaded where; touch nothing")
    visibility = p.add_mutually_exclusive_group()
    visibility.add_argument("--private", dest="private", action="store_const", const=True, default=None,
                            help="create new repositories private (default: the study's save_models.private)")
    visibility.add_argument("--public", dest="private", action="store_const", const=False,
                            help="create new repositories public")
    p.add_argument("--only-key", metavar="KEY", help="push only the trial with this key (or key prefix)")
    p.add_argument("--study", metavar="FILE",
                   help="read save_models (hub_repo, private) from this study file instead of the newest version "
                        "the study directory keeps")
    p.set_defaults(func=cmd_push)


def _describe(plan: PushPlan, private: bool) -> None:
    for item in plan.items:
        if item.done:
            print(f"  skip  {item.name} -> {item.repo}: pushed {item.pushed.pushed_at} "
                  f"(revision {item.pushed.revision or 'unknown'})")
        else:
            print(f"  push  {item.name}: {item.folder} -> {item.repo} ({'private' if private else 'public'})")
    for name in plan.missing:
        print(f"  note: {name} finished with a saved model that is not in this directory; not pushed")


def cmd_push(args: argparse.Namespace) -> int:
    try:
        plan = plan_push(args.directory, study_file=args.study, only_key=args.only_key)
    except PushError as problem:
        print(f"error: {problem}", file=sys.stderr)
        return problem.code
    private = plan.private if args.private is None else args.private
    todo = [item for item in plan.items if not item.done]
    print(f"{plan.directory}: {len(plan.items)} saved model(s), {len(todo)} to push, "
          f"{len(plan.items) - len(todo)} pushed before (repositories from {plan.study_file})")
    if args.dry_run:
        _describe(plan, private)
        print(f"dry run: {len(todo)} model(s) would be uploaded; nothing was sent or written")
        return ExitCode.OK
    if not todo:
        _describe(plan, private)
        print("nothing to push")
        return ExitCode.OK
    try:
        result = push(plan, private)
    except PushError as problem:
        print(f"error: {problem}", file=sys.stderr)
        return problem.code
    for item, reason in result.failed:
        print(f"error: {item.name}: {reason}", file=sys.stderr)
    left = len(todo) - len(result.pushed) - len(result.failed)
    print(f"pushed {len(result.pushed)}, skipped {len(result.skipped)} pushed before, failed {len(result.failed)}"
          + (f", not tried {left} (the hub is unreachable)" if result.stopped else ""))
    return ExitCode.FAILED_TRIALS if result.failed else ExitCode.OK
