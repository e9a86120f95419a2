"""One trial the way it is done today, without the sweep: one process per trial.

Parse the arguments, load the model with `AutoModelForCausalLM.from_pretrained`, build the calibration
windows with this project's `engine.data.calibration`, prune with `engine.prune.sequential` and
`engine.prune.pruners`, `save_pretrained` the pruned model, and evaluate the saved directory with the
stock `lm_eval` CLI as a subprocess. A dense trial (no --method) is only the `lm_eval` run on the base
model. Each step is timed; the last line on stdout is one JSON object (timings, lm-eval's phases and the
metrics), which `benchmarks/end_to_end.py` collects.

    python benchmarks/one_trial_today.py --model DIR --dtype float32 --out OUT \\
        --method wanda --sparsity 0.5 --calibration de --corpus CORPUS --samples 32 --seq-len 128 --seed 0 \\
        --tasks e2e_ppl_de,demo_continuation_de --include-path TASKS --lm-eval-samples '{"demo_continuation_de": [0, 1]}' \\
        --batch-size 16 --max-length 512

The lm_eval subprocess's output is read line by line as it comes and time-stamped, which splits its
wall time into start-up (interpreter, imports, task index: until "Initializing hf model"), model load
(until its next line), task set-up (data, contexts), the loglikelihood requests (multiple choice), the
loglikelihood_rolling requests (perplexity) and the rest (metrics, writing results, exit).
"""
from __future__ import annotations

import time

