"""The sweep's parts without Ray: dispatch policy, storage backends, the object-store log and lock, the
status summary, progress lines and fault injection."""
from __future__ import annotations

import io
import json
import socket
import time

import polars as pl
import pytest

from sweep.execution.scheduler import Job, Scheduler, SchedulerConfig, Shape, _Slot
from sweep.execution.worker import injected_fault
from sweep.results.progress import LiveProgress, Summary, estimate_eta, format_duration, format_summary
from sweep.results.status import summarize
from sweep.store import study_store as store_module
from sweep.store.locations import FsspecLocation, LocalLocation, open_location
from sweep.store.records import PlanRecord, parse_event
from sweep.store.study_store import StoreLocked, StudyStore

CPU = Shape(gpus=0, cpus=1)
GPU4 = Shape(gpus=4, cpus=8)


def make_scheduler(jobs: list[Job]) -> Scheduler:
    return Scheduler(actor_class=None, jobs=jobs, config=SchedulerConfig(), emit=lambda e: None,
                     capacity=lambda shape: 2)


def slot(scheduler: Scheduler, number: int, model: str | None, shape: Shape = CPU, busy_with: Job | None = None):
    s = _Slot(id=number, handle=None, shape=shape, info_ref=None, info={}, model=model, job=busy_with)
    scheduler.slots[number] = s
    return s


def jobs_for(model: str, n: int, shape: Shape = CPU) -> list[Job]:
    return [Job(key=f"{model}-{i}", name=f"{model}-{i}", model=model, shape=shape, payload=None) for i in range(n)]


def test_an_actor_keeps_its_model_while_that_queue_has_work():
    s = make_scheduler(jobs_for("a", 3) + jobs_for("b", 5))
    assert s._pick_model(slot(s, 1, "a")) == "a"


def test_a_fresh_actor_takes_a_model_nobody_holds_before_the_longest_queue():
    s = make_scheduler(jobs_for("a", 9) + jobs_for("b", 2))
    slot(s, 1, "a")
    assert s._pick_model(slot(s, 2, None)) == "b"


def test_an_actor_switches_to_the_longest_queue_when_its_own_is_empty():
    s = make_scheduler(jobs_for("b", 2) + jobs_for("c", 6))
    slot(s, 1, "b")
    slot(s, 2, "c")
    assert s._pick_model(slot(s, 3, "a")) == "c"


def test_an_actor_only_takes_models_of_its_shape():
    s = make_scheduler(jobs_for("small", 3) + jobs_for("big", 3, GPU4))
    assert s._pick_model(slot(s, 1, None, shape=GPU4)) == "big"
    s.queues["big"].clear()
    assert s._pick_model(slot(s, 2, None, shape=GPU4)) is None


def test_counts_of_queued_work_per_shape():
    s = make_scheduler(jobs_for("small", 3) + jobs_for("big", 2, GPU4))
    assert s.queued() == 5 and s.queued(CPU) == 3 and s.queued(GPU4) == 2 and not s.done()


# -- storage ---------------------------------------------------------------------------------------

@pytest.fixture(params=["local", "fsspec"])
def location(request, tmp_path):
    if request.param == "local":
        return LocalLocation(tmp_path / "root")
    return open_location(f"memory://sweep-tests/{tmp_path.name}/root")


def test_storage_backends_behave_alike(location):
    assert location.read_bytes("a/b.json") is None
    location.write_atomic("a/b.json", b"1")
    location.write_atomic("a/b.json", b"2")
    assert location.read_bytes("a/b.json") == b"2"
    assert location.create_exclusive("lock", b"me") and not location.create_exclusive("lock", b"you")
    assert location.read_bytes("lock") == b"me"
    location.write_atomic("a/c.jsonl", b"x")
    assert location.list("a", ".jsonl") == ["a/c.jsonl"] and location.list("missing", ".jsonl") == []
    location.move("lock", "lock.old")
    assert not location.exists("lock") and location.exists("lock.old")
    location.delete("lock.old")
    location.delete("lock.old")  # deleting twice is fine
    assert sorted(location.list("", ".json")) == [] and location.list("a", ".json") == ["a/b.json"]


