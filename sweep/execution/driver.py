"""`sweep run`: expand the study, read the store, run what is left on Ray, record every event.

Resuming is reading: a trial is done when some driver run logged it finished, so running again after
any interruption (a killed driver, a lost node, Ctrl-C) runs only the rest, and a grown grid runs only
its new keys. Trials that failed with their retries used up are left alone unless --retry-failed.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from sweep.execution.ray_runtime import RayTarget, accelerator_warnings, start_ray, stop_ray, worker_env
from sweep.execution.worker import ModelWorker, TrialTask, library_versions
from sweep.exit_codes import ExitCode
from sweep.plan.fit import check_model_fit
from sweep.results.progress import LiveProgress, Summary, format_duration, model_work, study_eta
from sweep.store.records import (
    ActorLost,
    Event,
    PlannedTrial,
    PlanRecord,
    RunEnded,
    RunStarted,
    RunStopped,
    TrialFailed,
    TrialFields,
    TrialFinished,
    TrialStarted,
    Unschedulable,
)
from sweep.store.study_store import StoreLocked, StudyStore
from sweep.store.visibility import local_dir_refusal, write_sentinel
from sweep.study.env import REPO_ROOT, apply_default_env
from sweep.study.grid import Plan, TrialSpec, expand
from sweep.study.load import Study, load_study
from sweep.study.problems import StudyInvalid
from sweep.study.slices import SliceError, TrialSlice


@dataclass
class RunOptions:
    out: str | None = None  # study directory; default: the study's execution.output_dir
    address: str | None = None  # Ray cluster; None: embedded local Ray
    num_cpus: int | None = None  # embedded Ray only
    num_gpus: int | None = None  # embedded Ray only (logical GPUs: for testing placement on a CPU machine)
    max_actors: int | None = None  # overrides execution.max_actors
    retry_failed: bool = False
    progress: bool = True
    preflight: bool = True
    only: TrialSlice | None = None  # run only these trials of the plan (plan.json still lists them all)
    shared_dir: bool = False  # the user says every node mounts this local study directory (checked per node)


@dataclass
class RunOutcome:
    code: int
    finished: int = 0
    failed: int = 0
    model_loads: int = 0
    loads_by_model: dict = field(default_factory=dict)
    store: str = ""


def trial_fields(trial: TrialSpec) -> TrialFields:
    return TrialFields(model=trial.model_label, pruner=trial.pruner_label or "dense",
                       sparsity=trial.sparsity.canonical() if trial.sparsity else "0",
                       calibration=trial.calibration.canonical() if trial.calibration else None,
                       seed=trial.seed, dense=trial.is_dense)


def git_revision() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def plan_record(plan: Plan) -> PlanRecord:
    spec = plan.study.spec
    return PlanRecord(study=plan.study.name, written=time.time(), languages=tuple(spec.evaluation.languages),
                      calibration_languages=tuple(m.canonical() for m in plan.study.calibration_mixes),
                      gpus={m.label: m.gpus for m in spec.models}, analyses=spec.analyses.model_dump(mode="json"),
                      trials=tuple(PlannedTrial(**asdict(trial_fields(t)), key=t.key, name=t.name)
                                   for t in plan.trials))


def run_study(study_path: str | Path, options: RunOptions, out=None, err=None) -> RunOutcome:
    """`sweep run STUDY`: loads and expands the study file, then `run_plan`."""
    err = err or sys.stderr
    apply_default_env()
    try:
        plan = expand(load_study(study_path))
    except StudyInvalid as problem:
        print(problem.describe(), file=err)
        return RunOutcome(ExitCode.INVALID)
    print_warnings(plan.study, err)
    return run_plan(plan, options, out, err)


def print_warnings(study: Study, err=None) -> None:
    """The study's own warnings and those only a Ray installation can tell (accelerator types)."""
    for warning in (*study.warnings, *accelerator_warnings(study)):
        print(f"warning: {warning}", file=err or sys.stderr)