T_START = time.time()  # before any import: the parent's spawn time to here is interpreter start-up

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d:\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL)\s+\[([^\]]*)\]")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="base model directory (or hub id)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", required=True, help="this trial's output directory (pruned model, lm_eval output)")
    p.add_argument("--method", help="magnitude | wanda | sparsegpt; none: the dense baseline")
    p.add_argument("--params", default="{}", help="pruner parameters as JSON")
    p.add_argument("--sparsity", default="0.5")
    p.add_argument("--calibration", help="'en', or a mix 'en:0.75+de:0.25'")
    p.add_argument("--corpus", help="local corpus: <corpus>/<lang>/<split>.jsonl")
    p.add_argument("--split", default="calibration")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval tasks")
    p.add_argument("--include-path", help="folder of task YAMLs for lm_eval --include_path")
    p.add_argument("--lm-eval-samples", help="lm_eval --samples JSON (document indices per task)")
    p.add_argument("--limit", type=float, help="lm_eval --limit (exclusive with --lm-eval-samples)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, help="lm_eval's max_length model argument")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch threads here (and OMP_NUM_THREADS for lm_eval)")
    return p.parse_args(argv)


def run_lm_eval(args, model_dir: str, out: Path, env: dict) -> dict:
    """The stock CLI on `model_dir`; returns its wall time, phases and parsed results."""
    model_args = f"pretrained={model_dir},dtype={args.dtype}"
    if args.max_length:
        model_args += f",max_length={args.max_length}"
    command = [str(Path(sys.executable).with_name("lm_eval")), "--model", "hf", "--model_args", model_args,
               "--tasks", args.tasks, "--device", args.device, "--batch_size", str(args.batch_size),
               "--output_path", str(out / "lm_eval"), "--verbosity", "INFO"]
    if args.include_path:
        command += ["--include_path", args.include_path]
    if args.lm_eval_samples:
        command += ["--samples", args.lm_eval_samples]
    if args.limit is not None:
        command += ["--limit", f"{args.limit:g}"]
    lines: list[tuple[float, str]] = []
    started = time.time()
    with open(out / "lm_eval.log", "wb") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        pending = b""
        while True:
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:
                break
            now = time.time()
            log.write(chunk)
            pending += chunk
            *done, pending = re.split(rb"[\r\n]", pending)
            lines += [(now, line.decode("utf-8", "replace")) for line in done if line.strip()]
        if pending.strip():
            lines.append((time.time(), pending.decode("utf-8", "replace")))
        code = process.wait()
    ended = time.time()
    if code != 0:
        tail = "\n".join(line for _, line in lines[-30:])
        raise RuntimeError(f"lm_eval exited {code}:\n{tail}")
    phases = lm_eval_phases(lines, started, ended)
    [results_file] = sorted((out / "lm_eval").rglob("results_*.json"))[-1:]
    results = json.loads(results_file.read_text(encoding="utf-8"))
    return {"wall_s": ended - started, "phases": phases, "results": results["results"],
            "n_samples": results.get("n-samples"), "command": command}


def lm_eval_phases(lines: list[tuple[float, str]], started: float, ended: float) -> dict:
    """Seconds of each phase of one lm_eval run, from the times its lines arrived."""

    def record(line: str, source: str | None = None, text: str | None = None) -> bool:
        match = LOG_RECORD.match(line)
        return bool(match) and (source is None or match.group(2).startswith(source)) and (text is None or text in line)

    def first(predicate, after: int = -1) -> int | None:
        return next((i for i, (_, line) in enumerate(lines) if i > after and predicate(line)), None)

    def at(index: int | None) -> float:
        return ended if index is None else lines[index][0]

    init = first(lambda line: record(line, text="Initializing hf model"))
    if init is None:
        return {"startup": ended - started}
    # The model is loaded when lm_eval says anything not about the model or its weights (the first task's data).
    loaded = first(lambda line: not record(line, "models.huggingface") and not line.startswith("Loading weights"),
                   init)
    requests = [(i, kind) for i, kind in ((first(lambda line: record(line, text="Running loglikelihood requests")),
                                           "loglikelihood"),
                                          (first(lambda line: record(line, text="Running loglikelihood_rolling "
                                                                                "requests")), "rolling"))
                if i is not None]
    requests.sort()
    if requests and (loaded is None or loaded > requests[0][0]):
        loaded = requests[0][0]
    phases = {"startup": at(init) - started, "load": at(loaded) - at(init)}
    if not requests:
        phases["rest"] = ended - at(loaded)
        return phases
    phases["task_setup"] = at(requests[0][0]) - at(loaded)
    # Each request type runs until the next log record (the next type's, or the metrics').
    cursor = at(requests[0][0])
    for i, kind in requests:
        stop = at(first(lambda line: bool(LOG_RECORD.match(line)), i))
        phases[kind] = stop - at(i)
        cursor = stop
    phases["rest"] = ended - cursor
    return phases


def metric_rows(results: dict) -> list[dict]:
    rows = []
    for task, row in results.items():
        for key, value in row.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            rows.append({"task": task, "metric": key.split(",")[0], "value": value})
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"t_start": T_START, "pid": os.getpid(), "dense": args.method is None}

    started = time.time()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.data.calibration import WindowRequest, calibration_set
    from engine.data.sources import TextSourceConfig
    from engine.prune.pruners import make_pruner
    from engine.prune.sequential import prune_sequentially
    from engine.prune.sparsity import parse_sparsity
    from sweep.study.load import parse_language_choice

    if args.threads:
        torch.set_num_threads(args.threads)
    report["imports_s"] = time.time() - started
    model_dir = args.model
    if args.method is not None:
        started = time.time()
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
        model.to(args.device).eval()
        report["load_s"] = time.time() - started

        pruner = make_pruner(args.method, json.loads(args.params))
        windows = None
        if pruner.needs_inputs:
            started = time.time()
            source = TextSourceConfig(kind="local", path=Path(args.corpus), split=args.split)
            windows = calibration_set(source, tokenizer, parse_language_choice(args.calibration).weights,
                                      WindowRequest(args.samples, args.seq_len, args.seed))
            report["calibration_s"] = time.time() - started
        started = time.time()
        pruned = prune_sequentially(model, pruner, parse_sparsity(args.sparsity), windows, device=args.device)
        report["pruning_s"] = time.time() - started
        report["layers_pruned"] = len(pruned.layers)

        started = time.time()
        model_dir = str(out / "model")
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        report["save_s"] = time.time() - started
        del model, pruned, windows

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    evaluation = run_lm_eval(args, model_dir, out, env)
    report["lm_eval"] = {k: evaluation[k] for k in ("wall_s", "phases", "n_samples")}
    report["metrics"] = metric_rows(evaluation["results"])
    report["t_end"] = time.time()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
