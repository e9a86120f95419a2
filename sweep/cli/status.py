"""`sweep status DIR [--json] [--watch [--every SECONDS]]`: a study directory's progress, once or redrawn.

The summary itself is sweep/results/status.py's (from the event logs alone). This module adds what the
results layer may not read: the frozen study file, loaded and sized by `sweep plan --estimate`
(sweep/plan/estimate.py) to seed each model's seconds per trial before any of its trials finished; and
the terminal: plain text, JSON, a live `rich` table on a terminal or repeated summaries on a pipe.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from sweep.exit_codes import ExitCode
from sweep.plan.estimate import study_time_estimates
from sweep.results.progress import ModelEta, Seed, format_duration, format_summary
from sweep.results.status import (
    StudyStatus,
    describe_rate,
    describe_slice,
    describe_state,
    describe_study_eta,
    format_status,
    not_a_study_directory,
    read_status,
    seconds_text,
    status_json,
)
from sweep.store.records import Event
from sweep.store.study_store import StudyStore
from sweep.study.env import apply_default_env
from sweep.study.grid import TrialSpec, expand
from sweep.study.load import Study, load_study
from sweep.study.problems import StudyInvalid

DEFAULT_WATCH_S = 10.0
DEFAULT_GPU_TFLOPS = 989.0  # as `sweep plan --estimate`: one H100 SXM's dense bf16 peak
ROWS = 20  # running trials and failures shown in the live table (the rest are counted)


# -- seeds: `sweep plan --estimate`'s seconds per trial, from the frozen study file --------------------------
def _first_line(err: BaseException) -> str:
    if isinstance(err, StudyInvalid) and err.problems:  # its first problem, not the file's name again
        more = len(err.problems) - 1
        return f"{err.problems[0]}"[:200] + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"


def _config_dir(study: Study, index: int) -> Path | str:
    """The folder with model `index`'s config.json, read without the network; or why there is none."""
    model = study.spec.models[index]
    if model.path is not None:
        return Path(study.model_paths[index])
    from huggingface_hub import try_to_load_from_cache  # deferred: its HTTP stack

    cached = try_to_load_from_cache(model.hub, "config.json", revision=model.revision)
    if not isinstance(cached, str):  # `status` never waits on the hub: only what `sweep prefetch` cached
        return f"config.json of {model.hub} is not in this machine's hub cache (`sweep prefetch` caches it)"
    return Path(cached).parent


def _one_model(study: Study, index: int, config_dir: Path) -> Study:
    """The study as if model `index` (read from `config_dir`) were its only model, so one model's
    unreadable config costs that model its estimate, not the others theirs."""
    model = study.spec.models[index]
    if model.hub is not None:  # its cached config, read as a local model's: no hub call
        model = model.model_copy(update={"hub": None, "path": str(config_dir)})
    spec = study.spec.model_copy(update={"models": [model]})
    return replace(study, spec=spec, model_paths={0: config_dir})


def model_seed(study: Study, index: int, trials: tuple[TrialSpec, ...], gpu_tflops: float) -> Seed:
    """Seconds per trial of model `index` as `sweep plan --estimate` puts them, averaged over its planned
    trials (dense and each method, weighted by their counts); or None with why not."""
    model = study.spec.models[index]
    if not model.gpus:
        return Seed(None, "runs on CPU: the estimate's GPU rates do not apply")
    config_dir = _config_dir(study, index)
    if isinstance(config_dir, str):
        return Seed(None, config_dir)
    mine = [replace(t, model_index=0) for t in trials if t.model_index == index]
    try:
        [estimate] = study_time_estimates(_one_model(study, index, config_dir), mine, gpu_tflops)
    except Exception as err:  # noqa: BLE001 - a seed is a nicety: any failure leaves this model's rate unknown
        return Seed(None, f"no estimate ({_first_line(err)})")
    count = sum(estimate.trials.values())
    if not count:
        return Seed(None, "no trials planned")
    seconds = sum(n * estimate.seconds[method] for method, n in estimate.trials.items()) / count
    left_out = ["model loads"] + (["lm-eval tasks"] if study.tasks else []) + (
        [] if estimate.evaluation_known else ["evaluation"])
    return Seed(seconds, f"`sweep plan --estimate` at {gpu_tflops:g} TFLOP/s, without {', '.join(left_out)}")


def study_seeds(study: Study, gpu_tflops: float) -> dict[str, Seed]:
    trials = expand(study).trials
    return {model.label: model_seed(study, i, trials, gpu_tflops) for i, model in enumerate(study.spec.models)}