def run_plan(plan: Plan, options: RunOptions, out=None, err=None) -> RunOutcome:
    """Runs what is left of `plan` into its study directory (options.out, else the study's
    execution.output_dir): the preflight checks, the driver lock, then the trials on Ray. Any plan will
    do, a slice of a study's included; the study directory keeps the study file it came from. The
    study's warnings are the caller's to print (it printed them when it loaded the study)."""
    out, err = out or sys.stdout, err or sys.stderr
    study = plan.study
    if options.preflight:
        try:
            for note in preflight(study):
                print(f"note: {note}", file=err)
        except StudyInvalid as problem:
            print(problem.describe(), file=err)
            return RunOutcome(ExitCode.INVALID)

    try:
        store = StudyStore(options.out or study.output_location)
    except ValueError as problem:
        print(f"error: --out / execution.output_dir: {problem}", file=err)
        return RunOutcome(ExitCode.INVALID)
    if store.is_local:
        refusal = local_dir_refusal(store.location.local_path(), on_cluster=options.address is not None,
                                    shared=options.shared_dir)
        if refusal:
            print(f"error: --out / execution.output_dir: {refusal}. Nothing was run.", file=err)
            return RunOutcome(ExitCode.INVALID)
    try:
        selected = _selected(plan, options.only)
    except SliceError as problem:
        print(f"error: --only: {problem}. Nothing was run.", file=err)
        return RunOutcome(ExitCode.INVALID)
    try:
        store.acquire()
    except StoreLocked as locked:
        print(f"error: {locked}", file=err)
        return RunOutcome(ExitCode.LOCKED)
    try:
        return _run_locked(study, plan, selected, store, options, out, err)
    finally:
        store.release()


def _selected(plan: Plan, only: TrialSlice | None) -> list[TrialSpec]:
    if only is None:
        return list(plan.trials)
    return [plan.trials[i] for i in only.select([t.slice_fields() for t in plan.trials])]


def preflight(study: Study) -> list:
    """Checks that need the models' files: every model fits the GPUs its accelerator_type names (see
    sweep.plan.fit), and local calibration text is long enough for every tokenizer. Raises StudyInvalid;
    returns notes on what could not be checked here."""
    problems, notes = check_model_fit(study)
    if problems:
        raise StudyInvalid(study.source, problems)
    if study.spec.calibration.source.kind != "local":
        return notes
    from transformers import AutoTokenizer

    from sweep.plan.preflight import check_calibration_text  # deferred: it tokenizes with torch loaded

    tokenizers = {}
    for i, model in enumerate(study.spec.models):
        name = model.hub if model.hub is not None else study.model_paths[i]
        tokenizers[model.label] = AutoTokenizer.from_pretrained(name, revision=model.revision,
                                                                trust_remote_code=model.trust_remote_code)
    check_calibration_text(study, tokenizers)
    return notes


def _run_locked(study: Study, plan: Plan, selected: list[TrialSpec], store: StudyStore, options: RunOptions, out,
                err) -> RunOutcome:
    frozen = store.freeze_study(study.file_text)
    store.write_plan(plan_record(plan))
    reading = store.read_events()
    for name in reading.cut_off:
        print(f"note: {name} ends in a cut-off line (its driver was killed mid-write); that event is ignored",
              file=err)
    for where in reading.unreadable:
        print(f"note: {where} is not a JSON event; ignored", file=err)
    state = store.state(reading.events)
    finished = [t for t in plan.trials if state.is_done(t.key)]
    gave_up = [t for t in selected if not state.is_done(t.key) and state.gave_up(t.key)]  # only the slice's count
    todo = [t for t in selected if not state.is_done(t.key) and (options.retry_failed or not state.gave_up(t.key))]
    print(f"study {study.name}: {len(plan.trials)} trials; {len(finished)} finished earlier, "
          f"{len(gave_up)} failed earlier{' (retrying)' if options.retry_failed else ''}, {len(todo)} to run", file=out)
    if options.only is not None:
        print(f"  slice --only {options.only.text}: {len(selected)} of the {len(plan.trials)} trials (with the dense "
              "baselines of its models); the rest wait for a run without --only", file=out)
    print(f"  study directory: {store.location.url}", file=out)
    if gave_up and not options.retry_failed:
        print(f"  {len(gave_up)} trial(s) failed in an earlier run and are not retried; add --retry-failed to "
              "run them again (`sweep status` shows their errors)", file=out)
    current = {t.key for t in plan.trials}
    if not todo:
        store.compact(current)
        print(f"nothing to run; results: {store.ref('results.parquet')}", file=out)
        return RunOutcome(ExitCode.FAILED_TRIALS if gave_up else ExitCode.OK, store=store.location.url)

    try:
        where = start_ray(RayTarget(options.address, options.num_cpus, options.num_gpus))
    except (ConnectionError, RuntimeError, ValueError) as problem:
        print(f"error: could not {'join the Ray cluster at ' + options.address if options.address else 'start Ray'}: "
              f"{problem}. Check --address / RAY_ADDRESS (and RAY_AUTH_MODE=token for a cluster with token "
              "authentication); nothing was run.", file=err)
        return RunOutcome(ExitCode.INVALID, store=store.location.url)
    print(f"  {where}", file=out)
    outcome = None
    try:
        outcome = _schedule(study, plan, selected, todo, state, store, options, out, err, str(frozen),
                            len(finished), 0 if options.retry_failed else len(gave_up))
        return outcome
    finally:
        # Ray's own logs matter when the scheduling broke (workers that would not start), not for a trial's
        # error, which the event log holds with its traceback.
        broken = outcome is None or (outcome.code == ExitCode.FAILED_TRIALS and outcome.failed == 0)
        kept = stop_ray(keep_logs=broken)
        if kept:
            print(f"  Ray's logs are kept in {kept}", file=err)


