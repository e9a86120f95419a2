"""`sweep export DIR --to wandb|mlflow`: a real study directory (written through StudyStore, no models run) is
exported to an MLflow file store and to an offline W&B run, and read back with each tool's own data: one run per
study, one nested MLflow run per finished trial, values equal to the events', failures listed, and re-exports
that update instead of duplicating. The pure translation is checked without either library."""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import posixpath
import re
import struct
import sys
from pathlib import Path

import pytest

from sweep.cli.export import register
from sweep.exit_codes import ExitCode
from sweep.share.export_records import build_export, metrics_table, read_export
from sweep.share.to_mlflow import mlflow_keys
from sweep.share.to_wandb import wandb_run_id
from sweep.store.records import (
    ActorLost,
    ModelLoaded,
    PlannedTrial,
    PlanRecord,
    RunEnded,
    RunStarted,
    TrialFailed,
    TrialFinished,
    TrialsForgotten,
    TrialStarted,
)
from sweep.store.study_store import StudyStore

STUDY = "export-study"
TRIALS = {t.key: t for t in (
    PlannedTrial("m1", "dense", "0", None, None, True, key="ka", name="m1.dense"),
    PlannedTrial("m1", "wanda", "0.5", "en", 0, False, key="kb", name="m1.wanda.s50.cal-en.seed0"),
    PlannedTrial("m1", "wanda", "0.5", "sw", 0, False, key="kc", name="m1.wanda.s50.cal-sw.seed0"),
    PlannedTrial("m1", "wanda", "2:4", "en", 0, False, key="kd", name="m1.wanda.2-4.cal-en.seed0"),
    PlannedTrial("m1", "wanda", "2:4", "sw", 0, False, key="ke", name="m1.wanda.2-4.cal-sw.seed0"),
)}
# A trial of an earlier version of the study (another evaluation suite): finished, but not in plan.json
OLD = PlannedTrial("m1", "magnitude", "0.5", None, None, False, key="kx", name="m1.magnitude.s50")
# What each finished trial's latest finished event says: "kb" finished twice, first with 3.0
FINAL = {"ka": 2.0, "kb": 2.5, "kc": 2.2, "kx": 9.0}
ERROR = "RuntimeError: CUDA out of memory\nTraceback (most recent call last): ..."


def metrics(base: float) -> list[dict]:
    # lm-eval's metric names carry a filter after a comma ("acc,none"), which MLflow refuses in a name
    return [{"language": "en", "task": "perplexity", "metric": "bits_per_byte", "value": base},
            {"language": "de", "task": "perplexity", "metric": "bits_per_byte", "value": base + 0.5},
            {"language": "de", "task": "belebele_deu_Latn", "metric": "acc,none", "value": 0.25 + base / 100,
             "stderr": 0.01}]


def timings(trial: PlannedTrial) -> dict[str, float]:
    return {"perplexity": 3.0} if trial.dense else {"calibration": 1.5, "pruning": 2.0, "perplexity": 3.0}


def finished(trial: PlannedTrial, base: float, attempt: int = 1) -> TrialFinished:
    return TrialFinished(key=trial.key, name=trial.name, model=trial.model, attempt=attempt, trial=trial.fields,
                         seconds=10.0 + base, metrics=metrics(base), timings=timings(trial), git="rev-trial")


def started(trial: PlannedTrial, attempt: int = 1) -> TrialStarted:
    return TrialStarted(key=trial.key, name=trial.name, model=trial.model, attempt=attempt, trial=trial.fields)


def failed(trial: PlannedTrial, final: bool, attempt: int = 1) -> TrialFailed:
    return TrialFailed(key=trial.key, name=trial.name, model=trial.model, attempt=attempt, trial=trial.fields,
                       final=final, error=ERROR if final else "transient: worker restarted")


