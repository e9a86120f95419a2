"""End to end: the demo grid through `sweep run` against one process per trial, as it is done today.

    python benchmarks/end_to_end.py [--trials N] [--jobs 2] [--json out.json] [--keep] [--analyses]
                                    [--order ab|ba] [--no-windowing-check] [--workdir DIR]

Both modes run the same trials (the first N of the study's plan, `sweep.study.grid.expand` order; default all
46 of `sweep/studies/demo.yaml`) on this machine, one after the other in one run, with the same
parallelism and into fresh output directories:

(a) `sweep run`: `sweep.execution.driver.run_plan` (what the CLI's `run_study` calls) in its own process, with an embedded Ray of
    `--jobs` CPUs: `--jobs` worker actors, each holding one model and running trial after trial on it
    (model affinity), evaluating in memory (engine perplexity + lm-eval tasks on the loaded model).
(b) today: `--jobs` processes at a time (a thread pool over subprocesses), one per trial, each running
    `benchmarks/one_trial_today.py`: load with `from_pretrained`, calibration windows from
    `engine.data.calibration`, prune with `engine.prune`, `save_pretrained`, then the stock `lm_eval` CLI
    on the saved directory (a dense trial: `lm_eval` on the base model). Torch threads: 1 per process
    (Ray gives each 1-CPU actor OMP_NUM_THREADS=1; (b) sets the same).

The same metrics: per target language bits per byte, and the study's lm-eval tasks (demo_continuation_*,
limit 20). On the lm_eval side perplexity is a `loglikelihood_rolling` task per language whose documents
are the sweep's evaluation text cut at the sweep's window boundaries (each document one window's
text: `window - 1` tokens), so lm-eval's windows (BOS + the document) are the sweep's windows and the
numbers agree. The windowing check (untimed, on the dense models) shows what lm-eval's own windowing
over the corpus documents gives instead, and why it differs. The study's analyses (mask overlap, LAPE,
subspace) are turned off in (a), since (b) computes none (`--analyses` keeps them on).

The breakdown is in slot-seconds (summed over the `--jobs` worker slots, so the columns add up to
jobs x wall): process/library start-up and exit, model loads, calibration, pruning, saving, perplexity,
tasks, other, idle. (a) reads them from the study's event log (`model_loaded` events, `finished`
events' `timings` and `seconds`, the actors' start); (b) from each trial's JSON line and its lm_eval
subprocess's time-stamped output (see one_trial_today.py). Exact definitions: `breakdown_sweep`,
`breakdown_today`.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DEMO_STUDY = REPO / "sweep" / "studies" / "demo.yaml"
TODAY = REPO / "benchmarks" / "one_trial_today.py"
PPL_TASK = "e2e_ppl_{lang}"  # documents = the sweep's windows (timed, in (b))
DOCS_TASK = "e2e_docs_{lang}"  # documents = the corpus documents the sweep reads (windowing check only)
STAGES = ("startup", "loads", "calibration", "pruning", "saving", "perplexity", "tasks", "other", "idle")
HEADERS = {"startup": "start-up+exit", "loads": "model loads", "calibration": "calibration", "pruning": "pruning",
           "saving": "saving", "perplexity": "perplexity", "tasks": "tasks", "other": "other", "idle": "idle"}
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, help="the first N trials of the plan (default: all)")
    p.add_argument("--jobs", type=int, default=2, help="worker slots: Ray CPUs / actors in (a), processes in (b)")
    p.add_argument("--json", help="write everything measured here")
    p.add_argument("--keep", action="store_true", help="keep the output directories")
    p.add_argument("--workdir", help="where the outputs go (default: a new temporary directory)")
    p.add_argument("--analyses", action="store_true", help="leave the study's analyses on in (a)")
    p.add_argument("--order", default="ab", choices=["ab", "ba"], help="which mode runs first")
    p.add_argument("--no-windowing-check", action="store_true",
                   help="skip the untimed check of lm-eval's own windowing on the dense models")
    p.add_argument("--study", default=str(DEMO_STUDY), help=argparse.SUPPRESS)
    # internal: the (a) driver process
    p.add_argument("--sweep-child", nargs=3, metavar=("STUDY", "OUT", "TRIALS"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- set-up
def write_study(source: Path, folder: Path, analyses: bool) -> Path:
    import yaml

    study = yaml.safe_load(source.read_text(encoding="utf-8"))
    if not analyses:
        study.pop("analyses", None)  # off by default
    study["execution"] = {**study.get("execution", {}), "output_dir": str(folder / "unused")}
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def rolling_task(name: str, data_file: Path) -> str:
    import yaml

    return yaml.safe_dump({
        "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test", "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "text",
        "metric_list": [{"metric": m, "aggregation": agg, "higher_is_better": False}
                        for m, agg in (("word_perplexity", "weighted_perplexity"),
                                       ("byte_perplexity", "weighted_perplexity"), ("bits_per_byte", "bits_per_byte"))],
        "metadata": {"version": 1}}, sort_keys=False)


def write_jsonl(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for text in texts:
            handle.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")


def evaluation_documents(source, language: str, tokenizer, ids: list[int]) -> list[str]:
    """The corpus documents the sweep's evaluation tokens spell, the last one cut where the sweep cut."""
    from engine.data.sources import documents
    from engine.evaluate.suite import DOCUMENT_SEPARATOR
    from engine.languages import get_language

    spelled = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    out, position = [], 0
    for text in documents(source, get_language(language), seed=None):
        if position >= len(spelled):
            break
        piece = spelled[position: position + len(text)]
        if piece:
            out.append(piece)
        position += len(text) + len(DOCUMENT_SEPARATOR)
    return out


