"""`sweep push DIR`: a real study directory (one demo model, a dense baseline, Wanda calibrated in Swahili and
magnitude, models saved) is pushed, through the sub-command `sweep.cli.push.register` adds to a parser:

- `--dry-run` lists each saved model's folder and the repository the study's `save_models.hub_repo`
  template names for it (checked against `sweep.study.trials.hub_repo` on the study as loaded), and writes
  nothing;
- an upload to an unreachable hub fails with a one-line message naming the endpoint, exit 1, and writes no
  marker; no token, no template, a URL and a directory without saved models are refused before any upload;
- a trial with a marker (`artifacts/<key>/pushed.json`) of its latest run is skipped, and tried again once
  it has run again (no upload can succeed offline, so a successful upload itself is not exercised here);
- the uploaded card names a hub id as `base_model`, never a local path.

Each test works on its own copy of the study directory, which also checks that a moved directory's models
are found under it rather than at the paths the workers logged.
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from sweep.cli.push import register
from sweep.share.push import MARKER, PushMarker, hub_card, plan_push, write_marker
from sweep.store.study_store import StudyStore
from tests.conftest import environment, light_demo_study

TEMPLATE = "me/{study}-{model}-{pruner}-{sparsity}-cal-{calibration}-seed{seed}"


def sweep_push(*args: str) -> int:
    parser = argparse.ArgumentParser(prog="sweep")
    register(parser.add_subparsers(dest="command", required=True))
    parsed = parser.parse_args(["push", *map(str, args)])
    return parsed.func(parsed)


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    """(study file, study directory) of a finished study with saved models."""
    from engine.demo import ensure_demo_assets
    from sweep.execution.driver import RunOptions, run_study

    ensure_demo_assets()
    root = tmp_path_factory.mktemp("push")
    path = light_demo_study(root, name="push", models=("demo-llama",), languages=["sw"],
                            pruners=[{"method": "wanda", "sparsity": 0.5}, {"method": "magnitude", "sparsity": 0.5}])
    study = yaml.safe_load(path.read_text())
    study["save_models"] = {"enabled": True, "hub_repo": TEMPLATE, "private": True}
    path.write_text(yaml.safe_dump(study))
    assert run_study(path, RunOptions(num_cpus=2, progress=False)).code == 0  # local models and text: no hub
    return path, root / "runs" / "push"


@pytest.fixture
def online(monkeypatch):
    """huggingface_hub's offline switch off, whatever the environment was when it was first imported."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


@pytest.fixture
def study_dir(study_run, tmp_path) -> Path:
    copy = tmp_path / "study"
    shutil.copytree(study_run[1], copy)
    return copy


def expected_repos(study_file: Path) -> dict[str, str]:
    """key -> repository, from the study file as `sweep run` loads it."""
    from sweep.study.grid import expand
    from sweep.study.load import load_study
    from sweep.study.trials import hub_repo

    study = load_study(study_file)
    return {t.key: hub_repo(study, t) for t in expand(study).trials if not t.is_dense}


def markers(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"artifacts/*/{MARKER}"))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


@pytest.mark.slow
def test_dry_run_lists_each_saved_model_and_its_repository(study_run, study_dir, capsys):
    repos = expected_repos(study_run[0])
    assert len(repos) == 2 and all(r.startswith("me/push-demo-llama-") for r in repos.values())
    assert sweep_push(study_dir, "--dry-run") == 0
    out = capsys.readouterr().out
    for key, repo in repos.items():
        assert f"{study_dir / 'artifacts' / key / 'model'} -> {repo} (private)" in out
    assert "me/push-demo-llama-magnitude-s50-cal-none-seed0" in repos.values()
    assert "2 model(s) would be uploaded" in out and not markers(study_dir)
    assert sweep_push(study_dir, "--dry-run", "--public") == 0 and "(public)" in capsys.readouterr().out


@pytest.mark.slow
def test_an_unreachable_hub_fails_clearly_and_writes_no_marker(study_dir, online, capsys):
    port = closed_port()
    with environment({"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_TOKEN": "hf_dummy_token_for_tests"}):
        code = sweep_push(study_dir)
    err = capsys.readouterr().err
    assert code == 1
    assert f"cannot reach the hub at http://127.0.0.1:{port}" in err and "run sweep push again" in err
    assert len(err.strip().splitlines()) == 1, err
    assert not markers(study_dir)