def test_open_location_picks_the_backend_by_url(tmp_path):
    assert isinstance(open_location(tmp_path), LocalLocation)
    assert isinstance(open_location(f"file://{tmp_path}"), FsspecLocation)
    if not _has("s3fs"):
        with pytest.raises(ValueError, match="install s3fs"):
            open_location("s3://bucket/study")


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_object_store_log_rolls_over_segments_and_reads_back(monkeypatch, tmp_path):
    monkeypatch.setattr(store_module, "SEGMENT_EVENTS", 3)
    url = f"memory://sweep-tests/{tmp_path.name}/study"
    with StudyStore(url) as store:
        for i in range(7):
            store.append(parse_event({"event": "finished", "key": f"k{i}", "name": f"t{i}",
                          "trial": {"model": "m", "pruner": "wanda", "sparsity": "0.5", "calibration": "en", "seed": 0},
                          "metrics": [{"language": "en", "task": "perplexity", "metric": "bits_per_byte", "value": i}]}))
        segments = store.location.list("events", ".jsonl")
        assert len(segments) == 3 and segments[0].endswith("-00000.jsonl")
    reading = StudyStore(url).read_events()
    assert [e.key for e in reading.events] == [f"k{i}" for i in range(7)] and not reading.cut_off
    StudyStore(url).compact()
    frame = pl.read_parquet(io.BytesIO(StudyStore(url).location.read_bytes("results.parquet")))
    assert frame["value"].to_list() == [float(i) for i in range(7)]
    assert frame["model"].unique().to_list() == ["m"] and frame["current"].all()


def test_object_store_lock_refuses_a_live_driver_and_takes_over_a_dead_one(tmp_path):
    url = f"memory://sweep-tests/{tmp_path.name}/locked"
    first = StudyStore(url)
    first.acquire()
    with pytest.raises(StoreLocked, match="in use by another driver"):
        StudyStore(url).acquire()
    # a driver on another host whose heartbeat stopped long ago: stale
    first.location.write_atomic("driver.lock", json.dumps(
        {"pid": 1, "host": "crashed-host", "since": 0, "heartbeat": time.time() - 2 * store_module.LEASE_S}).encode())
    second = StudyStore(url)
    second.acquire()
    assert second.lock_holder()["host"] == socket.gethostname()
    with pytest.raises(StoreLocked, match="was taken by another driver"):
        first.heartbeat(force=True)  # the old driver notices it lost the lock and stops
    second.release()
    assert second.lock_holder() is None


def test_a_fresh_heartbeat_from_another_host_is_respected(tmp_path):
    store = StudyStore(tmp_path / "s")
    store.location.create_exclusive("driver.lock", json.dumps(
        {"pid": 1, "host": "busy-host", "since": time.time() - 86400, "heartbeat": time.time() - 5}).encode())
    with pytest.raises(StoreLocked, match="busy-host"):
        store.acquire()


# -- status and progress -----------------------------------------------------------------------------

def _event(kind, key=None, run="r2", **fields):
    return parse_event({"event": kind, "key": key, "run": run, "time": time.time(), **fields})


def test_status_summary_of_a_running_study():
    plan = PlanRecord.from_json({"trials": [{"key": k, "name": k} for k in ("a", "b", "c", "d", "e")]})
    events = [
        _event("run_started", run="r1"), _event("started", "a", run="r1", actor=1, model="m"),
        _event("finished", "a", run="r1", actor=1, seconds=10.0),
        _event("started", "e", run="r1", actor=1, model="m"),  # in flight when that driver died
        _event("run_started"),
        _event("started", "b", actor=1, model="m"), _event("finished", "b", actor=1, seconds=20.0),
        _event("started", "c", actor=1, model="m"), _event("failed", "c", actor=1, final=True, error="boom"),
        _event("started", "d", actor=2, model="n"),
    ]
    summary, extra = summarize(plan, events, driver_alive=True)
    assert (summary.total, summary.done, summary.running, summary.failed, summary.left) == (5, 2, 1, 1, 1)
    assert [(a["actor"], a["model"], a["busy"]) for a in summary.actors] == [(1, "m", False), (2, "n", True)]
    assert summary.eta_s == pytest.approx(20.0 * 1.5 / 2)
    assert extra["failed_keys"] == ["c"] and list(extra["running"]) == ["d"]
    stopped, _ = summarize(plan, events, driver_alive=False)
    assert stopped.running == 0 and stopped.left == 2 and stopped.actors == []