def task_folders(study, models: dict[str, dict], folder: Path) -> dict:
    """Per model: a folder with the study's task YAMLs, a rolling task per language over the sweep's
    windows (PPL_TASK) and one over the corpus documents (DOCS_TASK); and how the windows compare."""
    from transformers import AutoTokenizer

    from engine.trial import evaluation_tokens
    from sweep.study.trials import evaluation_config

    ev = evaluation_config(study)
    out = {}
    for label, model in models.items():
        tasks = folder / "tasks" / label
        if ev.include_path is not None:
            for path in Path(ev.include_path).rglob("*.yaml"):
                target = tasks / path.relative_to(ev.include_path)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
        tokenizer = AutoTokenizer.from_pretrained(model["path"])
        step = ev.perplexity.window - 1
        windows = {}
        for lang in ev.languages:
            ids, n_bytes = evaluation_tokens(ev.perplexity, lang, tokenizer)
            chunks = [ids[i: i + step] for i in range(0, len(ids), step)]
            texts = [tokenizer.decode(c, skip_special_tokens=False, clean_up_tokenization_spaces=False) for c in chunks]
            retokenized = sum(tokenizer(t, add_special_tokens=False)["input_ids"] != c for t, c in zip(texts, chunks))
            windows[lang] = {"tokens": len(ids), "bytes": n_bytes, "windows": len(chunks),
                             "window_texts_bytes": sum(len(t.encode("utf-8")) for t in texts),
                             "windows_retokenized_differently": retokenized,
                             "replacement_chars": sum(t.count("\ufffd") for t in texts)}
            name = PPL_TASK.format(lang=lang)
            write_jsonl(tasks / "data" / f"{name}.jsonl", texts)
            (tasks / f"{name}.yaml").write_text(rolling_task(name, tasks / "data" / f"{name}.jsonl"), encoding="utf-8")
            docs = evaluation_documents(ev.perplexity.source, lang, tokenizer, ids)
            windows[lang]["documents"] = len(docs)
            windows[lang]["documents_bytes"] = sum(len(d.encode("utf-8")) for d in docs)
            name = DOCS_TASK.format(lang=lang)
            write_jsonl(tasks / "data" / f"{name}.jsonl", docs)
            (tasks / f"{name}.yaml").write_text(rolling_task(name, tasks / "data" / f"{name}.jsonl"), encoding="utf-8")
        out[label] = {"folder": tasks, "windows": windows}
    return out


def task_samples(study, include: Path) -> dict[str, list[int]]:
    """lm_eval --samples for the study's tasks: the documents their limit selects (what --limit does), so
    the perplexity tasks can run unlimited in the same lm_eval call."""
    from lm_eval.tasks import TaskManager

    from sweep.study.trials import resolved_tasks

    tasks = resolved_tasks(study)
    loaded = TaskManager(include_path=str(include), include_defaults=False).load([t.name for t in tasks])["tasks"]
    samples = {}
    for t in tasks:
        n = len(loaded[t.name].eval_docs)
        limit = n if t.limit is None else (math.ceil(n * t.limit) if isinstance(t.limit, float) else min(n, t.limit))
        samples[t.name] = list(range(limit))
    return samples


def max_length_of(path: str) -> int:
    """What lm-eval's HFLM resolves for an in-memory model (the sweep), told to the CLI explicitly."""
    from lm_eval.models.utils import resolve_max_length
    from transformers import AutoConfig, AutoTokenizer

    return resolve_max_length(AutoConfig.from_pretrained(path), AutoTokenizer.from_pretrained(path))