@dataclass
class _Recorder:
    """Turns the scheduler's events into the study's event log (with the trial's fields and result) and
    the live progress line."""

    store: StudyStore
    progress: LiveProgress
    by_key: dict[str, TrialSpec]
    revision: str | None
    total: int
    finished_before: int
    failed_before: int
    hub_repos: dict[str, str | None] = field(default_factory=dict)  # key -> where `sweep push` uploads it
    plan_trials: tuple[tuple[str, str], ...] = ()  # (key, model) of every planned trial, for the ETA
    done: dict[str, float] = field(default_factory=dict)  # key -> seconds of its finished trial, any run
    gave_up: set[str] = field(default_factory=set)
    finished: int = 0
    failed: int = 0

    def emit(self, event: Event) -> None:
        if isinstance(event, TrialFinished):
            trial, result = self.by_key[event.key], event.result or {}
            event = replace(event, result=None, trial=trial_fields(trial), spec=trial.payload(),
                            metrics=result.get("metrics", []), pruning=result.get("pruning"),
                            statistics=result.get("statistics_path"), saved_model=result.get("model_path"),
                            hub_repo=self.hub_repos.get(event.key), timings=result.get("timings"), git=self.revision)
            self.done[event.key] = event.seconds
            self.finished += 1
            self.progress.log(f"  done    {event.name}  ({event.seconds:.1f} s, actor #{event.actor}, "
                              f"attempt {event.attempt})")
        elif isinstance(event, TrialFailed):
            event = replace(event, trial=trial_fields(self.by_key[event.key]), git=self.revision)
            self.failed += event.final
            if event.final:
                self.gave_up.add(event.key)
            verdict = "gave up" if event.final else "will retry"
            self.progress.log(f"  failed  {event.name}  attempt {event.attempt} ({verdict}): {event.error}")
        elif isinstance(event, Unschedulable):
            self.progress.log(f"  {event.error}")
        elif isinstance(event, ActorLost):
            self.progress.log(f"  worker #{event.actor} on {event.host} died: {event.error}; its trial is re-queued")
        elif isinstance(event, TrialStarted):
            event = replace(event, trial=trial_fields(self.by_key[event.key]))
        self.store.append(event)

    def tick(self, scheduler) -> None:
        self.store.heartbeat()
        running, left = len(scheduler.running()), scheduler.queued()
        self.progress.update(Summary(total=self.total, done=self.finished_before + self.finished, running=running,
                                     failed=self.failed_before + self.failed, left=left,
                                     eta_s=self.eta(scheduler), actors=scheduler.holdings()))

    def eta(self, scheduler) -> float | None:
        """Per model: its measured seconds per trial times this run's work left, over the placed actors on
        it, pooled by actor shape (sweep.results.progress.study_eta, as `sweep status` without its seeds
        from `sweep plan --estimate`). None until every model with work left has finished a trial."""
        now = time.monotonic()
        running = {slot.job.key: (0.0 if slot.loading else now - slot.since) for slot in scheduler.running()}
        placed = [slot for slot in scheduler.slots.values() if slot.info is not None]  # not pending placement
        actors = Counter(slot.job.model if slot.job is not None else slot.model for slot in placed
                         if slot.job is not None or slot.model)
        pools = {model: shape.describe() for model, shape in scheduler.shapes.items()}
        pool_actors = Counter(slot.shape.describe() for slot in placed)
        works = model_work(self.plan_trials, self.done, self.gave_up, running, actors, pools)
        return study_eta(works, pool_actors=pool_actors).eta_s


