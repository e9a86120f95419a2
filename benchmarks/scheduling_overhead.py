"""Scheduling overhead per trial: this project's scheduler against Ray Tune, on the same no-op trials,
side by side in one run; and how long `sweep run` takes to read a 10,000-event log before it starts.

    python benchmarks/scheduling_overhead.py [--sizes 1000 10000] [--actors 2] [--tune-limit-s 480]
                                             [--json results.json]

No-op trials isolate what the scheduler itself costs: dispatching a call to an actor, collecting the
reply, and (for ours) appending two fsynced events per trial to the study's log through a StudyStore, as
`sweep run` does. Variants measured for ours, at every size:

- "ours": the scheduler with its events appended by StudyStore.append (one fsync per event);
- "no log": the same with events dropped, to separate the store's cost;
- "group commit": a prototype of a fix, not what `sweep run` does: events written and flushed as they
  come, fsynced once per scheduler loop (from the scheduler's on_tick hook, before it waits again);
- "bare Ray": no scheduler at all, each actor kept busy with one no-op call at a time through a
  ray.wait loop: the floor any scheduler built on Ray actor calls pays on this machine.

Ray Tune runs a function trainable that returns at once, tune.grid_search over the trials,
reuse_actors=True and the same number of trials in flight. Tune runs at a size only if the time measured
at the smaller size projects (linearly, x2 for its per-trial cost growing with the trial count) under
--tune-limit-s, and never longer than that (TuneConfig.time_budget_s); otherwise the output says why.
Memory is the driver's resident set: sampled every 10 ms during each variant for its peak, and its
growth from before the variant (job list / Tuner built) to after it (results still held).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import gc
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil  # noqa: E402  (a dependency of ray[default])
import ray  # noqa: E402

from sweep.scheduler import Job, Scheduler, SchedulerConfig, Shape  # noqa: E402
from sweep.store import StudyStore  # noqa: E402


class NoopWorker:
    """The scheduler's worker protocol (see sweep.worker), doing nothing."""

    def __init__(self) -> None:
        self.model = None

    def info(self) -> dict:
        return {}

    def load(self, payload, model: str) -> dict:
        loaded = self.model != model
        self.model = model
        return {"ok": True, "loaded": loaded, "model": model}

    def run(self, payload, model: str, attempt: int) -> dict:
        loaded = self.model != model
        self.model = model
        return {"ok": True, "loaded": loaded, "model": model, "result": {"metrics": []}}


def rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RssSampler:
    """The driver's peak resident set during a block (ru_maxrss only ever grows over the process)."""

    def __init__(self, every_s: float = 0.01):
        self.every_s = every_s
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        process = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, process.memory_info().rss / 2**20)
            self._stop.wait(self.every_s)

    def __enter__(self) -> "RssSampler":
        self.peak = rss_mib()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mib())


class GroupCommitLog:
    """Prototype: the same JSON lines as StudyStore.append, written and flushed per event, fsynced once
    per scheduler loop (on_tick) instead of once per event."""

    def __init__(self, folder: str):
        path = Path(folder) / "events" / "group-commit.jsonl"
        path.parent.mkdir(parents=True)
        self.log = open(path, "a", encoding="utf-8")
        self.dirty = False
        self.fsyncs = 0
        self.events = 0

    def emit(self, event: dict) -> None:
        self.log.write(json.dumps({"time": time.time(), "run": "bench", **event}, allow_nan=False, default=str) + "\n")
        self.log.flush()
        self.dirty = True
        self.events += 1

    def tick(self, _scheduler) -> None:
        if self.dirty:
            os.fsync(self.log.fileno())
            self.dirty, self.fsyncs = False, self.fsyncs + 1

    def close(self) -> None:
        self.tick(None)
        self.log.close()