def write_study(root: Path) -> None:
    """Two driver runs: a dense baseline, a trial finished twice (once in each run), a failure retried into a
    success, a trial given up on, a trial never run, and a trial of an earlier study version."""
    a, b, c, d = (TRIALS[k] for k in ("ka", "kb", "kc", "kd"))
    store = StudyStore(root)
    store.acquire()
    store.write_plan(PlanRecord(study=STUDY, trials=tuple(TRIALS.values()), languages=("de", "en"),
                                calibration_languages=("en", "sw")))
    for event in (RunStarted(study=STUDY, trials=5, git="rev1", versions={"torch": "2.13.0", "ray": "2.59"}),
                  ModelLoaded(model="m1", seconds=4.0),
                  started(OLD), finished(OLD, FINAL["kx"]),
                  started(a), finished(a, FINAL["ka"]),
                  started(b), finished(b, 3.0),
                  started(c), failed(c, final=False), started(c, 2), finished(c, FINAL["kc"], attempt=2),
                  started(d), failed(d, final=True),
                  RunEnded(seconds=50.0, finished=4, failed=1)):
        store.append(event)
    store.release()
    store = StudyStore(root)  # a second driver run: its own log
    store.acquire()
    for event in (RunStarted(study=STUDY, trials=5, git="rev2", versions={"torch": "2.13.0", "ray": "2.60"}),
                  ActorLost(model="m1", error="node died"),
                  started(b), finished(b, FINAL["kb"]),  # finished again (a retried duplicate): counts once
                  RunEnded(seconds=20.0, finished=1, failed=0)):
        store.append(event)
    store.release()


def finish_e(root: Path, base: float = 2.9) -> None:
    """A third driver run finishes the trial that was left."""
    store = StudyStore(root)
    store.acquire()
    for event in (RunStarted(study=STUDY, trials=5, git="rev2", versions={"torch": "2.13.0", "ray": "2.60"}),
                  started(TRIALS["ke"]), finished(TRIALS["ke"], base)):
        store.append(event)
    store.release()


@pytest.fixture
def study_dir(tmp_path) -> Path:
    root = tmp_path / "study"
    write_study(root)
    return root


def sweep_export(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="sweep")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["export", *argv])
    return args.func(args)


# ------------------------------------------------------------------------------------------- pure translation
def test_the_records_fold_the_event_log(study_dir):
    export = read_export(str(study_dir))
    assert {t.trial.key for t in export.trials} == set(FINAL)
    for t in export.trials:
        assert [(m.language, m.task, m.metric, m.value, m.stderr) for m in t.metrics] == [
            (m["language"], m["task"], m["metric"], m["value"], m.get("stderr")) for m in metrics(FINAL[t.trial.key])]
        source = TRIALS.get(t.trial.key, OLD)
        assert (t.trial.model, t.trial.pruner, t.trial.sparsity, t.trial.calibration, t.trial.seed, t.trial.dense,
                t.trial.name) == (source.model, source.pruner, source.sparsity, source.calibration, source.seed,
                                  source.dense, source.name)
        assert {s.stage: s.seconds for s in t.timings} == timings(source)
        assert t.trial.current == (t.trial.key != "kx")
    attempts = {t.trial.key: t.attempts for t in export.trials}
    assert attempts == {"ka": 1, "kb": 2, "kc": 2, "kx": 1}
    assert [(f.trial.key, f.attempts, f.error_line) for f in export.failures] == [
        ("kd", 1, "RuntimeError: CUDA out of memory")]
    s = export.summary
    assert (s.planned, s.done, s.failed, s.left, s.exported, s.attempts, s.failed_attempts) == (5, 3, 1, 1, 4, 7, 2)
    c = export.config
    assert (c.study, c.languages, c.calibration_languages, c.trials, c.models, c.pruners) == (
        STUDY, ("de", "en"), ("en", "sw"), 5, ("m1",), ("dense", "wanda"))
    assert (c.git, c.git_revisions, c.versions, c.driver_runs) == ("rev2", ("rev1", "rev2"),
                                                                  {"torch": "2.13.0", "ray": "2.60"}, 2)
    steps = [p.step for p in export.progress]
    assert steps == sorted(set(steps)) and len(steps) == 7  # one point per finished or failed event
    assert [(p.done, p.failed) for p in export.progress][-3:] == [(4, 0), (4, 1), (4, 1)]
    assert metrics_table(export).rows and len(metrics_table(export).rows) == 3 * len(FINAL)
    assert not export.warnings


