"""Scheduling overhead per trial: this project's scheduler against Ray Tune, on the same no-op trials,
side by side in one run; and how long `sweep run` takes to read a 10,000-event log before it starts.

    python benchmarks/scheduling_overhead.py [--sizes 1000 10000] [--actors 2] [--tune-limit-s 600]

No-op trials isolate what the scheduler itself costs: dispatching a call to an actor, collecting the
reply, and (for ours) appending two fsynced events per trial to the study's log, as `sweep run` does.
Ray Tune runs a function trainable that returns at once, with reuse_actors=True and the same number of
trials in flight. Tune runs at a size only if its time measured at the smaller size projects under
--tune-limit-s; otherwise the output says it was skipped and why.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil  # noqa: E402  (a dependency of ray[default])
import ray  # noqa: E402

from sweep.execution.replies import WorkerReply  # noqa: E402
from sweep.execution.scheduler import Job, Scheduler, SchedulerConfig, Shape  # noqa: E402
from sweep.store.study_store import StudyStore  # noqa: E402


class NoopWorker:
    def __init__(self) -> None:
        self.model = None

    def info(self) -> dict:
        return {"pid": os.getpid()}

    def load(self, payload, model: str) -> WorkerReply:
        loaded = self.model != model
        self.model = model
        return WorkerReply(ok=True, loaded=loaded, model=model)

    def run(self, payload, model: str, attempt: int) -> WorkerReply:
        return WorkerReply(ok=True, model=self.model, result={"metrics": []})


def rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ours(n: int, actors: int, with_store: bool) -> dict:
    gc.collect()
    before = rss_mib()  # the job list counts: the real driver holds one per trial to run
    jobs = [Job(key=f"k{i}", name=f"trial-{i}", model=f"model-{i % 2}", shape=Shape(0, 1), payload={"i": i})
            for i in range(n)]
    folder = tempfile.mkdtemp(prefix="bench-store-")
    store = StudyStore(folder)
    store.acquire()
    emit = store.append if with_store else (lambda event: None)
    started = time.perf_counter()
    counters = Scheduler(ray.remote(NoopWorker), jobs, SchedulerConfig(max_actors=actors, poll_s=0.5), emit).run()
    seconds = time.perf_counter() - started
    after = rss_mib()
    store.release()
    shutil.rmtree(folder, ignore_errors=True)
    assert counters.finished == n, counters
    return {"seconds": seconds, "ms_per_trial": 1000 * seconds / n, "rss_mib": after, "rss_growth_mib": after - before,
            "model_loads": counters.model_loads}


def noop_trainable(config: dict) -> dict:
    return {"score": config["i"]}


def tune(n: int, actors: int) -> dict:
    from ray import tune as ray_tune

    folder = tempfile.mkdtemp(prefix="bench-tune-")
    gc.collect()
    before = rss_mib()
    started = time.perf_counter()
    tuner = ray_tune.Tuner(
        ray_tune.with_resources(noop_trainable, {"cpu": 1}),
        param_space={"i": ray_tune.grid_search(list(range(n)))},
        tune_config=ray_tune.TuneConfig(reuse_actors=True, max_concurrent_trials=actors),
        run_config=ray_tune.RunConfig(storage_path=folder, name="noop", verbose=0, log_to_file=False))
    results = tuner.fit()
    seconds = time.perf_counter() - started
    after = rss_mib()
    shutil.rmtree(folder, ignore_errors=True)
    assert len(results) == n and not results.errors
    return {"seconds": seconds, "ms_per_trial": 1000 * seconds / n, "rss_mib": after, "rss_growth_mib": after - before}


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
            log.write(json.dumps({"time": 2 * i, "event": "started", **base}) + "\n")
            log.write(json.dumps({"time": 2 * i + 1, "event": "finished", **base, "seconds": 100.0,
                                  "trial": {"model": "m", "pruner": "wanda", "sparsity": "0.5", "calibration": "en",
                                            "seed": i}, "metrics": metrics,
                                  "timings": {"calibration": 1.0, "pruning": 50.0, "perplexity": 40.0}}) + "\n")
    size_mib = path.stat().st_size / 2**20
    store = StudyStore(folder)
    started = time.perf_counter()
    reading = store.read_events()
    state = store.state(reading.events)
    read_seconds = time.perf_counter() - started
    started = time.perf_counter()
    store.compact()
    compact_seconds = time.perf_counter() - started
    shutil.rmtree(folder, ignore_errors=True)
    assert len(state.finished) == events // 2
    return {"events": events, "log_mib": size_mib, "read_and_fold_s": read_seconds, "compact_s": compact_seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--tune-limit-s", type=float, default=600.0)
    args = parser.parse_args()

    temp_dir = tempfile.mkdtemp(prefix="bench-ray-")
    ray.init(num_cpus=args.actors, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False,
             configure_logging=True, logging_level="error")
    print(f"machine: {os.cpu_count()} CPUs, python {platform.python_version()}, ray {ray.__version__}; "
          f"{args.actors} actors, 2 models; no-op trials")
    rows = []
    tune_ms = None
    try:
        ours(50, args.actors, with_store=True)  # warm-up: imports and worker processes, not measured
        tune(20, args.actors)
        for n in sorted(args.sizes):
            row = {"trials": n, "ours": ours(n, args.actors, with_store=True),
                   "ours_no_log": ours(n, args.actors, with_store=False)}
            projected = tune_ms * n / 1000 if tune_ms is not None else 0.0
            if projected <= args.tune_limit_s:
                row["tune"] = tune(n, args.actors)
                tune_ms = row["tune"]["ms_per_trial"]
            else:
                row["tune"] = None
                row["tune_skipped"] = (f"projected {projected:.0f} s from {tune_ms:.1f} ms/trial measured at the "
                                       f"smaller size, over --tune-limit-s {args.tune_limit_s:.0f}")
            rows.append(row)
            print(json.dumps(row))
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    resume = resume_startup(10_000)
    print()
    print(f"{'trials':>7} | {'ours ms/trial':>13} | {'ours, no log':>12} | {'Tune ms/trial':>13} | {'Tune / ours':>11} | "
          f"{'ours RSS growth':>15} | {'Tune RSS growth':>15}")
    for row in rows:
        t, o = row["tune"], row["ours"]
        tune_ms = f"{t['ms_per_trial']:.2f}" if t else "skipped"
        ratio = f"{t['ms_per_trial'] / o['ms_per_trial']:.1f}x" if t else "-"
        tune_rss = f"{t['rss_growth_mib']:.1f} MiB" if t else "-"
        print(f"{row['trials']:>7} | {o['ms_per_trial']:>13.2f} | {row['ours_no_log']['ms_per_trial']:>12.2f} | "
              f"{tune_ms:>13} | {ratio:>11} | {o['rss_growth_mib']:>11.1f} MiB | {tune_rss:>15}")
        if row.get("tune_skipped"):
            print(f"        Tune at {row['trials']} skipped: {row['tune_skipped']}")
    print(f"driver peak RSS over the whole run: {peak_mib():.0f} MiB")
    print(f"resume start-up on a {resume['events']:,}-event log ({resume['log_mib']:.1f} MiB): read + fold "
          f"{resume['read_and_fold_s']:.2f} s; compact to Parquet {resume['compact_s']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
