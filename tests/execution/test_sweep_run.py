"""`sweep run` end to end on Ray, on the demo models: resume after a killed driver, model affinity, grown
grids, failures, timeouts, two drivers, a cut-off log, an object-store study directory. (A lost node:
tests/execution/test_multinode.py, on separate `ray start` node processes, and
tests/reliability/test_faults.py on an in-process cluster.)

GPUs are Ray logical resources here (the machine has none); the trials run on CPU.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import yaml

from sweep.execution.driver import RunOptions, run_study
from sweep.store.study_store import StudyStore
from tests.conftest import REPO, in_process_cluster, light_demo_study

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def assets():
    from engine.demo import ensure_demo_assets

    return ensure_demo_assets(log=print)


def sweep_env(**extra: str) -> dict:
    from sweep.study.env import default_demo_dir

    env = {**os.environ, "SWEEP_DEMO_DIR": str(default_demo_dir()), "RAY_AUTH_MODE": "token", **extra}
    env.pop("RAY_ADDRESS", None)
    return env


def sweep_cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sweep.cli.main", *args], cwd=REPO, env=env or sweep_env(),
                          capture_output=True, text=True, timeout=timeout)


def spawn_sweep(*args: str, env: dict | None = None, log: Path) -> subprocess.Popen:
    handle = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", "sweep.cli.main", *args], cwd=REPO, env=env or sweep_env(),
                            stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def events(directory: Path | str) -> list[dict]:
    """The study's events as their JSON objects (read through the typed records)."""
    return [e.to_json() for e in StudyStore(directory).read_events().events]


def of_kind(evs: list[dict], kind: str, run: str | None = None) -> list[dict]:
    return [e for e in evs if e.get("event") == kind and (run is None or e.get("run") == run)]


def runs(evs: list[dict]) -> list[str]:
    return [e["run"] for e in of_kind(evs, "run_started")]


def plan_keys(directory: Path | str) -> set[str]:
    return StudyStore(directory).read_plan().keys