# ----------------------------------------------------------------------------------- (a) sweep run
def sweep_child(study: str, out: str, n: int) -> int:
    """The (a) driver process: `run_plan` on an embedded Ray, the plan cut to its first `n` trials."""
    from sweep.execution.driver import RunOptions, run_plan
    from sweep.study.env import apply_default_env
    from sweep.study.grid import Plan, expand
    from sweep.study.load import load_study

    apply_default_env()
    plan = expand(load_study(study))
    if n > 0:
        plan = Plan(study=plan.study, trials=plan.trials[:n])
    outcome = run_plan(plan, RunOptions(out=out, num_cpus=int(os.environ["E2E_JOBS"])))
    return outcome.code


def run_sweep(study: Path, folder: Path, n: int, jobs: int) -> dict:
    out = folder / "study"
    env = dict(os.environ, **OFFLINE, E2E_JOBS=str(jobs), HF_DATASETS_CACHE=str(folder / "hf_datasets"),
               SWEEP_CACHE_DIR=str(folder / "sweep_cache"))
    command = [sys.executable, str(Path(__file__).resolve()), "--sweep-child", str(study), str(out), str(n)]
    with open(folder / "sweep.log", "w", encoding="utf-8") as log:
        spawn = time.time()
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
        exit_ = time.time()
    events = []
    for path in sorted((out / "events").glob("*.jsonl")):
        events += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {"code": code, "spawn": spawn, "exit": exit_, "wall_s": exit_ - spawn, "events": events,
            "log": str(folder / "sweep.log"), "study_dir": str(out)}


def breakdown_sweep(run: dict, slots: int) -> dict:
    """Slot-seconds of (a), from its event log.

    start-up+exit: for each worker slot, spawn of the driver process to its actor's `actor_started`
        (interpreter, imports, study checks, Ray start, actor start); the part of each `model_loaded`
        event beyond the load itself (library imports on the actor's first load, the call); each
        actor's first-trial excess of `tasks` over its later trials (lm-eval's import and task index,
        paid once per process); and, per slot, `run_finished` to the driver's exit (results compaction,
        Ray shutdown).
    model loads: the engine's load (from_pretrained + dense snapshot) of each `model_loaded` event.
    calibration, pruning, perplexity, tasks, saving: the `finished` events' `timings`.
    other: the rest of each `finished` event's `seconds` (restoring the dense weights, the actor call).
    idle: slots x wall minus all of the above.
    """
    events, spawn = run["events"], run["spawn"]
    b = dict.fromkeys(STAGES, 0.0)
    first_tasks = {}
    for e in [e for e in events if e["event"] == "actor_started"][:slots]:
        b["startup"] += e["time"] - spawn
    loads = 0
    for e in events:
        if e["event"] == "model_loaded":
            loads += 1
            engine_load = ((e.get("load") or {}).get("seconds")) or e["seconds"]
            b["loads"] += engine_load
            b["startup"] += e["seconds"] - engine_load
        elif e["event"] == "finished":
            t = e.get("timings") or {}
            b["calibration"] += t.get("calibration", 0.0)
            b["pruning"] += t.get("pruning", 0.0)
            b["perplexity"] += t.get("perplexity", 0.0)
            b["tasks"] += t.get("tasks", 0.0)
            b["saving"] += t.get("save_model", 0.0)
            b["other"] += e["seconds"] - sum(v for k, v in t.items() if k in
                                             ("calibration", "pruning", "perplexity", "tasks", "save_model"))
            first_tasks.setdefault(e["actor"], []).append(t.get("tasks", 0.0))
        elif e["event"] == "failed":
            b["other"] += e.get("seconds") or 0.0
    excess = 0.0
    for series in first_tasks.values():
        if len(series) > 1:
            excess += max(0.0, series[0] - statistics.median(series[1:]))
    b["tasks"] -= excess
    b["startup"] += excess
    ended = next((e["time"] for e in reversed(events) if e["event"] in ("run_finished", "run_stopped")), run["exit"])
    b["startup"] += slots * (run["exit"] - ended)
    b["idle"] = slots * run["wall_s"] - sum(v for k, v in b.items() if k != "idle")
    finished = [e for e in events if e["event"] == "finished"]
    return {"stages": b, "model_loads": loads, "trials_finished": len(finished),
            "trials_failed": sum(1 for e in events if e["event"] == "failed" and e.get("final")),
            "first_trial_tasks_excess_s": excess}


def sweep_metrics(events: list[dict]) -> dict[str, dict]:
    out = {}
    for e in events:
        if e["event"] != "finished":
            continue
        rows = out.setdefault(e["name"], {})
        for row in e.get("metrics") or []:
            rows[(row["language"], "perplexity" if row["task"] == "perplexity" else row["task"], row["metric"])] = \
                row["value"]
    return out