class _StopOnSignal:
    """While running: the first SIGINT or SIGTERM lets the trials in flight finish and starts no new one;
    a second stops at once."""

    def __init__(self, scheduler, progress: LiveProgress):
        self.scheduler, self.progress = scheduler, progress
        self.received: int | None = None
        self._previous: dict = {}

    def _on_signal(self, number, _frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = number
        self.scheduler.stop()
        self.progress.log(f"  stopping ({signal.Signals(number).name}): no new trials; run again to continue")

    def __enter__(self) -> _StopOnSignal:
        self._previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *_exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)


def _unplaceable(shapes: dict, options: RunOptions, execution, err) -> bool:
    """A model whose actor no live node can hold: an error on an embedded Ray (True), a warning on a
    cluster, whose autoscaler may add such a node within placement_timeout_s."""
    from sweep.execution.scheduler import cluster_capacity, largest_node  # deferred: Ray

    for label, shape in shapes.items():
        if cluster_capacity(shape) == 0:
            message = (f"models[{label}] needs {shape.describe()} per replica on one node, and no live node has that "
                       f"({largest_node(shape)})")
            if options.address is None:
                print(f"error: {message}. Set gpus: 0 for this model to run it on CPU, or join a GPU cluster with "
                      "--address.", file=err)
                return True
            print(f"warning: {message}; waiting up to execution.placement_timeout_s "
                  f"({execution.placement_timeout_s}) s for the autoscaler to add one", file=err)
    return False