def wait_for_finished(directory: Path, count: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the driver exited early with {process.returncode}")
        if (directory / "events").is_dir() and len(of_kind(events(directory), "finished")) >= count:
            return
        time.sleep(0.3)
    raise AssertionError(f"fewer than {count} trials finished in {timeout} s")


def results_table(directory: Path) -> pl.DataFrame:
    frame = pl.read_parquet(directory / "results.parquet")
    return frame.filter(pl.col("current")).select("key", "language", "task", "metric", "value").sort(
        "key", "language", "task", "metric")


def assert_same_results(a: pl.DataFrame, b: pl.DataFrame) -> None:
    assert a.select("key", "language", "task", "metric").equals(b.select("key", "language", "task", "metric"))
    diff = (a["value"] - b["value"]).abs().max()
    assert diff <= 1e-9, f"results differ by up to {diff}"


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    """The full light demo grid, uninterrupted, on an embedded Ray with two CPU actors."""
    directory = tmp_path_factory.mktemp("reference")
    study = light_demo_study(directory)
    outcome = run_study(study, RunOptions(num_cpus=2, progress=False))
    return study, directory / "runs" / "light", outcome


def test_uninterrupted_run_finishes_every_trial_with_at_most_four_model_loads(reference):
    study, out, outcome = reference
    assert outcome.code == 0 and outcome.failed == 0
    evs = events(out)
    finished = of_kind(evs, "finished")
    assert len(finished) == len(plan_keys(out)) == 46
    assert len({e["key"] for e in finished}) == 46  # nothing ran twice
    # model affinity: 2 actors, 2 models
    assert outcome.model_loads <= 4, outcome.loads_by_model
    assert set(outcome.loads_by_model) == {"demo-llama", "demo-cohere"}
    summary = of_kind(evs, "run_finished")[-1]
    assert summary["model_loads"] == outcome.model_loads and summary["actors_lost"] == 0
    event = next(e for e in finished if e["name"] == "demo-llama.wanda.s50.cal-sw.seed0")
    assert event["trial"] == {"model": "demo-llama", "pruner": "wanda", "sparsity": "0.5", "calibration": "sw",
                              "seed": 0, "dense": False}
    assert event["attempt"] == 1 and event["host"] and event["pid"] and event["git"]
    assert event["versions"]["torch"].startswith("2.13.0") and event["versions"]["lm_eval"]
    assert event["spec"]["calibration"]["seed"] == 0 and event["spec"]["pruner"]["method"] == "wanda"
    assert {"calibration", "pruning", "perplexity", "restore"} <= set(event["timings"])
    assert Path(event["pruning"]["mask_sample_path"]).is_file()
    assert of_kind(evs, "run_started")[0]["versions"]["torch"].startswith("2.13.0")
    table = results_table(out)
    assert table.height == 46 * 7 * 3  # every trial x 7 target languages x 3 perplexity metrics
    # `sweep status` on the stopped study
    status = sweep_cli("status", str(out))
    assert status.returncode == 0, status.stderr
    assert "stopped" in status.stdout and "46/46 done, 0 running, 0 failed, 0 left" in status.stdout
    # and running it again runs nothing
    again = run_study(study, RunOptions(num_cpus=2, progress=False))
    assert again.code == 0 and again.finished == 0 and len(runs(events(out))) == 1


def test_driver_killed_with_sigkill_resumes_without_rerunning_and_matches(reference, tmp_path):
    """One model of the reference grid (its trials keep their keys: the other model is not part of a
    trial's identity), killed once 4 trials finished, then resumed: the results equal the reference's."""
    _, reference_out, _ = reference
    study = light_demo_study(tmp_path, models=("demo-llama",))
    out = tmp_path / "killed"
    first = spawn_sweep("run", str(study), "--out", str(out), "--num-cpus", "2", "--no-progress", log=tmp_path / "1.log")
    try:
        wait_for_finished(out, 4, first)
        status = sweep_cli("status", str(out))
        assert f"running: driver pid {first.pid}" in status.stdout, status.stdout
        assert "actors #1:demo-" in status.stdout or "actors #2:demo-" in status.stdout, status.stdout
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    before = events(out)
    done_before = {e["key"] for e in of_kind(before, "finished")}
    planned = plan_keys(out)
    assert len(planned) == 23 and 4 <= len(done_before) < 23
    assert json.loads((out / "driver.lock").read_text())["pid"] == first.pid  # left behind by the dead driver

    second = sweep_cli("run", str(study), "--out", str(out), "--num-cpus", "2", "--no-progress")
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"{len(done_before)} finished earlier" in second.stdout
    evs = events(out)
    resumed = runs(evs)[-1]
    started_again = {e["key"] for e in of_kind(evs, "started", resumed)}
    assert not started_again & done_before  # finished trials were not re-run
    finished = of_kind(evs, "finished")
    assert len(finished) == 23 and {e["key"] for e in finished} == planned
    expected = results_table(reference_out).filter(pl.col("key").is_in(sorted(planned)))
    assert expected["key"].n_unique() == 23  # the same keys as in the two-model reference
    assert_same_results(results_table(out), expected)
    assert not (out / "driver.lock").exists()


def test_grown_grid_runs_only_new_trials_and_a_changed_suite_gets_new_keys(assets, tmp_path):
    def study(languages, max_tokens=256):
        path = light_demo_study(tmp_path, models=("demo-llama",), languages=languages,
                                pruners=[{"method": "wanda", "sparsity": 0.5}])
        data = yaml.safe_load(path.read_text())
        data["evaluation"]["perplexity"]["max_tokens"] = max_tokens
        path.write_text(yaml.safe_dump(data))
        return path

    out = tmp_path / "runs" / "light"
    assert run_study(study(["en", "sw"]), RunOptions(num_cpus=2, progress=False)).code == 0
    first_keys = plan_keys(out)
    assert len(first_keys) == 3  # dense + wanda x 2 languages
    assert run_study(study(["en", "sw", "de"]), RunOptions(num_cpus=2, progress=False)).code == 0
    evs = events(out)
    new = plan_keys(out) - first_keys
    assert len(new) == 1 and {e["key"] for e in of_kind(evs, "started", runs(evs)[-1])} == new
    assert len(list(out.glob("study*.yaml"))) == 2  # each version of the study file kept

    assert run_study(study(["en", "sw", "de"], max_tokens=192), RunOptions(num_cpus=2, progress=False)).code == 0
    third = plan_keys(out)
    assert not third & (first_keys | new)  # a changed evaluation suite changes every key
    frame = pl.read_parquet(out / "results.parquet")
    assert set(frame.filter(pl.col("current"))["key"]) == third
    assert set(frame.filter(~pl.col("current"))["key"]) == first_keys | new  # old results stay readable


def test_failures_are_retried_dead_and_stuck_workers_replaced(assets, tmp_path, monkeypatch):
    path = light_demo_study(tmp_path, models=("demo-llama",), languages=["en", "de", "sw"],
                            pruners=[{"method": "wanda", "sparsity": 0.5}], trial_timeout_s=20)
    faults = [{"match": "cal-en", "kind": "raise", "attempts": 1},
              {"match": "cal-de", "kind": "exit", "attempts": 1},  # the worker process dies
              {"match": "cal-sw", "kind": "hang", "attempts": 1},  # stuck past the timeout
              {"match": "dense", "kind": "raise", "attempts": 9}]  # fails on every attempt
    monkeypatch.setenv("SWEEP_INJECT_FAULTS", json.dumps(faults))
    out = tmp_path / "runs" / "light"
    outcome = run_study(path, RunOptions(num_cpus=2, progress=False))
    assert outcome.code == 1 and outcome.finished == 3 and outcome.failed == 1
    evs = events(out)
    failed = {e["name"]: e for e in of_kind(evs, "failed")}
    assert "injected fault" in failed["demo-llama.wanda.s50.cal-en.seed0"]["error"]
    assert "RuntimeError" in failed["demo-llama.wanda.s50.cal-en.seed0"]["traceback"]
    assert "worker died" in failed["demo-llama.wanda.s50.cal-de.seed0"]["error"]
    assert "timed out after 20 s" in failed["demo-llama.wanda.s50.cal-sw.seed0"]["error"]
    dense = [e for e in of_kind(evs, "failed") if e["name"] == "demo-llama.dense"]
    assert [e["attempt"] for e in dense] == [1, 2] and [e["final"] for e in dense] == [False, True]
    finished = {e["name"]: e["attempt"] for e in of_kind(evs, "finished")}
    assert finished == {f"demo-llama.wanda.s50.cal-{c}.seed0": 2 for c in ("en", "de", "sw")}
    assert of_kind(evs, "run_finished")[-1]["actors_lost"] == 1

    status = sweep_cli("status", str(out), "--failures")
    assert "3/4 done, 0 running, 1 failed, 0 left" in status.stdout
    assert "demo-llama.dense  attempt 2 (gave up): RuntimeError: injected fault" in status.stdout
    assert "Traceback" in status.stdout

    monkeypatch.delenv("SWEEP_INJECT_FAULTS")
    skipped = run_study(path, RunOptions(num_cpus=2, progress=False))
    assert skipped.code == 1 and skipped.finished == 0  # a trial that gave up is not retried by default...
    retried = run_study(path, RunOptions(num_cpus=2, progress=False, retry_failed=True))
    assert retried.code == 0 and retried.finished == 1  # ...unless asked
    assert [e["attempt"] for e in of_kind(events(out), "finished") if e["name"] == "demo-llama.dense"] == [3]


def test_a_second_driver_refuses_and_writes_nothing(assets, tmp_path):
    path = light_demo_study(tmp_path, models=("demo-llama",), languages=["en"])
    out = tmp_path / "runs" / "light"
    holder = StudyStore(out)
    holder.acquire()
    try:
        second = sweep_cli("run", str(path), "--no-progress")
    finally:
        holder.release()
    assert second.returncode == 3
    assert f"in use by another driver (pid {os.getpid()}" in second.stderr
    assert sorted(p.name for p in out.iterdir()) == []  # no log, no plan, no frozen study


def test_cut_off_last_line_is_reported_and_its_trial_runs_again(assets, tmp_path):
    path = light_demo_study(tmp_path, models=("demo-llama",), languages=["en", "sw"],
                            pruners=[{"method": "wanda", "sparsity": 0.5}])
    out = tmp_path / "runs" / "light"
    assert run_study(path, RunOptions(num_cpus=2, progress=False)).code == 0
    log = next((out / "events").glob("*.jsonl"))
    lines = log.read_bytes().split(b"\n")[:-1]
    last_finished = max(i for i, line in enumerate(lines) if b'"event": "finished"' in line)
    cut_key = json.loads(lines[last_finished])["key"]
    log.write_bytes(b"\n".join(lines[:last_finished]) + b"\n" + lines[last_finished][:40])  # killed mid-write

    status = sweep_cli("status", str(out))
    assert f"{log.name} ends in a cut-off line" in status.stdout and "2/3 done" in status.stdout
    again = sweep_cli("run", str(path), "--num-cpus", "2", "--no-progress")
    assert again.returncode == 0 and f"{log.name} ends in a cut-off line" in again.stderr
    evs = events(out)
    assert {e["key"] for e in of_kind(evs, "started", runs(evs)[-1])} == {cut_key}


def test_study_directory_on_object_storage(assets, tmp_path):
    """A file:// URL goes through fsspec, the same path as s3:// and gs://: no appends, no exclusive create."""
    path = light_demo_study(tmp_path, models=("demo-llama",), languages=["en", "sw"],
                            pruners=[{"method": "sparsegpt", "sparsity": 0.5}])
    url = f"file://{tmp_path}/bucket/light"
    assert run_study(path, RunOptions(out=url, num_cpus=2, progress=False)).code == 0
    root = tmp_path / "bucket" / "light"
    assert sorted(p.name for p in (root / "events").iterdir())[0].endswith("-00000.jsonl")
    finished = of_kind(events(url), "finished")
    assert len(finished) == 3
    masks = [e["pruning"]["mask_sample_path"] for e in finished if e.get("pruning")]
    assert len(masks) == 2 and all(m.startswith(url) for m in masks)
    assert all((root / m.removeprefix(f"{url}/")).is_file() for m in masks)
    assert not list(root.rglob("*.tmp"))
    assert pl.read_parquet(root / "results.parquet").height == 3 * 7 * 3
    again = run_study(path, RunOptions(out=url, num_cpus=2, progress=False))
    assert again.code == 0 and len(runs(events(url))) == 1  # all done: nothing started


def test_sigterm_stops_cleanly_and_the_next_run_continues(assets, tmp_path):
    path = light_demo_study(tmp_path, models=("demo-llama",), pruners=[{"method": "wanda", "sparsity": 0.5}])
    out = tmp_path / "runs" / "light"
    driver = spawn_sweep("run", str(path), "--num-cpus", "2", log=tmp_path / "driver.log")
    try:
        wait_for_finished(out, 3, driver)
        driver.send_signal(signal.SIGTERM)
        assert driver.wait(timeout=60) == 130
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    log = (tmp_path / "driver.log").read_text()
    assert "stopping (SIGTERM): no new trials; run again to continue" in log
    evs = events(out)
    assert evs[-1]["event"] == "run_stopped" and not (out / "driver.lock").exists()
    done = {e["key"] for e in of_kind(evs, "finished")}
    assert 3 <= len(done) < 8
    again = run_study(path, RunOptions(num_cpus=2, progress=False))
    assert again.code == 0 and again.finished == 8 - len(done)
    assert not {e["key"] for e in of_kind(events(out), "started", runs(events(out))[-1])} & done


def test_bad_study_directory_url_is_refused_before_any_work(assets, tmp_path):
    path = light_demo_study(tmp_path, models=("demo-llama",), languages=["en"])
    result = sweep_cli("run", str(path), "--out", "nosuchscheme://bucket/study")
    assert result.returncode == 2 and "--out / execution.output_dir" in result.stderr
    assert "nosuchscheme" in result.stderr and not (tmp_path / "runs").exists()


def test_analyses_of_the_demo_grid_appear_in_the_report(reference, tmp_path):
    from sweep.results.report import build_report

    _, out, _ = reference
    page = build_report(out, tmp_path / "report").read_text(encoding="utf-8")
    for heading in ("Pruning masks: overlap between calibration languages", "Layer-wise pruning error on held-out text",
                    "Language-specific neurons (LAPE)", "Latent subspaces: language-specific vs language-agnostic"):
        assert heading in page
    tables = tmp_path / "report" / "tables"
    overlap = pl.read_parquet(tables / "analysis-mask_overlap.parquet")
    assert overlap.filter(pl.col("matrix") == "all")["iou"].is_between(0.3, 0.999).all()
    assert set(overlap["calibration_a"]) | set(overlap["calibration_b"]) == {"ar", "de", "en", "es", "ru", "sw", "zh"}
    # the study's question on the demo model: the target language's own calibration disturbs its layers least
    errors = pl.read_parquet(tables / "analysis-layer_error.parquet").filter(
        (pl.col("model") == "demo-llama") & (pl.col("pruner") == "wanda") & (pl.col("sparsity") == "0.5"))
    mean = errors.group_by("calibration", "target").agg(pl.col("relative_error").mean())
    best = mean.sort("relative_error").group_by("target").agg(pl.col("calibration").first())
    assert (best["calibration"] == best["target"]).sum() >= 5
    neurons = pl.read_parquet(tables / "analysis-neurons.parquet")
    dense = neurons.filter(pl.col("pruner") == "dense").row(0, named=True)
    assert dense["survive"] == dense["dense"] > 0 and dense["vanish"] == dense["appear"] == 0
    pruned = neurons.filter(pl.col("pruner") != "dense")
    assert (pruned["survive"] + pruned["vanish"] == pruned["dense"]).all() and (pruned["vanish"] > 0).any()
    snr = pl.read_parquet(tables / "analysis-snr.parquet")
    assert snr["snr_specific_db"].is_finite().all() and snr["snr_agnostic_db"].is_finite().all()
    # compact per trial: sampled masks, statistics, and the units every mean averages over
    artifacts = [p for p in (out / "artifacts").rglob("*.safetensors")]
    assert {p.name for p in artifacts} == {"mask_sample.safetensors", "statistics.safetensors", "units.safetensors"}
    # every comparison tested on those units: no perplexity verdict is left untested
    ranks = pl.read_parquet(tables / "ranks.parquet").filter(pl.col("task") == "perplexity")
    assert ranks.height and ranks["verdict"].is_not_null().all() and not (ranks["verdict"] == "untested").any()
    assert ranks["p_value"].is_between(0, 1).all() and (ranks["margin_low"] <= ranks["margin_high"]).all()
    pairs = pl.read_parquet(tables / "significance-pairs.parquet")
    assert pairs.filter(pl.col("task") == "perplexity")["p_value"].is_not_null().all()
    assert "two-sided at 0.05" in page  # the findings say how they were tested


def test_an_actor_larger_than_any_node_is_reported_unschedulable_not_left_hanging(assets, tmp_path, monkeypatch, capsys):
    path = light_demo_study(tmp_path, models=("demo-llama",), languages=["en"],
                            pruners=[{"method": "wanda", "sparsity": 0.5}], placement_timeout_s=3)
    study = yaml.safe_load(path.read_text())
    study["models"][0]["gpus"] = 4  # 4 GPUs per replica; the nodes have 2 each (4 in all)
    path.write_text(yaml.safe_dump(study))
    with in_process_cluster(monkeypatch, {"num_cpus": 1, "num_gpus": 2}, {"num_cpus": 1, "num_gpus": 2}) as (cluster, _):
        started = time.monotonic()
        outcome = run_study(path, RunOptions(address=cluster.address, progress=False, shared_dir=True))
        seconds = time.monotonic() - started
    assert outcome.code == 1 and outcome.failed == 2 and seconds < 120
    err = capsys.readouterr().err
    assert "needs 4 GPU + 1 CPU per replica on one node, and no live node has that (the largest live node has 2 GPUs)" in err
    evs = events(tmp_path / "runs" / "light")
    failed = of_kind(evs, "failed")
    assert len(failed) == 2 and all(e["final"] and e["error"].startswith("unschedulable") for e in failed)
    assert not of_kind(evs, "started")


def test_accelerator_type_keeps_a_model_on_nodes_with_those_gpus(assets, tmp_path, monkeypatch):
    """Two 2-GPU nodes, one advertising H100s: a model asking for H100 runs only there; a model asking for
    a type no node has is reported unschedulable."""
    path = light_demo_study(tmp_path, models=("demo-llama",), languages=["en", "de"],
                            pruners=[{"method": "wanda", "sparsity": 0.5}], placement_timeout_s=3)
    study = yaml.safe_load(path.read_text())
    study["models"][0].update(gpus=1, accelerator_type="H100")
    path.write_text(yaml.safe_dump(study))
    nodes = ({"num_cpus": 2, "num_gpus": 2}, {"num_cpus": 2, "num_gpus": 2, "resources": {"accelerator_type:H100": 1}})
    with in_process_cluster(monkeypatch, *nodes) as (cluster, (_, h100)):
        outcome = run_study(path, RunOptions(address=cluster.address, progress=False, shared_dir=True))
        study["models"][0]["accelerator_type"] = "A100-80G"
        study["name"] = "light-a100"
        path.write_text(yaml.safe_dump(study))
        missing = run_study(path, RunOptions(address=cluster.address, progress=False, shared_dir=True))
    assert outcome.code == 0
    finished = of_kind(events(tmp_path / "runs" / "light"), "finished")
    assert len(finished) == 3 and {e["node"] for e in finished} == {h100.node_id}
    assert missing.code == 1
    failed = of_kind(events(tmp_path / "runs" / "light-a100"), "failed")
    assert failed and all("no live node has A100-80G GPUs" in e["error"] for e in failed)


def test_saved_pruned_model_loads_and_gives_the_same_perplexity(assets, tmp_path):
    from engine.evaluate.suite import perplexity_of_tokens
    from engine.models import ModelSource
    from engine.trial import load
    from sweep.study.load import load_study
    from sweep.study.trials import evaluation_config

    path = light_demo_study(tmp_path, models=("demo-llama",), languages=["sw"],
                            pruners=[{"method": "wanda", "sparsity": 0.5}])
    study = yaml.safe_load(path.read_text())
    study["save_models"] = {"enabled": True}
    path.write_text(yaml.safe_dump(study))
    assert run_study(path, RunOptions(num_cpus=2, progress=False)).code == 0
    finished = {e["name"]: e for e in of_kind(events(tmp_path / "runs" / "light"), "finished")}
    pruned = finished["demo-llama.wanda.s50.cal-sw.seed0"]
    assert finished["demo-llama.dense"].get("saved_model") is None  # only pruned models are saved
    folder = Path(pruned["saved_model"])
    card = (folder / "README.md").read_text()
    assert "pruned with **wanda** to sparsity **0.5**" in card and "calibrated on\n**sw** text" in card
    assert "| sw | perplexity | bits_per_byte |" in card

    loaded = load(ModelSource(str(folder), dtype="float32"))
    weight = loaded.model.model.layers[0].mlp.down_proj.weight
    assert abs(float((weight == 0).float().mean()) - 0.5) < 0.01  # the zeros were saved
    perplexity = evaluation_config(load_study(path)).perplexity
    ids, n_bytes = loaded.evaluation_tokens(perplexity, "sw")
    result = perplexity_of_tokens(loaded.model, loaded.tokenizer, ids, n_bytes, perplexity.window, 16)
    logged = next(m["value"] for m in pruned["metrics"] if m["language"] == "sw" and m["metric"] == "bits_per_byte")
    assert result.bits_per_byte == pytest.approx(logged, rel=1e-6)