@dataclass
class StudySeeds:
    """The seeds of a study directory's models (a `SeedSource`), read once per frozen study file: a watch
    redraws every few seconds, and loading and sizing the study takes a fraction of one."""

    store: StudyStore
    gpu_tflops: float = DEFAULT_GPU_TFLOPS
    _cache: dict[str, dict[str, Seed]] = field(default_factory=dict)

    def __call__(self, events: list[Event]) -> Mapping[str, Seed]:
        rel = self.store.latest_study_file(events)
        key = rel or ""
        if key not in self._cache:
            self._cache[key] = self._load(rel)
        return self._cache[key]

    def _load(self, rel: str | None) -> dict[str, Seed]:
        if rel is None:
            return self._unknown("no frozen study file in the study directory")
        apply_default_env()  # the ${SWEEP_*_DIR} a study file may name
        try:
            if self.store.is_local:
                return study_seeds(load_study(self.store.ref(rel)), self.gpu_tflops)
            with tempfile.TemporaryDirectory(prefix="sweep-status-") as folder:
                path = Path(folder) / "study.yaml"
                path.write_bytes(self.store.location.read_bytes(rel) or b"")
                return study_seeds(load_study(path), self.gpu_tflops)
        except Exception as err:  # noqa: BLE001 - e.g. its model paths are not on this machine: no seeds, no crash
            return self._unknown(f"{rel} does not load here ({_first_line(err)})")

    def _unknown(self, why: str) -> dict[str, Seed]:
        plan = self.store.read_plan()
        return {t.model: Seed(None, why) for t in (plan.trials if plan else ())}


# -- drawing ----------------------------------------------------------------------------------------------
def _clock(when: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(when))


def _rate_cell(m: ModelEta) -> str:
    return "?" if m.rate.seconds is None else seconds_text(m.rate.seconds)


def live_view(status: StudyStatus, every_s: float):
    """The live table of `--watch` on a terminal: per-model rows, running trials, recent failures."""
    from rich.console import Group  # deferred: only a watch on a terminal draws with rich
    from rich.table import Table
    from rich.text import Text

    progress, summary = status.progress, status.progress.summary
    head = Text(f"study {status.study} in {status.directory}: {describe_state(status.driver)}; "
                f"{progress.runs} driver run(s)\n{format_summary(summary, with_actors=False)}\n"
                + (f"{describe_slice(progress.slice)}\n" if progress.slice is not None else "")
                + describe_study_eta(progress.eta, status.driver.alive))
    models = Table(title="per model", title_justify="left", expand=False)
    for name, justify in (("model", "left"), ("done", "right"), ("running", "right"), ("failed", "right"),
                          ("left", "right"), ("s/trial", "right"), ("basis", "left"), ("actors", "right"),
                          ("ETA", "right")):
        models.add_column(name, justify=justify)
    for m in progress.eta.models:
        w = m.work
        models.add_row(m.model, f"{w.done}/{w.total}", str(len(w.running)), str(w.failed), str(w.left),
                       _rate_cell(m), m.rate.describe(), str(w.actors), format_duration(m.eta_s))
    parts = [head, models]
    if progress.running:
        running = Table(title=f"running ({len(progress.running)})", title_justify="left")
        for name in ("trial", "attempt", "actor", "host", "for"):
            running.add_column(name)
        for r in progress.running[:ROWS]:
            running.add_row(r.name, str(r.attempt), f"#{r.actor}", r.host or "?",
                            format_duration(r.seconds) + (" (loading)" if r.loading else ""))
        parts.append(running)
        if len(progress.running) > ROWS:
            parts.append(Text(f"... and {len(progress.running) - ROWS} more running"))
    if progress.failed:
        failed = Table(title=f"failed ({len(progress.failed)}; the latest)", title_justify="left")
        for name in ("trial", "attempt", "verdict", "error"):
            failed.add_column(name)
        for f in progress.failed[-ROWS:]:
            failed.add_row(f.name, str(f.attempt), "gave up" if f.final else "retrying", f.error[:160])
        parts.append(failed)
    notes = [f"note: {name} ends in a cut-off line; that event is ignored" for name in status.cut_off]
    notes += [f"note: {where} is not a JSON event; ignored" for where in status.unreadable]
    unknown = [f"{m.model}: {describe_rate(m)}" for m in progress.eta.models if m.rate.seconds is None and m.unfinished]
    parts += [Text(line) for line in notes + unknown]
    parts.append(Text(f"as of {_clock(status.as_of)}; every {every_s:g} s; Ctrl-C to stop", style="dim"))
    return Group(*parts)


# -- the command ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WatchOptions:
    every_s: float
    count: int | None = None  # stop after this many refreshes
    until_done: bool = False  # stop once the driver is gone and nothing runs


