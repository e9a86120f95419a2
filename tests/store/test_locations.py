"""Study-directory storage without Ray: local and fsspec backends behave alike, the object-store log and lock."""
from __future__ import annotations

import io
import json
import socket
import time

import polars as pl
import pytest

from sweep.store import study_store as store_module
from sweep.store.locations import FsspecLocation, LocalLocation, open_location
from sweep.store.records import parse_event
from sweep.store.study_store import StoreLocked, StudyStore


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


def test_upload_atomic_streams_a_file_into_either_backend(location, tmp_path):
    local = tmp_path / "shard.bin"
    local.write_bytes(b"w" * 100_000)
    location.upload_atomic("artifacts/k/model/shard.bin", local)
    assert location.read_bytes("artifacts/k/model/shard.bin") == b"w" * 100_000
    folder = (location.local_path("artifacts/k/model") if location.is_local
              else location.fs.ls(location._path("artifacts/k/model"), detail=False))
    names = sorted(p.name for p in folder.iterdir()) if location.is_local else sorted(n.rsplit("/", 1)[-1] for n in folder)
    assert names == ["shard.bin"]  # no temporary left behind