# --------------------------------------------------------------------------------------- (b) today
def today_command(study, trial, models: dict, folders: dict, samples: dict, out: Path) -> list[str]:
    from sweep.study.trials import resolved_tasks

    spec = study.spec
    model = models[trial.model_label]
    ev = spec.evaluation
    tasks = [PPL_TASK.format(lang=lang) for lang in ev.languages] + [t.name for t in resolved_tasks(study)]
    command = [sys.executable, str(TODAY), "--model", model["path"], "--dtype", model["dtype"], "--out", str(out),
               "--tasks", ",".join(tasks), "--include-path", str(folders[trial.model_label]["folder"]),
               "--lm-eval-samples", json.dumps(samples), "--batch-size", str(ev.batch_size),
               "--max-length", str(model["max_length"]), "--device", "cpu", "--threads", "1"]
    if not trial.is_dense:
        pruner = next(p for p in spec.pruners if p.label == trial.pruner_label)
        command += ["--method", pruner.method, "--params", json.dumps(dict(pruner.params)),
                    "--sparsity", trial.sparsity.canonical()]
        if trial.calibration is not None:
            cal = spec.calibration
            command += ["--calibration", "+".join(f"{code}:{weight!r}" for code, weight in trial.calibration.weights),
                        "--corpus", str(study.resolve(cal.source.path)), "--split", cal.source.split or "calibration",
                        "--samples", str(cal.samples), "--seq-len", str(cal.seq_len), "--seed", str(trial.seed)]
    return command