def test_stage_medians_per_model_and_method():
    from sweep.results.run_stats import stage_medians

    def finished(model, method, **timings):
        return _event("finished", "k", model=model, timings=timings, pruning={"method": method} if method else None)

    events = [finished("m", "wanda", calibration=1.0, pruning=4.0, perplexity=10.0),
              finished("m", "wanda", calibration=3.0, pruning=2.0, perplexity=30.0),
              finished("m", "wanda", calibration=2.0, pruning=3.0, perplexity=20.0, tasks=7.0),
              finished("m", None, perplexity=9.0, restore=0.1), _event("failed", "x", model="m"),
              _event("finished", "y", model="n"), finished("n", "magnitude", pruning="?")]
    medians = stage_medians(events)
    assert medians["m wanda"] == {"calibration": (2.0, 3), "pruning": (3.0, 3), "perplexity": (20.0, 3),
                                  "tasks": (7.0, 1)}
    assert list(medians["m dense"]) == ["perplexity", "restore"]
    assert not any(group.startswith("n ") for group in medians)  # no timings, or none that are numbers


def test_progress_lines():
    summary = Summary(total=10, done=4, running=2, failed=1, left=3, eta_s=125,
                      actors=[{"actor": 1, "model": "llama", "busy": True}, {"actor": 2, "model": None, "busy": False}])
    line = format_summary(summary)
    assert line.startswith("[#########") and "4/10 done, 2 running, 1 failed, 3 left, ETA 2m05s" in line
    assert line.endswith("| actors #1:llama* #2:-")
    assert format_duration(3 * 3600 + 120) == "3h02m" and format_duration(None) == "?"
    assert estimate_eta([], 5, 0, 2) is None and estimate_eta([], 0, 0, 2) == 0.0
    stream = io.StringIO()
    live = LiveProgress(stream, every_s=3600)
    live.update(summary)
    live.update(summary)  # throttled on a pipe
    live.log("  done    x")
    assert stream.getvalue().count("4/10 done") == 1 and "  done    x\n" in stream.getvalue()


def test_fault_injection_matches_name_and_attempt(monkeypatch):
    assert injected_fault("m.wanda.cal-en", 1) is None
    monkeypatch.setenv("SWEEP_INJECT_FAULTS", json.dumps([{"match": "cal-en", "kind": "exit", "attempts": 2}]))
    assert injected_fault("m.wanda.cal-en", 1) == "exit" and injected_fault("m.wanda.cal-en", 2) == "exit"
    assert injected_fault("m.wanda.cal-en", 3) is None and injected_fault("m.wanda.cal-de", 1) is None


def test_hub_repo_template_is_checked():
    from pydantic import ValidationError

    from sweep.study.schema import SaveModelsSpec

    assert SaveModelsSpec(enabled=True, hub_repo="me/{model}-{pruner}-{sparsity}-cal-{calibration}-seed{seed}")
    with pytest.raises(ValidationError, match="unknown field"):
        SaveModelsSpec(hub_repo="me/{modle}")
    with pytest.raises(ValidationError, match="owner/name"):
        SaveModelsSpec(hub_repo="{model}")


def test_upload_atomic_streams_a_file_into_either_backend(location, tmp_path):
    local = tmp_path / "shard.bin"
    local.write_bytes(b"w" * 100_000)
    location.upload_atomic("artifacts/k/model/shard.bin", local)
    assert location.read_bytes("artifacts/k/model/shard.bin") == b"w" * 100_000
    folder = (location.local_path("artifacts/k/model") if location.is_local
              else location.fs.ls(location._path("artifacts/k/model"), detail=False))
    names = sorted(p.name for p in folder.iterdir()) if location.is_local else sorted(n.rsplit("/", 1)[-1] for n in folder)
    assert names == ["shard.bin"]  # no temporary left behind