def test_progress_leaves_out_what_sweep_forget_forgot():
    """Two trials finished, then one was forgotten (`sweep forget`): the progress series ends where the
    counts do, at one done, wherever the forget event falls in the logs."""
    a, b, d = TRIALS["ka"], TRIALS["kb"], TRIALS["kd"]
    plan = PlanRecord(study="s", trials=(a, b, d))

    def at(event, time):
        return dataclasses.replace(event, time=time)

    events = [at(RunStarted(study="s"), 1.0), at(started(a), 2.0), at(finished(a, 2.0), 3.0),
              at(started(b), 4.0), at(finished(b, 2.5), 5.0), at(started(d), 6.0), at(failed(d, final=True), 7.0)]
    forget = at(TrialsForgotten(keys=["kb", "kd"], until={"kb": 5.0, "kd": 7.0}, selection="kb,kd"), 8.0)
    for logs in (events + [forget], [forget] + events):  # a forget event logged before (another log) or after
        export = build_export(plan, logs, "/somewhere")
        last = export.progress[-1]
        assert (export.summary.done, export.summary.failed) == (1, 0)
        assert (last.done, last.failed) == (export.summary.done, export.summary.failed) == (1, 0)
        assert [p.done for p in export.progress] == [1, 1, 1] and last.failed_attempts == 1  # attempts stay
    # a finish after the forget counts again
    again = build_export(plan, events + [forget, at(started(b, 2), 9.0), at(finished(b, 2.6, 2), 10.0)], "/x")
    assert again.progress[-1].done == again.summary.done == 2


def test_no_finished_trial_is_a_warning_not_a_refusal():
    plan = PlanRecord(study="s", trials=(TRIALS["kd"],))
    export = build_export(plan, [started(TRIALS["kd"]), failed(TRIALS["kd"], final=True)], "/somewhere")
    assert not export.trials and [f.trial.key for f in export.failures] == ["kd"]
    assert any("no trial has finished" in w for w in export.warnings)


def test_mlflow_names_are_valid_unique_and_never_a_folder_of_another():
    wanted = [(("de", "t,1", "acc"), 1.0), (("de", "t;1", "acc"), 2.0),  # both become de/t_1/acc
              (("x",), 3.0), (("x", "y"), 4.0),  # "x" is a metric: it cannot also be a folder
              (("..", "", "a"), 5.0), (("zh", "x" * 300, "acc"), 6.0), (("ünï", "tâsk", "m"), 7.0)]
    keys = mlflow_keys(wanted)
    assert sorted(keys.values()) == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    assert "de/t_1/acc" in keys and "x" in keys and "_/_/a" in keys
    for key in keys:
        assert re.fullmatch(r"[A-Za-z0-9_.\- /]+", key) and posixpath.normpath(key) == key and len(key) <= 250
        parts = key.split("/")
        assert not any("/".join(parts[:i]) in keys for i in range(1, len(parts))), key


# ------------------------------------------------------------------------------------------------------- MLflow
def mlflow_runs(uri: str, experiment: str) -> list:
    import mlflow

    client = mlflow.MlflowClient(uri)
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=1000)