def ours(n: int, actors: int, log: str) -> dict:
    """log: "store" (StudyStore.append), "none" or "group" (GroupCommitLog)."""
    gc.collect()
    folder = tempfile.mkdtemp(prefix="bench-store-")
    store, group = None, None
    before = rss_mib()  # the job list counts: the real driver holds one per trial to run
    jobs = [Job(key=f"k{i}", name=f"trial-{i}", model=f"model-{i % 2}", shape=Shape(0, 1), payload={"i": i})
            for i in range(n)]
    on_tick = None
    if log == "store":
        store = StudyStore(folder)
        store.acquire()
        emit = store.append
    elif log == "group":
        group = GroupCommitLog(folder)
        emit, on_tick = group.emit, group.tick
    else:
        emit = lambda event: None  # noqa: E731
    first_dispatch = []

    def timed_emit(event: dict, emit=emit) -> None:
        if not first_dispatch and event["event"] == "started":
            first_dispatch.append(time.perf_counter())  # the actors are up: the rest is steady state
        emit(event)

    scheduler = Scheduler(ray.remote(NoopWorker), jobs, SchedulerConfig(max_actors=actors, poll_s=0.5), timed_emit)
    with RssSampler() as sampler:
        started = time.perf_counter()
        counters = scheduler.run(on_tick=on_tick)
        seconds = time.perf_counter() - started
    startup = first_dispatch[0] - started
    after = rss_mib()
    if store is not None:
        store.release()
    if group is not None:
        group.close()
    log_mib = sum(p.stat().st_size for p in Path(folder).glob("events/*.jsonl")) / 2**20
    shutil.rmtree(folder, ignore_errors=True)
    assert counters.finished == n, counters
    return {"seconds": seconds, "ms_per_trial": 1000 * seconds / n, "startup_s": startup,
            "steady_ms_per_trial": 1000 * (seconds - startup) / n, "peak_rss_mib": sampler.peak,
            "rss_growth_mib": after - before, "model_loads": counters.model_loads, "log_mib": log_mib,
            **({"fsyncs": group.fsyncs, "events": group.events} if group else {})}


def bare_ray(n: int, actors: int) -> dict:
    """Each actor kept busy with one no-op call at a time, nothing else: the floor under any scheduler."""
    gc.collect()
    before = rss_mib()
    cls = ray.remote(NoopWorker)
    handles = [cls.options(num_cpus=1).remote() for _ in range(actors)]
    ray.get([h.info.remote() for h in handles])  # started before timing (ours' timing includes starting)
    with RssSampler() as sampler:
        started = time.perf_counter()
        in_flight = {h.run.remote(None, "m", 1): h for h in handles[:n]}
        submitted = len(in_flight)
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            handle = in_flight.pop(ready[0])
            ray.get(ready[0])
            if submitted < n:
                in_flight[handle.run.remote(None, "m", 1)] = handle
                submitted += 1
        seconds = time.perf_counter() - started
    after = rss_mib()
    for h in handles:
        ray.kill(h, no_restart=True)
    return {"seconds": seconds, "ms_per_trial": 1000 * seconds / n, "peak_rss_mib": sampler.peak,
            "rss_growth_mib": after - before}


def noop_trainable(config: dict) -> dict:
    return {"score": config["i"]}


def tune(n: int, actors: int, limit_s: float) -> dict:
    from ray import tune as ray_tune

    folder = tempfile.mkdtemp(prefix="bench-tune-")
    gc.collect()
    before = rss_mib()
    with RssSampler() as sampler:
        started = time.perf_counter()
        tuner = ray_tune.Tuner(
            ray_tune.with_resources(noop_trainable, {"cpu": 1}),
            param_space={"i": ray_tune.grid_search(list(range(n)))},
            tune_config=ray_tune.TuneConfig(reuse_actors=True, max_concurrent_trials=actors, time_budget_s=limit_s),
            run_config=ray_tune.RunConfig(storage_path=folder, name="noop", verbose=0, log_to_file=False))
        with contextlib.redirect_stdout(io.StringIO()):  # its experiment table, despite verbose=0
            results = tuner.fit()
        seconds = time.perf_counter() - started
    after = rss_mib()
    done = sum(1 for r in results if r.error is None and r.metrics and "score" in r.metrics)
    shutil.rmtree(folder, ignore_errors=True)
    out = {"seconds": seconds, "ms_per_trial": 1000 * seconds / max(done, 1), "peak_rss_mib": sampler.peak,
           "rss_growth_mib": after - before, "trials_done": done}
    if done < n:
        out["incomplete"] = f"stopped by time_budget_s={limit_s:g} after {done} of {n} trials"
    return out


