"""`sweep forget DIR SELECTION`: mark finished (or failed) trials to run again.

Nothing is deleted: one `forgotten` event names the trials, and from then on the study counts them as
not run, so the next `sweep run` runs them, and their new artifacts replace the old. The event is
appended under the driver lock, so it never races a running driver (the only other writer): while one
runs, `sweep forget` refuses (exit 3) and changes nothing.
"""
from __future__ import annotations

import argparse
import fnmatch
import getpass
import os
import socket
import sys

from sweep.exit_codes import ExitCode
from sweep.store.records import Event, PlannedTrial, TrialFailed, TrialFinished, TrialsForgotten
from sweep.store.study_store import StoreLocked, StudyStore
from sweep.study.slices import SliceError, SliceFields, TrialSlice


def slice_fields(trial: PlannedTrial) -> SliceFields:
    return SliceFields(model=trial.model, pruner=trial.pruner, sparsity=trial.sparsity, calibration=trial.calibration,
                       seed=trial.seed)


def select_trials(trials: list[PlannedTrial], selection: str) -> list[PlannedTrial]:
    """The planned trials a selection names: FIELD=VALUE[,...] as `sweep run --only` takes it, else a glob
    on trial names (`'*.wanda.*cal-de*'`) or a key (or its first 8+ characters)."""
    if "=" in selection:
        chosen = TrialSlice.parse(selection).select([slice_fields(t) for t in trials], baselines_follow_model=False)
        return [trials[i] for i in chosen]
    if len(selection) >= 8 and all(c in "0123456789abcdef" for c in selection):
        by_key = [t for t in trials if t.key.startswith(selection)]
        if by_key:
            return by_key
    named = [t for t in trials if fnmatch.fnmatchcase(t.name, selection)]
    if not named:
        raise SliceError(f"{selection!r} matches no trial name or key of the study; names look like "
                         f"{trials[0].name if trials else 'model.pruner.s50.cal-de.seed0'} (`sweep plan STUDY` "
                         "lists them); or select by fields, e.g. model=NAME,calibration=de")
    return named


def forget_trials(store: StudyStore, events: list[Event], keys: list[str], selection: str, reason: str) -> None:
    """Appends one `forgotten` event for `keys` under the driver lock (StoreLocked while a driver runs).
    Each key is forgotten up to its latest finished or failed event in `events`."""
    wanted = set(keys)
    until: dict[str, float] = {}
    for event in events:
        if isinstance(event, (TrialFinished, TrialFailed)) and event.key in wanted:
            until[event.key] = max(until.get(event.key, float("-inf")), event.time)
    store.acquire()
    try:
        store.append(TrialsForgotten(keys=list(keys), until=until, selection=selection, reason=reason,
                                     user=_user(), host=socket.gethostname()))
    finally:
        store.release()


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container's uid without a passwd entry
        return str(os.getuid())


def cmd_forget(args: argparse.Namespace) -> int:
    store = StudyStore(args.directory)
    plan = store.read_plan()
    if plan is None:
        print(f"error: {args.directory} is not a study directory (no plan.json)", file=sys.stderr)
        return ExitCode.INVALID
    try:
        chosen = select_trials(list(plan.trials), args.selection)
    except SliceError as problem:
        print(f"error: {problem}; nothing was changed", file=sys.stderr)
        return ExitCode.INVALID
    events = store.read_events().events
    state = store.state(events)
    ran = [t for t in chosen if state.is_done(t.key) or t.key in state.failed]
    if not ran:
        print(f"{len(chosen)} trial(s) match, none of them finished or failed: nothing to forget")
        return ExitCode.OK
    for trial in ran:
        print(f"  forget  {trial.name}  ({'finished' if state.is_done(trial.key) else 'failed'}, key {trial.key})")
    if args.dry_run:
        print(f"dry run: {len(ran)} trial(s) would run again; nothing was changed")
        return ExitCode.OK
    try:
        forget_trials(store, events, [t.key for t in ran], args.selection, args.reason or "")
    except StoreLocked as locked:
        print(f"error: {locked}. Forget trials between runs (stop the driver first, or after it ends); nothing "
              "was changed", file=sys.stderr)
        return ExitCode.LOCKED
    except OSError as problem:
        print(f"error: cannot write the study directory {store.location.url}: {problem}; nothing was changed",
              file=sys.stderr)
        return ExitCode.STORE
    print(f"{len(ran)} trial(s) will run again on the next `sweep run` of this study directory; their earlier "
          "events stay in the log")
    return ExitCode.OK


def register(subparsers) -> None:
    p = subparsers.add_parser("forget", help="mark finished or failed trials to run again (recorded as an event; "
                                             "nothing is deleted)")
    p.add_argument("directory", help="the study directory")
    p.add_argument("selection", help="FIELD=VALUE[|VALUE][,FIELD=...] over model, pruner, sparsity, calibration, "
                                     "seed (as `sweep run --only`); or a glob on trial names; or a key")
    p.add_argument("--reason", help="why, kept in the event (e.g. 'wrong tokenizer revision')")
    p.add_argument("--dry-run", action="store_true", help="list the trials, change nothing")
    p.set_defaults(func=cmd_forget)