def _schedule(study: Study, plan: Plan, selected: list[TrialSpec], todo: list[TrialSpec], state, store: StudyStore,
              options: RunOptions, out, err, frozen: str, finished_before: int, failed_before: int) -> RunOutcome:
    import ray

    from sweep.execution.scheduler import ActorRefused, Scheduler, SchedulerConfig, SchedulingError
    from sweep.study.trials import hub_repo  # engine.trial, torch

    execution = study.spec.execution
    jobs, shapes = build_jobs(study, todo, state, store)
    if _unplaceable(shapes, options, execution, err):
        return RunOutcome(ExitCode.INVALID, store=store.location.url)
    todo_keys = {t.key for t in todo}
    recorder = _Recorder(store, LiveProgress(out, enabled=options.progress), {t.key: t for t in todo},
                         git_revision(), len(plan.trials), finished_before, failed_before,
                         hub_repos={t.key: hub_repo(study, t) for t in todo},
                         plan_trials=tuple((t.key, t.model_label) for t in plan.trials
                                           if t.key in todo_keys or state.is_done(t.key)),
                         done={t.key: state.finished[t.key].seconds for t in plan.trials if state.is_done(t.key)},
                         gave_up={t.key for t in plan.trials if state.gave_up(t.key) and t.key not in todo_keys})
    store.append(RunStarted(study=study.name, study_file=frozen, trials=len(plan.trials), to_run=len(todo),
                            finished_before=finished_before, git=recorder.revision, versions=_driver_versions(),
                            address=options.address, retries=execution.retries,
                            timeout_s=execution.trial_timeout_s, only=options.only.text if options.only else None,
                            selected=[t.key for t in selected] if options.only else None))
    # Each worker checks, before its first trial, that it sees this very directory (not a copy on its own disk).
    check = write_sentinel(store.location.local_path()) if store.is_local else None
    scheduler = Scheduler(ray.remote(ModelWorker), jobs,
                          SchedulerConfig(retries=execution.retries, timeout_s=execution.trial_timeout_s,
                                          max_actors=options.max_actors or execution.max_actors,
                                          placement_timeout_s=execution.placement_timeout_s),
                          recorder.emit, actor_options={"runtime_env": {"env_vars": worker_env()}},
                          actor_args=(check,))
    started = time.monotonic()
    try:
        with _StopOnSignal(scheduler, recorder.progress) as stop:
            counters = scheduler.run(on_tick=recorder.tick)
    except ActorRefused as problem:
        recorder.progress.close()
        store.append(RunStopped(reason=str(problem)))
        print(f"error: {problem} Stopped: no new trial was started after it, the trials in flight on other workers "
              "finished, and every finished trial is kept; run again once every node sees the directory.", file=err)
        return RunOutcome(ExitCode.STORE, finished=recorder.finished, store=store.location.url)
    except SchedulingError as problem:
        recorder.progress.close()
        store.append(RunStopped(reason=str(problem)))
        print(f"error: {problem}", file=err)
        return RunOutcome(ExitCode.FAILED_TRIALS, store=store.location.url)
    except OSError as problem:  # the study directory cannot be written (disk full, permissions, a lost mount)
        recorder.progress.close()
        print(f"error: cannot write the study directory {store.location.url}: {problem}. Stopped; the trials in "
              "flight are abandoned and every trial logged as finished is kept. Fix the cause (free space) and "
              "run the same command again to continue.", file=err)
        return RunOutcome(ExitCode.STORE, store=store.location.url)
    recorder.progress.close()
    elapsed = time.monotonic() - started
    ended = RunStopped if stop.received else RunEnded
    store.append(ended(seconds=elapsed, finished=counters.finished, failed=counters.failed,
                       model_loads=counters.model_loads, loads_by_model=dict(counters.loads_by_model),
                       actors_started=counters.actors_started, actors_lost=counters.actors_lost))
    results = store.compact({t.key for t in plan.trials})
    print(f"ran {counters.finished} trial(s) in {format_duration(elapsed)}; {counters.failed} failed; "
          f"{counters.model_loads} model load(s) {counters.loads_by_model}; {counters.actors_lost} worker(s) lost",
          file=out)
    print(f"results: {results}", file=out)
    if stop.received:
        code = ExitCode.INTERRUPTED
    else:
        code = ExitCode.FAILED_TRIALS if counters.failed or failed_before else ExitCode.OK
    return RunOutcome(code, finished=counters.finished, failed=counters.failed, model_loads=counters.model_loads,
                      loads_by_model=dict(counters.loads_by_model), store=store.location.url)


def build_jobs(study: Study, todo: list[TrialSpec], state, store: StudyStore):
    from sweep.execution.scheduler import Job, Shape
    from sweep.study.trials import evaluation_config, model_source, trial_config

    execution = study.spec.execution
    evaluation = evaluation_config(study)
    # Calibration windows are cached beside the study when it is local; workers on a remote store use
    # their own machine's cache.
    cache_dir = store.location.local_path("cache") if store.is_local else None
    log_dir = str(store.location.local_path("logs")) if store.is_local else None
    shapes = {m.label: Shape(gpus=m.gpus, cpus=execution.cpus_per_actor, accelerator=m.accelerator_type)
              for m in study.spec.models}
    sources = {i: model_source(study, i) for i in range(len(study.spec.models))}
    jobs = []
    for trial in todo:
        config = trial_config(study, trial, evaluation=evaluation, cache_dir=cache_dir)
        task = TrialTask(model_source=sources[trial.model_index], config=config, device=execution.device,
                         artifacts=str(store.artifact_dir(trial.key)), log_dir=log_dir)
        jobs.append(Job(key=trial.key, name=trial.name, model=trial.model_label, shape=shapes[trial.model_label],
                        payload=task, earlier_attempts=state.attempts.get(trial.key, 0)))
    return jobs, shapes


def _driver_versions() -> dict:
    return {"python": sys.version.split()[0], **library_versions()}