def check_mlflow_export(uri: str, expect: dict[str, float]) -> dict[str, str]:
    """The export as MLflow holds it equals the events; returns the run id of each role/key."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    runs = mlflow_runs(uri, STUDY)
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "study"]
    trials = [r for r in runs if r.data.tags.get("sweep.role") == "trial"]
    assert len(parents) == 1 and len(runs) == 1 + len(trials)
    parent = parents[0]
    done = {r.data.tags["sweep.trial_key"]: r for r in trials if r.info.status == "FINISHED"}
    gave_up = {r.data.tags["sweep.trial_key"]: r for r in trials if r.info.status == "FAILED"}
    assert set(done) == set(expect) and set(gave_up) == {"kd"} and len(trials) == len(expect) + 1
    assert parent.info.run_name == STUDY and parent.data.params["study"] == STUDY
    assert parent.data.params["languages"] == "de,en" and parent.data.params["git"] == "rev2"
    assert parent.data.params["versions.ray"] == "2.60" and parent.data.params["trials"] == "5"
    assert parent.data.metrics["trials/failed"] == 1 and parent.data.metrics["trials/planned"] == 5
    assert parent.data.metrics["trials/done"] == len(set(expect) & set(TRIALS))
    assert "m1.wanda.2-4.cal-en.seed0" in parent.data.tags["mlflow.note.content"]
    history = client.get_metric_history(parent.info.run_id, "progress/done")
    assert [m.step for m in history] == sorted({m.step for m in history})
    assert history[-1].value == len(expect)
    for key, run in done.items():
        source = TRIALS.get(key, OLD)
        assert run.info.run_name == source.name and run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        expected_params = {"key": key, "name": source.name, "model": source.model, "pruner": source.pruner,
                           "sparsity": source.sparsity, "dense": str(source.dense).lower(),
                           "current": str(key in TRIALS).lower()}
        expected_params.update({k: str(v) for k, v in (("calibration", source.calibration), ("seed", source.seed))
                                if v is not None})
        assert run.data.params == expected_params
        base = expect[key]
        m = run.data.metrics
        assert m["en/perplexity/bits_per_byte"] == base and m["de/perplexity/bits_per_byte"] == base + 0.5
        assert m["de/belebele_deu_Latn/acc_none"] == 0.25 + base / 100
        assert m["de/belebele_deu_Latn/acc_none_stderr"] == 0.01 and m["seconds"] == 10.0 + base
        assert {k.removeprefix("time/"): v for k, v in m.items() if k.startswith("time/")} == timings(source)
    assert done["kb"].data.metrics["attempts"] == 2  # finished twice: one run, the latest values
    assert gave_up["kd"].data.tags["sweep.error"] == ERROR
    return {"study": parent.info.run_id, **{k: r.info.run_id for k, r in {**done, **gave_up}.items()}}


def test_mlflow_export_reads_back_and_reexport_updates_in_place(study_dir, tmp_path, monkeypatch, capsys):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store behind this switch
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = (tmp_path / "mlruns").as_uri()
    assert sweep_export(str(study_dir), "--to", "mlflow", "--tracking-uri", uri) == ExitCode.OK
    first = check_mlflow_export(uri, FINAL)

    # Unchanged study: every run is kept as it is, none added
    assert sweep_export(str(study_dir), "--to", "mlflow", "--tracking-uri", uri) == ExitCode.OK
    assert "0 run(s) created" in capsys.readouterr().out
    assert check_mlflow_export(uri, FINAL) == first

    # The study moved on: the study run is replaced, the new trial added, unchanged trials keep their runs
    finish_e(study_dir)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the default for --tracking-uri
    assert sweep_export(str(study_dir), "--to", "mlflow") == ExitCode.OK
    third = check_mlflow_export(uri, {**FINAL, "ke": 2.9})
    assert third["study"] != first["study"]
    assert all(third[key] == first[key] for key in (*FINAL, "kd"))


def test_mlflow_sqlite_store(study_dir, tmp_path, monkeypatch):
    """The store MLflow 3 recommends; mlflow-skinny needs sqlalchemy and alembic beside it."""
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    pytest.importorskip("alembic")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert sweep_export(str(study_dir), "--to", "mlflow", "--tracking-uri", uri) == ExitCode.OK
    check_mlflow_export(uri, FINAL)


# ---------------------------------------------------------------------------------------------------------- W&B
def wandb_records(path: Path) -> list:
    """The records of an offline run's .wandb file: a LevelDB-style log (a 7-byte header, then 32 KiB blocks of
    chunks: CRC, length, type) of serialized `Record` protobufs, as wandb-core writes it."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<HB", data[4:7]) == (0xBEE1, 0)
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):  # full, first
            pending = chunk
        elif kind in (3, 4):  # middle, last
            pending += chunk
        if kind in (1, 4):
            records.append(pb.Record.FromString(pending))
    return records