def run_today(study, trials, models: dict, folders: dict, samples: dict, folder: Path, jobs: int) -> dict:
    env = dict(os.environ, **OFFLINE, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               HF_DATASETS_CACHE=str(folder / "hf_datasets"))

    def one(trial) -> dict:
        out = folder / "trials" / trial.name
        command = today_command(study, trial, models, folders, samples, out)
        spawn = time.time()
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
        exit_ = time.time()
        record = {"name": trial.name, "spawn": spawn, "exit": exit_, "code": done.returncode}
        try:
            record["report"] = json.loads(done.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            record["error"] = (done.stderr or done.stdout)[-3000:]
        out.mkdir(parents=True, exist_ok=True)
        (out / "stderr.log").write_text(done.stderr, encoding="utf-8")
        return record

    started = time.time()
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        records = list(pool.map(one, trials))
    ended = time.time()
    return {"spawn": started, "exit": ended, "wall_s": ended - started, "trials": records}


def breakdown_today(run: dict, slots: int) -> dict:
    """Slot-seconds of (b), from each trial's JSON line and its lm_eval run's phases.

    start-up+exit: interpreter start (spawn to the script's first line), imports (torch, transformers,
        engine), lm_eval's start-up (its interpreter, imports and task index, until "Initializing hf
        model"), and the script's exit.
    model loads: from_pretrained in the script (pruned trials) + lm_eval's load of the model.
    calibration, pruning, saving: the script's timings.
    perplexity: lm_eval's loglikelihood_rolling requests.
    tasks: the rest of lm_eval's evaluation (task data and contexts, the multiple-choice requests, metrics,
        writing results, its exit).
    other: the rest of the script's time (arguments, reading lm_eval's results).
    idle: slots x wall minus the trial processes' lifetimes (the pool's gaps and its tail).
    """
    b = dict.fromkeys(STAGES, 0.0)
    loads = failed = 0
    busy = 0.0
    for record in run["trials"]:
        busy += record["exit"] - record["spawn"]
        j = record.get("report")
        if j is None:
            failed += 1
            b["other"] += record["exit"] - record["spawn"]
            continue
        lm = j["lm_eval"]
        phases = lm["phases"]
        b["startup"] += (j["t_start"] - record["spawn"]) + j["imports_s"] + phases.get("startup", 0.0) \
            + (record["exit"] - j["t_end"])
        b["loads"] += j.get("load_s", 0.0) + phases.get("load", 0.0)
        loads += (0 if j["dense"] else 1) + 1
        b["calibration"] += j.get("calibration_s", 0.0)
        b["pruning"] += j.get("pruning_s", 0.0)
        b["saving"] += j.get("save_s", 0.0)
        b["perplexity"] += phases.get("rolling", 0.0)
        b["tasks"] += phases.get("task_setup", 0.0) + phases.get("loglikelihood", 0.0) + phases.get("rest", 0.0)
        steps = j["imports_s"] + sum(j.get(k, 0.0) for k in ("load_s", "calibration_s", "pruning_s", "save_s"))
        b["other"] += (j["t_end"] - j["t_start"]) - steps - lm["wall_s"]
    b["idle"] = slots * run["wall_s"] - busy
    return {"stages": b, "model_loads": loads, "trials_finished": len(run["trials"]) - failed,
            "trials_failed": failed}


def today_metrics(run: dict, study) -> dict[str, dict]:
    from sweep.study.trials import resolved_tasks

    language_of = {t.name: t.language for t in resolved_tasks(study)}
    ppl = {PPL_TASK.format(lang=lang): lang for lang in study.spec.evaluation.languages}
    out = {}
    for record in run["trials"]:
        if "report" not in record:
            continue
        rows = out.setdefault(record["name"], {})
        for row in record["report"]["metrics"]:
            if row["task"] in ppl:
                rows[(ppl[row["task"]], "perplexity", row["metric"])] = row["value"]
            elif row["task"] in language_of:
                rows[(language_of[row["task"]], row["task"], row["metric"])] = row["value"]
    return out


def compare_metrics(a: dict, b: dict, inexact: set[tuple[str, str]] = frozenset()) -> dict:
    """The largest difference between the modes, per metric, over every trial and language both have;
    `clean_max_rel` leaves out the (model, language) pairs in `inexact` (windows that text cannot hold
    exactly: a window boundary inside a character's bytes)."""
    out = {}
    for name in sorted(set(a) & set(b)):
        for key in sorted(set(a[name]) & set(b[name])):
            metric = key[2]
            if metric not in ("bits_per_byte", "acc", "acc_norm"):
                continue
            x, y = a[name][key], b[name][key]
            entry = out.setdefault(metric, {"compared": 0, "unequal": 0, "max_abs": 0.0, "max_rel": 0.0, "where": None,
                                            "clean_max_rel": 0.0})
            entry["compared"] += 1
            entry["unequal"] += x != y
            diff = abs(x - y)
            if diff > entry["max_abs"]:
                entry.update(max_abs=diff, where=f"{name} {key[0]} {key[1]}: sweep {x!r}, lm_eval CLI {y!r}")
            entry["max_rel"] = max(entry["max_rel"], diff / max(abs(y), 1e-12))
            if (name.split(".")[0], key[0]) not in inexact:
                entry["clean_max_rel"] = max(entry["clean_max_rel"], diff / max(abs(y), 1e-12))
    missing = sorted(set(a) ^ set(b))
    return {"metrics": out, "trials_compared": len(set(a) & set(b)), "trials_missing_in_one_mode": missing}


# ---------------------------------------------------------------------------- windowing check (untimed)
def windowing_check(study, models: dict, folders: dict, folder: Path, a_metrics: dict, b_metrics: dict,
                    dense_names: dict) -> dict:
    """On each dense model: the sweep's bits per byte against lm-eval's rolling windows over the corpus
    documents (not the sweep's windows), with max_length = the sweep's window and = the model's own."""
    import torch

    from engine.evaluate.suite import perplexity_of_tokens
    from engine.models import ModelSource
    from engine.trial import evaluation_tokens, load
    from sweep.study.trials import evaluation_config

    ev = evaluation_config(study)
    env = dict(os.environ, **OFFLINE, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               HF_DATASETS_CACHE=str(folder / "hf_datasets"))
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for label, model in models.items():
            loaded = load(ModelSource(model["path"], dtype=model["dtype"]))
            ours = {}
            for lang in ev.languages:
                ids, n_bytes = evaluation_tokens(ev.perplexity, lang, loaded.tokenizer)
                ours[lang] = perplexity_of_tokens(loaded.model, loaded.tokenizer, ids, n_bytes, ev.perplexity.window,
                                                  ev.batch_size).bits_per_byte
            del loaded
            entry = {"sweep_engine": ours}
            dense = dense_names.get(label)
            if dense in a_metrics:
                entry["sweep_run"] = {lang: a_metrics[dense].get((lang, "perplexity", "bits_per_byte"))
                                      for lang in ev.languages}
            if dense in b_metrics:
                entry["lm_eval_sweep_windows"] = {lang: b_metrics[dense].get((lang, "perplexity", "bits_per_byte"))
                                                  for lang in ev.languages}
            for max_length in sorted({ev.perplexity.window, model["max_length"]}):
                tasks = ",".join(DOCS_TASK.format(lang=lang) for lang in ev.languages)
                target = folder / "windowing" / f"{label}-{max_length}"
                command = [str(Path(sys.executable).with_name("lm_eval")), "--model", "hf", "--model_args",
                           f"pretrained={model['path']},dtype={model['dtype']},max_length={max_length}",
                           "--tasks", tasks, "--include_path", str(folders[label]["folder"]), "--device", "cpu",
                           "--batch_size", str(ev.batch_size), "--output_path", str(target)]
                done = subprocess.run(command, capture_output=True, text=True, env=env)
                if done.returncode != 0:
                    entry[f"lm_eval_documents_max_length_{max_length}"] = {"error": done.stderr[-2000:]}
                    continue
                results = json.loads(sorted(target.rglob("results_*.json"))[-1].read_text(encoding="utf-8"))
                entry[f"lm_eval_documents_max_length_{max_length}"] = {
                    lang: results["results"][DOCS_TASK.format(lang=lang)]["bits_per_byte,none"] for lang in ev.languages}
            out[label] = entry
    finally:
        torch.set_num_threads(threads)
    return out


# ------------------------------------------------------------------------------------------- report
def table(rows: list[dict], slots: int) -> str:
    heads = ["mode", "wall s"] + [HEADERS[s] for s in STAGES] + ["loads (n)", "trials", "ratio (b)/(a)"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "|".join(["---"] + ["---:"] * (len(heads) - 1)) + "|"]
    for row in rows:
        cells = [row["mode"], f"{row['wall_s']:.1f}"] + [f"{row['stages'][s]:.1f}" for s in STAGES] + [
            str(row["model_loads"]), f"{row['trials_finished']}" + (f" ({row['trials_failed']} failed)"
                                                                   if row["trials_failed"] else ""), row["ratio"]]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"(stages in slot-seconds over {slots} worker slots: each row's stages add up to {slots} x wall)")
    return "\n".join(lines)