def watch(refresh: Callable[[], StudyStatus | None], show: Callable[[StudyStatus], None], options: WatchOptions,
          sleep: Callable[[float], None] = time.sleep) -> int:
    """Refreshes and shows the status until Ctrl-C (exit 0), `count` refreshes (0) or, with `until_done`,
    the study's end: 0 when every trial is done, 1 when the driver left some failed or unrun."""
    shown = 0
    try:
        while True:
            status = refresh()
            if status is None:
                return ExitCode.INVALID
            show(status)
            shown += 1
            if options.until_done and status.finished:
                summary = status.progress.summary
                return ExitCode.OK if summary.done == summary.total else ExitCode.FAILED_TRIALS
            if options.count is not None and shown >= options.count:
                return ExitCode.OK
            sleep(options.every_s)
    except KeyboardInterrupt:
        return ExitCode.OK


def _is_tty(stream) -> bool:
    return hasattr(stream, "isatty") and stream.isatty()


def run_status(args: argparse.Namespace, out=None, err=None, sleep: Callable[[float], None] = time.sleep) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    problem = _check_options(args)
    if problem:
        print(f"error: {problem}", file=err)
        return ExitCode.INVALID
    store = StudyStore(args.directory)
    seeds = StudySeeds(store, args.gpu_tflops)

    def refresh() -> StudyStatus | None:
        status = read_status(store, seeds)
        if status is None:
            print(not_a_study_directory(args.directory), file=err)
        return status

    if not args.watch:
        status = refresh()
        if status is None:
            return ExitCode.INVALID
        if args.json:
            print(json.dumps(status_json(status, tracebacks=args.failures), indent=2), file=out)
        else:
            print(format_status(status, show_failures=args.failures), file=out)
        return ExitCode.OK

    every_s = DEFAULT_WATCH_S if args.every is None else args.every
    options = WatchOptions(every_s=every_s, count=args.count, until_done=args.until_done)
    if args.json:  # JSON lines: one object per refresh
        def show_json(status: StudyStatus) -> None:
            print(json.dumps(status_json(status, tracebacks=args.failures)), file=out, flush=True)
        return watch(refresh, show_json, options, sleep)
    if not _is_tty(out):  # a log or CI: whole summaries one after another
        def show_text(status: StudyStatus) -> None:
            print(f"--- {_clock(status.as_of)}", file=out)
            print(format_status(status, show_failures=args.failures), file=out, flush=True)
        return watch(refresh, show_text, options, sleep)
    from rich.console import Console  # deferred: only a watch on a terminal draws with rich
    from rich.live import Live

    with Live(console=Console(file=out), auto_refresh=False, transient=False) as live:
        return watch(refresh, lambda status: live.update(live_view(status, every_s), refresh=True), options,
                     sleep)


def _check_options(args: argparse.Namespace) -> str | None:
    if args.gpu_tflops <= 0:
        return "--gpu-tflops must be positive (one GPU's dense bf16 peak, as for `sweep plan --estimate`)"
    if not args.watch and (args.count is not None or args.until_done):
        return "--count and --until-done end a --watch; give --watch too"
    if not args.watch and args.every is not None:
        return "--every SECONDS goes with --watch (how often it redraws); give --watch too"
    if args.every is not None and not args.every > 0:  # `not >`: NaN too
        return "--every SECONDS must be positive"
    if args.count is not None and args.count < 1:
        return "--count must be at least 1"
    return None


def cmd_status(args: argparse.Namespace) -> int:
    return run_status(args)


def register(subparsers) -> None:
    """Adds `sweep status` with its options to the `sweep` parser's sub-commands."""
    p = subparsers.add_parser("status", help="summary of a study directory, running or stopped")
    p.add_argument("directory")
    p.add_argument("--failures", action="store_true", help="print each failed trial's last error and traceback "
                                                           "(with --json: its traceback)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object (keys in docs/status.md); with --watch one per line per refresh")
    # A plain flag: with an optional value, `sweep status --watch DIR` read DIR as the seconds
    p.add_argument("--watch", action="store_true",
                   help="redraw until Ctrl-C: a live table on a terminal, whole summaries on a pipe or log")
    p.add_argument("--every", type=float, default=None, metavar="SECONDS",
                   help=f"with --watch: redraw every SECONDS (default {DEFAULT_WATCH_S:g})")
    p.add_argument("--until-done", action="store_true",
                   help="with --watch: stop once the driver is gone and nothing runs (exit 0 if every trial is "
                        "done, else 1)")
    p.add_argument("--count", type=int, default=None, metavar="N", help="with --watch: stop after N refreshes")
    p.add_argument("--gpu-tflops", type=float, default=DEFAULT_GPU_TFLOPS,
                   help="one GPU's dense bf16 peak in TFLOP/s, for the estimated seconds per trial of models none "
                        "of whose trials finished yet (as `sweep plan --estimate`; 989: H100 SXM)")
    p.set_defaults(func=cmd_status)