def read_wandb_run(wandb_dir: Path) -> dict:
    """The newest offline run: its id, name, config, summary, history rows and the tables its summary names."""
    run_dir = max((wandb_dir / "wandb").glob("offline-run-*"), key=lambda p: p.name)
    out = {"config": {}, "summary": {}, "history": [], "dir": run_dir}
    for record in wandb_records(next(run_dir.glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.update(id=record.run.run_id, name=record.run.display_name, resume=record.run.resume)
            out["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "summary":
            for item in record.summary.update:
                path = [item.key] if item.key else list(item.nested_key)
                node = out["summary"]
                for part in path[:-1]:
                    node = node.setdefault(part, {})
                node[path[-1]] = json.loads(item.value_json)
        elif kind == "history":
            row = {}
            for item in record.history.item:
                row["/".join([item.key] if item.key else item.nested_key)] = json.loads(item.value_json)
            out["history"].append(row)
    for name in ("metrics", "trials", "failures"):
        table = json.loads((run_dir / "files" / out["summary"][f"tables/{name}"]["path"]).read_text())
        out[name] = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    return out


def test_wandb_offline_export_reads_back(study_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var, sub in (("WANDB_DIR", "wandb-dir"), ("WANDB_CONFIG_DIR", "wandb-config"),
                     ("WANDB_CACHE_DIR", "wandb-cache"), ("WANDB_DATA_DIR", "wandb-data"),
                     ("WANDB_ARTIFACT_DIR", "wandb-artifacts")):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb_dir = tmp_path / "wandb-dir"

    assert sweep_export(str(study_dir), "--to", "wandb") == ExitCode.OK
    first = read_wandb_run(wandb_dir)
    assert sweep_export(str(study_dir), "--to", "wandb", "--run-name", "renamed") == ExitCode.OK
    run = read_wandb_run(wandb_dir)
    assert run["dir"] != first["dir"] and run["id"] == first["id"] == wandb_run_id(read_export(str(study_dir)))
    assert run["resume"] and run["name"] == "renamed" and first["name"] == STUDY

    config = run["config"]
    assert (config["study"], config["languages"], config["calibration_languages"], config["trials"]) == (
        STUDY, ["de", "en"], ["en", "sw"], 5)
    assert (config["git"], config["git_revisions"], config["versions"], config["models"]) == (
        "rev2", ["rev1", "rev2"], {"torch": "2.13.0", "ray": "2.60"}, ["m1"])
    summary = run["summary"]
    assert (summary["trials/planned"], summary["trials/done"], summary["trials/failed"], summary["trials/left"]) == (
        5, 3, 1, 1)

    rows = {(r["key"], r["language"], r["task"], r["metric"]): r for r in run["metrics"]}
    expected = {(key, m["language"], m["task"], m["metric"]): m for key, base in FINAL.items() for m in metrics(base)}
    assert set(rows) == set(expected) and len(run["metrics"]) == len(expected)  # "kb" once, with its latest values
    for where, row in rows.items():
        source = TRIALS.get(where[0], OLD)
        assert row["value"] == expected[where]["value"] and row["stderr"] == expected[where].get("stderr")
        assert (row["name"], row["model"], row["pruner"], row["sparsity"], row["calibration"], row["seed"]) == (
            source.name, source.model, source.pruner, source.sparsity, source.calibration, source.seed)
    trials = {r["key"]: r for r in run["trials"]}
    assert set(trials) == set(FINAL) and trials["kb"]["attempts"] == 2 and trials["ka"]["time/perplexity"] == 3.0
    assert trials["kb"]["time/pruning"] == 2.0 and trials["ka"]["time/pruning"] is None
    assert [(r["key"], r["error"]) for r in run["failures"]] == [("kd", "RuntimeError: CUDA out of memory")]

    progress = [(r["_step"], r["progress/done"], r["progress/failed"]) for r in run["history"] if "progress/done" in r]
    assert [step for step, _, _ in progress] == sorted({step for step, _, _ in progress}) and len(progress) == 7
    assert progress[-1][1:] == (4, 1)

    runs = sorted((wandb_dir / "wandb").glob("offline-run-*"))
    assert sweep_export(str(study_dir), "--to", "wandb", "--run-id", "bad/id") == ExitCode.INVALID  # W&B's rule
    assert sorted((wandb_dir / "wandb").glob("offline-run-*")) == runs


# -------------------------------------------------------------------------------------------------- refusals
def test_refusals_send_nothing(study_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    assert sweep_export(str(tmp_path / "nothing"), "--to", "mlflow", "--tracking-uri", "file:x") == ExitCode.INVALID
    assert "is not a study directory (no plan.json)" in capsys.readouterr().err
    assert sweep_export(str(study_dir), "--to", "mlflow") == ExitCode.INVALID
    assert "no tracking URI" in capsys.readouterr().err
    assert sweep_export(str(study_dir), "--to", "wandb", "--tracking-uri", "file:x") == ExitCode.INVALID
    assert "--tracking-uri is for --to mlflow" in capsys.readouterr().err

    store = tmp_path / "filestore"
    if importlib.util.find_spec("mlflow") is not None:  # MLflow 3 refuses its file store unless told
        assert sweep_export(str(study_dir), "--to", "mlflow", "--tracking-uri", store.as_uri()) == ExitCode.INVALID
        assert "MLFLOW_ALLOW_FILE_STORE" in capsys.readouterr().err and not store.exists()

    for target, extra in (("wandb", "wandb"), ("mlflow", "mlflow")):
        monkeypatch.setitem(sys.modules, target, None)  # as if not installed: importing it raises ImportError
        monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
        monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
        assert sweep_export(str(study_dir), "--to", target) == ExitCode.INVALID
        assert f"pip install 'calibration-sweep[{extra}]'" in capsys.readouterr().err
    assert not store.exists() and not (tmp_path / "wandb-dir").exists()

    assert sweep_export(str(study_dir), "--to", "wandb", "--dry-run") == ExitCode.OK  # needs neither library
    out = capsys.readouterr().out
    assert "3/5 trials done, 1 failed, 1 left" in out and "nothing was sent" in out