def resume_startup(events: int) -> dict:
    """A study directory with `events` events (started + finished pairs, 21 metric rows per finished event:
    7 languages x 3 perplexity metrics), then what `sweep run` does before any work: read and fold."""
    folder = tempfile.mkdtemp(prefix="bench-resume-")
    metrics = [{"language": lang, "task": "perplexity", "metric": m, "value": 1.2345678, "tokens": 262144,
                "bytes": 1000000, "window": 2048}
               for lang in ("ar", "de", "en", "es", "ru", "sw", "zh")
               for m in ("bits_per_byte", "token_perplexity", "loss")]
    path = Path(folder) / "events" / "20261124T000000-1-bench.jsonl"
    path.parent.mkdir(parents=True)
    with open(path, "w", encoding="utf-8") as log:
        for i in range(events // 2):
            key = f"v1-{i:020x}"
            base = {"run": "bench", "key": key, "name": f"model.wanda.s50.cal-en.seed{i}", "attempt": 1, "actor": 1,
                    "node": "n" * 56, "host": "worker-1", "gpus": ["0"]}
            trial = {"model": "m", "pruner": "wanda", "sparsity": "0.5", "calibration": "en", "seed": i, "dense": False}
            log.write(json.dumps({"time": 2 * i, "event": "started", **base, "trial": trial}) + "\n")
            log.write(json.dumps({"time": 2 * i + 1, "event": "finished", **base, "seconds": 100.0,
                                  "trial": trial, "metrics": metrics,
                                  "timings": {"calibration": 1.0, "pruning": 50.0, "perplexity": 40.0}}) + "\n")
    size_mib = path.stat().st_size / 2**20
    store = StudyStore(folder)
    started = time.perf_counter()
    reading = store.read_events()
    read_seconds = time.perf_counter() - started
    state = store.state(reading.events)
    read_fold_seconds = time.perf_counter() - started
    started = time.perf_counter()
    store.compact()  # reads and folds the log again itself
    compact_seconds = time.perf_counter() - started
    shutil.rmtree(folder, ignore_errors=True)
    assert len(state.finished) == events // 2
    return {"events": events, "log_mib": size_mib, "read_s": read_seconds, "read_and_fold_s": read_fold_seconds,
            "compact_s": compact_seconds}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    versions = {"python": platform.python_version(), "ray": ray.__version__, "psutil": psutil.__version__}
    for name in ("polars", "pyarrow"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    return {"cpus": os.cpu_count(), "cpu": cpu, "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(), "versions": versions}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--tune-limit-s", type=float, default=480.0,
                        help="the longest one Tune run may take (projected before, enforced during)")
    parser.add_argument("--json", help="also write every figure to this file")
    args = parser.parse_args()

    run_started = time.perf_counter()
    info = machine()
    print(f"machine: {info['cpus']} CPUs ({info['cpu']}), {info['memory_gib']} GiB, {info['platform']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"workload: no-op trials, {args.actors} actors of 1 CPU on an embedded Ray with {args.actors} CPUs, "
          f"2 models; sizes {args.sizes}", flush=True)

    temp_dir = tempfile.mkdtemp(prefix="bench-ray-")
    ray.init(num_cpus=args.actors, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False,
             configure_logging=True, logging_level="error")
    rows = []
    previous = None  # (trials, Tune ms/trial) at the last size Tune ran
    try:
        ours(50, args.actors, "store")  # warm-up: imports and worker processes, not measured
        tune(20, args.actors, args.tune_limit_s)
        for n in sorted(args.sizes):
            row = {"trials": n}
            for name, log in (("ours", "store"), ("ours_no_log", "none"), ("ours_group_commit", "group")):
                row[name] = ours(n, args.actors, log)
                print(f"  {n} {name}: {row[name]['seconds']:.2f} s", flush=True)
            row["bare_ray"] = bare_ray(n, args.actors)
            print(f"  {n} bare_ray: {row['bare_ray']['seconds']:.2f} s", flush=True)
            projected = 2 * previous[1] * n / 1000 if previous else 0.0
            if projected <= args.tune_limit_s:
                row["tune"] = tune(n, args.actors, args.tune_limit_s)
                print(f"  {n} tune: {row['tune']['seconds']:.2f} s", flush=True)
                previous = (n, row["tune"]["ms_per_trial"])
            else:
                row["tune"] = None
                row["tune_skipped"] = (f"not run: {previous[1]:.1f} ms/trial measured at {previous[0]:,} trials "
                                       f"projects {projected:.0f} s at {n:,} (x2 for its growth with trial count), "
                                       f"over --tune-limit-s {args.tune_limit_s:.0f}")
            rows.append(row)
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    resume = resume_startup(10_000)
    total = time.perf_counter() - run_started

    print()
    head = ["trials", "ours ms/trial", "no log", "group commit", "bare Ray", "Tune ms/trial", "Tune / ours",
            "ours peak RSS", "ours RSS growth", "Tune peak RSS", "Tune RSS growth", "ours loads"]
    print(" | ".join(head))
    for row in rows:
        t, o = row["tune"], row["ours"]
        cells = [f"{row['trials']:,}", f"{o['ms_per_trial']:.2f}", f"{row['ours_no_log']['ms_per_trial']:.2f}",
                 f"{row['ours_group_commit']['ms_per_trial']:.2f}", f"{row['bare_ray']['ms_per_trial']:.2f}",
                 f"{t['ms_per_trial']:.2f}" if t else "not run",
                 f"{t['ms_per_trial'] / o['ms_per_trial']:.1f}x" if t else "-",
                 f"{o['peak_rss_mib']:.0f} MiB", f"{o['rss_growth_mib']:.1f} MiB",
                 f"{t['peak_rss_mib']:.0f} MiB" if t else "-", f"{t['rss_growth_mib']:.1f} MiB" if t else "-",
                 str(o["model_loads"])]
        print(" | ".join(cells))
        if row.get("tune_skipped"):
            print(f"    Tune at {row['trials']:,}: {row['tune_skipped']}")
        if t and t.get("incomplete"):
            print(f"    Tune at {row['trials']:,}: {t['incomplete']}")
    for row in rows:
        o, t = row["ours"], row["tune"]
        print(f"wall s at {row['trials']:,}: ours {o['seconds']:.2f}, no log {row['ours_no_log']['seconds']:.2f}, "
              f"group commit {row['ours_group_commit']['seconds']:.2f} "
              f"({row['ours_group_commit']['fsyncs']:,} fsyncs for {row['ours_group_commit']['events']:,} events), "
              f"bare Ray {row['bare_ray']['seconds']:.2f}, Tune " + (f"{t['seconds']:.2f}" if t else "not run")
              + f"; log {o['log_mib']:.1f} MiB")
    print("steady state, after the actors are up (ms/trial): ours | no log | group commit | bare Ray "
          "(actor start-up, s: ours | no log | group commit)")
    for row in rows:
        variants = [row["ours"], row["ours_no_log"], row["ours_group_commit"]]
        print(f"  {row['trials']:,}: " + " | ".join(f"{v['steady_ms_per_trial']:.2f}" for v in variants)
              + f" | {row['bare_ray']['ms_per_trial']:.2f}  (" + " | ".join(f"{v['startup_s']:.2f}" for v in variants)
              + ")")
    print(f"driver peak RSS over the whole run (ru_maxrss): {peak_mib():.0f} MiB")
    print(f"resume start-up on a {resume['events']:,}-event log ({resume['log_mib']:.1f} MiB): read "
          f"{resume['read_s']:.2f} s, read + fold {resume['read_and_fold_s']:.2f} s; compact to Parquet "
          f"{resume['compact_s']:.2f} s")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"total run time: {total:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "args": vars(args), "rows": rows, "resume": resume,
                                               "total_s": total, "driver_peak_rss_mib": peak_mib()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