@pytest.mark.slow
def test_refusals_name_what_to_do(study_run, study_dir, online, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    assert sweep_push(study_dir) == 2
    assert "no Hugging Face token: set HF_TOKEN" in capsys.readouterr().err

    without = yaml.safe_load(study_run[0].read_text())
    without["save_models"] = {"enabled": True}
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(without))
    assert sweep_push(study_dir, "--study", tmp_path / "plain.yaml", "--dry-run") == 2
    assert "save_models.hub_repo is not set" in capsys.readouterr().err

    assert sweep_push("s3://bucket/study", "--dry-run") == 2
    assert "is a URL" in capsys.readouterr().err

    dense_key = next(e.key for e in StudyStore(study_dir).state().finished.values() if e.trial.dense)
    assert sweep_push(study_dir, "--only-key", dense_key, "--dry-run") == 2
    assert "names no finished pruned trial with a saved model" in capsys.readouterr().err


def test_a_directory_without_saved_models_is_refused(tmp_path, capsys):
    """A study directory with no finished trial yet: nothing to push, and the message says why."""
    study = yaml.safe_load(light_demo_study(tmp_path, name="empty").read_text())
    study["save_models"] = {"enabled": True, "hub_repo": TEMPLATE}
    directory = tmp_path / "runs" / "empty"
    directory.mkdir(parents=True)
    (directory / "study.yaml").write_text(yaml.safe_dump(study))
    assert sweep_push(directory, "--dry-run") == 2
    err = capsys.readouterr().err
    assert "no saved models to push" in err and "save_models.enabled: true" in err


@pytest.mark.slow
def test_a_pushed_trial_is_skipped_until_it_runs_again(study_run, study_dir, online, capsys):
    """The hub is unreachable here, so every upload attempted fails: a push that exits 0 tried nothing."""
    repos = expected_repos(study_run[0])
    wanda = next(key for key, repo in repos.items() if "-wanda-" in repo)
    item = next(i for i in plan_push(study_dir).items if i.key == wanda)
    assert not item.done and item.marker_path == study_dir / "artifacts" / wanda / MARKER
    finished = PushMarker(repo=repos[wanda], revision="0" * 40, private=True, endpoint="https://huggingface.co",
                          pushed_at="2026-11-30T00:00:00Z", trial_finished_at=item.finished_at)
    write_marker(item, finished)
    port = closed_port()
    with environment({"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_TOKEN": "hf_dummy_token_for_tests"}):
        assert sweep_push(study_dir, "--only-key", wanda[:12]) == 0
        assert "nothing to push" in capsys.readouterr().out
        assert sweep_push(study_dir, "--dry-run") == 0
        out = capsys.readouterr().out
        assert f"-> {repos[wanda]}: pushed" in out and "1 model(s) would be uploaded" in out

        # The trial ran again since (sweep forget + run): the marker is of the earlier run, so it goes again.
        write_marker(item, replace(finished, trial_finished_at=1.0))
        assert sweep_push(study_dir, "--only-key", wanda) == 1
        assert f"cannot reach the hub at http://127.0.0.1:{port}" in capsys.readouterr().err
    assert PushMarker.from_json(json.loads(item.marker_path.read_text())).trial_finished_at == 1.0  # untouched


def test_the_uploaded_card_names_a_hub_id_as_base_model():
    card = ("---\nbase_model: /data/models/gemma3-270m\nlicense: gemma\npruning:\n  method: wanda\n"
            "  base_model_hub_id: google/gemma-3-270m\n---\n# m\n")
    assert yaml.safe_load(hub_card(card).split("---")[1])["base_model"] == "google/gemma-3-270m"
    assert "base_model:" not in hub_card(card.replace("  base_model_hub_id: google/gemma-3-270m\n", ""))
    assert hub_card(card.replace("/data/models/gemma3-270m", "org/base")).count("base_model: org/base") == 1