def trial_medians(runs: dict) -> dict:
    """Median seconds a trial occupies its slot, dense and pruned apart, with how many trials."""
    kinds = {"a": {}, "b": {}}
    for e in runs["a"]["events"]:
        if e["event"] == "finished":
            kinds["a"].setdefault("dense" if e["name"].endswith(".dense") else "pruned", []).append(e["seconds"])
    for r in runs["b"]["trials"]:
        kinds["b"].setdefault("dense" if r["name"].endswith(".dense") else "pruned", []).append(r["exit"] - r["spawn"])
    return {m: {k: (statistics.median(v), len(v)) for k, v in sorted(d.items())} for m, d in kinds.items()}


class OtherLoad:
    """Samples every process once a second while a mode runs: CPU-seconds of this benchmark's process tree
    against everything else on the machine (other users' work that the lock does not keep out). A process
    once seen in our tree stays ours (Ray's workers are orphaned when Ray shuts down)."""

    def __init__(self, period: float = 1.0):
        import threading

        self.period = period
        self.ours: set[tuple[int, float]] = set()
        self.first: dict[tuple[int, float], float] = {}
        self.last: dict[tuple[int, float], float] = {}
        self.names: dict[tuple[int, float], str] = {}
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self, initial: bool = False) -> None:
        import psutil

        me = psutil.Process()
        try:
            tree = {me.pid} | {c.pid for c in me.children(recursive=True)}
        except psutil.Error:
            tree = {me.pid}
        for proc in psutil.process_iter(["pid", "create_time", "cpu_times", "name", "cmdline"]):
            info = proc.info
            if info["cpu_times"] is None:
                continue
            key = (info["pid"], info["create_time"])
            cpu = info["cpu_times"].user + info["cpu_times"].system
            if info["pid"] in tree:
                self.ours.add(key)
            if key not in self.first:
                self.first[key] = cpu if initial else 0.0
                self.names[key] = " ".join(info["cmdline"] or [])[:100] or info["name"] or "?"
            self.last[key] = cpu

    def _loop(self) -> None:
        while not self.stop_event.wait(self.period):
            self._sample()

    def __enter__(self) -> OtherLoad:
        self._sample(initial=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        self.thread.join()
        self._sample()

    def summary(self) -> dict:
        used = {key: self.last[key] - self.first[key] for key in self.last}
        others = sorted(((v, self.names[k]) for k, v in used.items() if k not in self.ours), reverse=True)
        return {"ours_cpu_s": sum(v for k, v in used.items() if k in self.ours),
                "others_cpu_s": sum(v for v, _ in others),
                "top_others": [(name, round(v, 1)) for v, name in others[:5] if v >= 0.5]}


def cpu_seconds() -> dict:
    """CPU time used so far by the whole machine (/proc/stat) and by this process's finished children."""
    import resource

    with open("/proc/stat", encoding="ascii") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # all but idle and iowait
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"machine": busy / os.sysconf("SC_CLK_TCK"), "ours": children.ru_utime + children.ru_stime}


