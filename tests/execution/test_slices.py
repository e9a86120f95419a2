"""Cheap first steps and second thoughts: `sweep run --only` (a slice with the study's own keys),
`sweep run --smoke` (one tiny trial per model, in a directory of its own), `sweep forget` (trials run
again, recorded as an event, nothing deleted), and the study directories refused before any work."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from sweep.cli.main import main
from sweep.store.study_store import StudyStore
from sweep.store.visibility import SentinelCheck, local_dir_refusal, sentinel_problem, working_dir_copy, write_sentinel
from sweep.study.slices import SliceError, SliceFields, TrialSlice
from tests.conftest import REPO, light_demo_study

# -- slices, without running anything ----------------------------------------------------------------
TRIALS = [SliceFields("m1", "dense", "0", None, None), SliceFields("m1", "wanda", "0.5", "de", 0),
          SliceFields("m1", "wanda", "0.5", "en", 0), SliceFields("m1", "sparsegpt", "2:4", "de", 1),
          SliceFields("m2", "dense", "0", None, None), SliceFields("m2", "wanda", "0.5", "de", 0)]


def test_a_slice_keeps_the_baselines_of_its_models_when_running_but_not_when_forgetting():
    only = TrialSlice.parse("model=m1, pruner=wanda, calibration=de|en")
    assert only.select(TRIALS) == [0, 1, 2]
    assert only.select(TRIALS, baselines_follow_model=False) == [1, 2]
    assert TrialSlice.parse("pruner=dense").select(TRIALS) == [0, 4]
    assert TrialSlice.parse("seed=1").select(TRIALS) == [0, 3, 4]
    assert TrialSlice.parse("sparsity=2:4").select(TRIALS, baselines_follow_model=False) == [3]


@pytest.mark.parametrize("text, message", [
    ("model", "is not FIELD=VALUE"),
    ("size=8b", "unknown field 'size'"),
    ("model=m1,model=m2", "given twice"),
    (",", "selects nothing"),
    ("calibration=fr", "calibration=fr matches no trial of the study; its calibration values are de, en"),
    ("model=m3|m1", "model=m3 matches no trial"),
])
def test_bad_slices_name_the_field_and_what_the_study_has(text, message):
    with pytest.raises(SliceError, match=message.replace("|", r"\|")):
        TrialSlice.parse(text).select(TRIALS)


# -- where a study directory may be -------------------------------------------------------------------
def test_a_directory_inside_rays_working_dir_copy_is_refused_on_any_cluster(tmp_path):
    copy = tmp_path / "ray" / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_ab12"
    assert working_dir_copy(copy / "runs" / "study") == copy
    assert working_dir_copy(tmp_path / "runs" / "study") is None
    assert "Ray's temporary copy" in local_dir_refusal(copy / "runs" / "x", on_cluster=False, shared=True)
    assert "--shared-dir" in local_dir_refusal(tmp_path / "x", on_cluster=True, shared=False)
    assert local_dir_refusal(tmp_path / "x", on_cluster=True, shared=True) is None
    assert local_dir_refusal(tmp_path / "x", on_cluster=False, shared=False) is None


def test_the_sentinel_tells_the_drivers_directory_from_a_copy_or_nothing(tmp_path):
    check = write_sentinel(tmp_path)
    assert sentinel_problem(check) is None
    assert "holds another token" in sentinel_problem(SentinelCheck(check.path, "0" * 32))
    missing = sentinel_problem(SentinelCheck(str(tmp_path / "elsewhere" / "sentinel.json"), check.token))
    assert "cannot see the study directory" in missing and "--shared-dir" in missing


@pytest.fixture(scope="module")
def assets():
    from engine.demo import ensure_demo_assets

    return ensure_demo_assets(log=print)


@pytest.mark.slow
def test_working_dir_copy_refused_before_anything_is_written(assets, tmp_path, capsys):
    study = light_demo_study(tmp_path, models=("demo-llama",), languages=["en"])
    out = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_ab12" / "runs" / "light"
    assert main(["run", str(study), "--out", str(out), "--no-progress"]) == 2
    assert "lies inside Ray's temporary copy of the job's working directory" in capsys.readouterr().err
    assert not out.exists()


# -- slices, forget and smoke, run -------------------------------------------------------------------
def finished_counts(out: Path) -> Counter:
    return Counter(e.key for e in StudyStore(out).read_events().events if e.KIND == "finished")


@pytest.mark.slow
def test_slice_then_whole_study_then_forget_reruns_exactly_what_was_named(assets, tmp_path, capsys):
    study = light_demo_study(tmp_path, models=("demo-llama",), languages=["en", "sw"])
    out = tmp_path / "runs" / "light"
    run = ["run", str(study), "--no-progress", "--num-cpus", "2"]
    plan = {t["name"]: t["key"] for t in json.loads(_stdout(capsys, ["plan", str(study), "--json"]))["trials"]}
    assert len(plan) == 8

    assert main([*run, "--only", "pruner=wanda,calibration=sw"]) == 0
    said = capsys.readouterr().out
    assert "slice --only pruner=wanda,calibration=sw: 3 of the 8 trials" in said, said
    sliced = {"demo-llama.dense", "demo-llama.wanda.s50.cal-sw.seed0", "demo-llama.wanda.2of4.cal-sw.seed0"}
    assert set(finished_counts(out)) == {plan[name] for name in sliced}
    assert StudyStore(out).read_plan().keys == set(plan.values())  # plan.json is the whole study
    status = status_of(out)
    assert "3/8 done" in status and "5 left" in status, status

    assert main(run) == 0  # the whole study reuses the slice's trials: same keys
    assert "3 finished earlier, 0 failed earlier, 5 to run" in capsys.readouterr().out
    assert set(finished_counts(out)) == set(plan.values())

    # Forget: a typo changes nothing; a dry run changes nothing; then the two sw wanda trials run again.
    events_before = len(StudyStore(out).read_events().events)
    assert main(["forget", str(out), "calibration=de"]) == 2
    assert "calibration=de matches no trial of the study; its calibration values are en, sw" in capsys.readouterr().err
    assert main(["forget", str(out), "pruner=wanda,calibration=sw", "--dry-run"]) == 0
    assert "dry run: 2 trial(s) would run again" in capsys.readouterr().out
    assert len(StudyStore(out).read_events().events) == events_before
    with StudyStore(out):  # a running driver holds the lock: forget waits its turn
        assert main(["forget", str(out), "pruner=wanda,calibration=sw"]) == 3
        assert "between runs" in capsys.readouterr().err
    assert main(["forget", str(out), "pruner=wanda,calibration=sw", "--reason", "bad sw text"]) == 0
    forgotten = [e for e in StudyStore(out).read_events().events if e.KIND == "forgotten"]
    assert len(forgotten) == 1 and forgotten[0].reason == "bad sw text"
    assert set(forgotten[0].keys) == {plan["demo-llama.wanda.s50.cal-sw.seed0"],
                                      plan["demo-llama.wanda.2of4.cal-sw.seed0"]}
    status = status_of(out)
    assert "6/8 done" in status, status
    results = StudyStore(out).results_frame()
    assert not set(forgotten[0].keys) & set(results["key"].to_list()), "forgotten results still read as results"

    assert main(run) == 0
    assert "6 finished earlier, 0 failed earlier, 2 to run" in capsys.readouterr().out
    counts = finished_counts(out)
    assert {k for k, n in counts.items() if n == 2} == set(forgotten[0].keys)  # history kept, each rerun once
    assert set(StudyStore(out).results_frame()["key"].to_list()) == set(plan.values())
    assert main(["forget", str(out), "*.magnitude.*", "--dry-run"]) == 0
    assert "demo-llama.magnitude.s50" in capsys.readouterr().out


@pytest.mark.slow
def test_smoke_runs_one_tiny_trial_per_model_beside_the_study_directory(assets, tmp_path, capsys):
    study = light_demo_study(tmp_path)
    out = tmp_path / "runs" / "light"
    assert main(["run", str(study), "--smoke", "--no-progress", "--num-cpus", "2"]) == 0
    said = capsys.readouterr().out
    smoke = tmp_path / "runs" / "light-smoke"
    assert not out.exists(), "the smoke run touched the study directory"
    names = sorted(e.name for e in StudyStore(smoke).state().finished.values())
    # One per model, and the heaviest kind: SparseGPT gathers Hessians beside the calibration pass.
    assert names == ["demo-cohere.sparsegpt.s50.cal-ar.seed0", "demo-llama.sparsegpt.s50.cal-ar.seed0"], names
    frozen = yaml.safe_load((smoke / "study.yaml").read_text())
    assert frozen["calibration"]["samples"] == 4 and frozen["evaluation"]["perplexity"]["max_tokens"] == 256
    assert "smoke passed; the real run: sweep run" in said and "calibration" in said and "model load" in said, said
    # The real study's keys differ (its budgets are not the smoke's): nothing of the smoke is reused.
    real = {t["key"] for t in json.loads(_stdout(capsys, ["plan", str(study), "--json"]))["trials"]}
    assert not real & set(StudyStore(smoke).state().finished)

    # A second smoke runs again (a smoke that passed once says nothing of later code or nodes).
    assert main(["run", str(study), "--smoke", "--no-progress", "--num-cpus", "2"]) == 0
    assert "2 finished earlier" not in capsys.readouterr().out
    assert sorted(finished_counts(smoke).values()) == [2, 2]


def status_of(out: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "sweep.cli.main", "status", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _stdout(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 0
    return capsys.readouterr().out