def machine() -> dict:
    from importlib import metadata

    versions = {}
    for dist in ("torch", "transformers", "lm_eval", "ray"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "versions": versions, "loadavg": os.getloadavg()}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.sweep_child:
        study, out, n = args.sweep_child
        return sweep_child(study, out, int(n))

    from engine.demo import ensure_demo_assets
    from engine.demo.tasks import ensure_demo_tasks
    from sweep.study.env import apply_default_env, quiet_libraries
    from sweep.study.grid import expand
    from sweep.study.load import load_study

    apply_default_env()
    quiet_libraries()
    os.environ.update(OFFLINE)
    ensure_demo_tasks(ensure_demo_assets())
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="end-to-end-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"outputs under {work}")
    t_setup = time.time()
    study_path = write_study(Path(args.study), work, args.analyses)
    study = load_study(study_path)
    plan = expand(study)
    trials = list(plan.trials[: args.trials] if args.trials else plan.trials)
    n = len(trials) if args.trials else 0
    labels = {t.model_label for t in trials}
    models = {}
    for i, spec in enumerate(study.spec.models):
        if spec.label in labels:
            path = str(study.model_paths[i])
            models[spec.label] = {"path": path, "dtype": spec.dtype, "max_length": max_length_of(path)}
    folders = task_folders(study, models, work)
    samples = task_samples(study, next(iter(folders.values()))["folder"])
    dense_names = {t.model_label: t.name for t in trials if t.is_dense}
    print(f"{len(trials)} trials ({sum(t.is_dense for t in trials)} dense) of {len(plan.trials)} in the plan; "
          f"{args.jobs} at a time; set-up {time.time() - t_setup:.1f} s (untimed)")
    # Warm the file cache for both modes' libraries, so whichever runs first pays no cold disk reads.
    subprocess.run([sys.executable, "-c", "import torch, transformers, lm_eval, ray, datasets"], check=True)

    runs = {}
    before = os.getloadavg()
    for mode in args.order:
        folder = work / mode
        folder.mkdir(parents=True, exist_ok=True)
        print(f"({mode}) {'sweep run' if mode == 'a' else 'one process per trial'} ...", flush=True)
        cpu_before = cpu_seconds()
        with OtherLoad() as sampler:
            if mode == "a":
                runs["a"] = run_sweep(study_path, folder, n, args.jobs)
            else:
                runs["b"] = run_today(study, trials, models, folders, samples, folder, args.jobs)
        cpu_after = cpu_seconds()
        runs[mode]["cpu_s"] = {**{k: cpu_after[k] - cpu_before[k] for k in cpu_after}, **sampler.summary()}
        failed = [r["name"] for r in runs["b"]["trials"] if "report" not in r] if mode == "b" else []
        print(f"    {runs[mode]['wall_s']:.1f} s, exit {runs[mode].get('code', 0)}, {len(failed)} failed {failed[:3]}; "
              f"CPU-seconds: ours {runs[mode]['cpu_s']['ours_cpu_s']:.0f}, other processes "
              f"{runs[mode]['cpu_s']['others_cpu_s']:.0f} {runs[mode]['cpu_s']['top_others']}", flush=True)
    after = os.getloadavg()

    bd = {"a": breakdown_sweep(runs["a"], args.jobs), "b": breakdown_today(runs["b"], args.jobs)}
    ratio = runs["b"]["wall_s"] / runs["a"]["wall_s"]
    rows = [{"mode": "(a) sweep run", "wall_s": runs["a"]["wall_s"], **bd["a"], "ratio": "1.00"},
            {"mode": "(b) one process per trial", "wall_s": runs["b"]["wall_s"], **bd["b"], "ratio": f"{ratio:.2f}"}]
    a_metrics, b_metrics = sweep_metrics(runs["a"]["events"]), today_metrics(runs["b"], study)
    inexact = {(label, lang) for label, f in folders.items() for lang, w in f["windows"].items()
               if w["windows_retokenized_differently"] or w["replacement_chars"]}
    comparison = compare_metrics(a_metrics, b_metrics, inexact)

    print()
    print(table(rows, args.jobs))
    print(f"\nwall-time ratio (b)/(a): {ratio:.2f}  ((a) {runs['a']['wall_s']:.1f} s, (b) {runs['b']['wall_s']:.1f} s, "
          f"{len(trials)} trials, {args.jobs} slots)")
    medians = trial_medians(runs)
    print("median slot-seconds per trial (a: the actor call, model load excluded; b: the trial's processes): "
          + "; ".join(f"({m}) " + ", ".join(f"{kind} {v:.1f} s (n={k})" for kind, (v, k) in medians[m].items())
                      for m in ("a", "b")))
    print(f"(a) tasks on each actor's first trial beyond its later ones (lm-eval import, task index), moved to "
          f"start-up: {bd['a']['first_trial_tasks_excess_s']:.1f} s")
    print(f"load average before {before[0]:.2f}, after {after[0]:.2f} (1 min); CPU-seconds used on the machine, "
          f"by this benchmark / by other processes / available: " + ", ".join(
              f"({m}) {runs[m]['cpu_s']['machine']:.0f}: {runs[m]['cpu_s']['ours_cpu_s']:.0f} / "
              f"{runs[m]['cpu_s']['others_cpu_s']:.0f} / {os.cpu_count() * runs[m]['wall_s']:.0f}" for m in ("a", "b")))
    print("\nlargest metric difference between the modes (same trial, language, task):")
    for metric, entry in comparison["metrics"].items():
        print(f"  {metric:>14}: {entry['compared']} values, {entry['unequal']} not bit-equal, max |diff| "
              f"{entry['max_abs']:.3g} (relative {entry['max_rel']:.3g}){'; at ' + entry['where'] if entry['where'] else ''}")
        if inexact and metric == "bits_per_byte":
            print(f"  {'':>14}  leaving out {sorted(inexact)}: max relative difference {entry['clean_max_rel']:.3g}")
    if comparison["trials_missing_in_one_mode"]:
        print(f"  trials missing in one mode: {comparison['trials_missing_in_one_mode']}")
    window_notes = {label: f["windows"] for label, f in folders.items()}
    for label, langs in window_notes.items():
        odd = {lang: (w["windows_retokenized_differently"], w["replacement_chars"]) for lang, w in langs.items()
               if w["windows_retokenized_differently"] or w["replacement_chars"]}
        if odd:
            print(f"  {label}: windows whose text re-tokenizes differently / U+FFFD where a window boundary splits a "
                  f"character's bytes: {odd}")

    check = None
    if not args.no_windowing_check:
        check = windowing_check(study, models, folders, work / "check", a_metrics, b_metrics, dense_names)
        print("\nwindowing check (untimed, dense models): bits per byte, the sweep against lm-eval's own windowing "
              "over the corpus documents")
        for label, entry in check.items():
            langs = list(entry["sweep_engine"])
            keys = [k for k in entry if k != "sweep_engine" and isinstance(entry[k], dict) and "error" not in entry[k]]
            print(f"  {label}: " + " | ".join(["lang", "sweep"] + keys))
            for lang in langs:
                base = entry["sweep_engine"][lang]
                cells = [f"{entry[k][lang]:.4f} ({(entry[k][lang] - base) / base:+.2%})" if entry[k].get(lang) else "-"
                         for k in keys]
                print(f"    {lang} | {base:.4f} | " + " | ".join(cells))
        print("  Why they differ: lm-eval scores each document on its own, opened by BOS, so a document's first tokens "
              "are predicted without the text before it; it neither scores nor counts the blank lines between "
              "documents (the sweep scores one stream, documents joined by a blank line); in a document longer than "
              "max_length its middle windows are opened by the previous token and predict max_length tokens (the "
              "sweep: BOS, then window - 1), and its last window is topped up with the preceding tokens as context. "
              "With documents cut at the sweep's windows (the timed (b)) the windows coincide; what is left there is "
              "a window boundary inside a character's UTF-8 bytes, which text cannot hold (U+FFFD in its place).")

    if args.json:
        payload = {"args": vars(args), "machine": machine(), "loadavg_before": before, "loadavg_after": after,
                   "trial_medians": medians,
                   "trials": [t.name for t in trials], "ratio": ratio, "table": rows,
                   "a": {**{k: v for k, v in runs["a"].items() if k != "events"},
                         "timeline": [{"at_s": e["time"] - runs["a"]["spawn"], "event": e["event"], "actor": e.get("actor"),
                                       "name": e.get("name") or e.get("model"), "seconds": e.get("seconds"),
                                       "timings": e.get("timings"), "load": e.get("load")}
                                      for e in runs["a"]["events"] if e["event"] != "started"]},
                   "b": runs["b"], "metrics_comparison": comparison, "windows": window_notes,
                   "windowing_check": check, "workdir": str(work) if args.keep else None}
        Path(args.json).write_text(json.dumps(payload, indent=1, default=str) + "\n", encoding="utf-8")
        print(f"\nwrote {args.json}")
    if args.keep:
        print(f"outputs kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if runs["a"]["code"] == 0 and not bd["b"]["trials_failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
