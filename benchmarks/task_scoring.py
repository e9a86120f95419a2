"""Requests per second of the shared-prefix scorer against lm-eval's HFLM, on the same requests, per
task shape, side by side in one process; and how far apart their numbers are.

    python benchmarks/task_scoring.py                              # demo models + Gemma 3 270M, float32
    python benchmarks/task_scoring.py --dtype bfloat16 --models demo-llama gemma3-270m

Requests: lm-eval's own `Instance`s, built by the task objects exactly as `run_tasks` builds them, for
the demo continuation task and the offline Belebele-, XNLI- and XStoryCloze-shaped tasks
(engine/demo/shaped_tasks.py) in --languages. Both sides get the same instances and the same batch size:
- lm-eval: `HFLM(pretrained=<loaded model>).loglikelihood(instances)`;
- ours: the same call on `engine.evaluate.shared_prefix.shared_prefix_lm(...)`, its tokenization memo
  emptied before every timed call (both sides tokenize every time).
Each timed best of --repeats, repeats interleaved, after one untimed warm-up of each, each round after
the CPUs were idle (benchmarks/quiet.py).

Agreement, per shape: the largest |difference| of a request's log-likelihood, how many requests differ
by more than 1e-4 nats, greedy flags that differ, and documents whose acc (argmax of the choices'
log-likelihoods against the gold answer) differs. For scale, lm-eval against itself: its batch size 1
against --batch-size on the first --self-check requests (float32 rounding depends on batch shapes).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from engine.demo.build import ensure_demo_assets  # noqa: E402
from engine.demo.shaped_tasks import task_name as shaped_name  # noqa: E402
from engine.demo.shaped_tasks import write_shaped_tasks  # noqa: E402
from engine.demo.tasks import ensure_demo_tasks  # noqa: E402
from engine.demo.tasks import task_name as demo_name  # noqa: E402
from engine.evaluate import shared_prefix  # noqa: E402
from engine.evaluate.tasks import _prepare, loaded_tasks, manager_for  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quiet import QuietGate  # noqa: E402

SHAPES = ("demo", "belebele", "xnli", "xstorycloze")
TOLERANCE = 1e-4


def model_dir(name: str) -> Path:
    if name.startswith("demo-"):
        return ensure_demo_assets(log=lambda *a: None).model_dirs[name]
    from engine.pretrained.build import ensure_model

    return ensure_model(name, log=lambda *a: None)


def instances_for(shape: str, languages, docs: int, shaped_dir: Path):
    """lm-eval's loglikelihood instances for the shape's tasks, as run_tasks builds them."""
    assets = ensure_demo_assets(log=lambda *a: None)
    if shape == "demo":
        include, names = ensure_demo_tasks(assets), [demo_name(lang) for lang in languages]
    else:
        include, names = shaped_dir, [shaped_name(shape, lang) for lang in languages]
    manager, _ = manager_for(names, include)
    loaded = loaded_tasks(manager, names, 0)
    _prepare(loaded, 0)
    out = []
    for task in loaded["tasks"].values():
        task.build_all_requests(limit=docs, rank=0, world_size=1)
        out += [i for i in task.instances if i.request_type == "loglikelihood"]
    return out


def acc_flips(instances, ours, theirs) -> tuple[int, int]:
    """Documents whose acc (argmax of choice log-likelihoods == gold) differs, out of all documents."""
    by_doc: dict[tuple, list] = {}
    for instance, a, b in zip(instances, ours, theirs, strict=True):
        by_doc.setdefault((instance.task_name, instance.doc_id), []).append((instance.idx, a[0], b[0], instance))
    flips = 0
    for rows in by_doc.values():
        rows.sort(key=lambda r: r[0])
        mine = max(range(len(rows)), key=lambda k: rows[k][1])
        theirs_pick = max(range(len(rows)), key=lambda k: rows[k][2])
        flips += mine != theirs_pick
    return flips, len(by_doc)


def measure(model_name: str, dtype: str, shapes, languages, docs: int, batch_size: int, repeats: int,
            gate: QuietGate, shaped_dir: Path, self_check: int) -> list[dict]:
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_dir(model_name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    theirs_lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device="cpu")
    ours_lm = shared_prefix.shared_prefix_lm(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                                             device="cpu")
    rows = []
    for shape in shapes:
        instances = instances_for(shape, languages, docs, shaped_dir)

        def ours(instances=instances):
            shared_prefix.pair_memo(tokenizer).clear()
            return ours_lm.loglikelihood(instances, disable_tqdm=True)

        def theirs(instances=instances):
            return theirs_lm.loglikelihood(instances, disable_tqdm=True)

        our_answers, their_answers = ours(), theirs()  # warm-up, and the numbers compared
        times = {"ours": [], "lm_eval": []}
        busy = []
        for _ in range(repeats):
            for label, run in (("ours", ours), ("lm_eval", theirs)):
                busy.append(gate.wait())
                started = time.perf_counter()
                run()
                times[label].append(time.perf_counter() - started)
        diffs = [abs(a[0] - b[0]) for a, b in zip(our_answers, their_answers, strict=True)]
        head = instances[:self_check]
        one_by_one = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, device="cpu").loglikelihood(
            head, disable_tqdm=True) if head else []
        # lm-eval sorts requests by length, so these are the same requests in other batches
        self_diff = max((abs(a[0] - b[0]) for a, b in zip(one_by_one, theirs_lm.loglikelihood(head, disable_tqdm=True),
                                                          strict=True)), default=0.0)
        flips, documents = acc_flips(instances, our_answers, their_answers)
        row = {
            "model": model_name, "dtype": dtype, "shape": shape, "requests": len(instances), "documents": documents,
            "ours_s": min(times["ours"]), "lm_eval_s": min(times["lm_eval"]),
            "ours_rps": len(instances) / min(times["ours"]), "lm_eval_rps": len(instances) / min(times["lm_eval"]),
            "max_abs_diff": max(diffs), "over_1e-4": sum(d > TOLERANCE for d in diffs),
            "greedy_mismatches": sum(a[1] != b[1] for a, b in zip(our_answers, their_answers, strict=True)),
            "acc_flips": flips, "max_busy": max(busy), "lm_eval_self_max_abs_diff": self_diff,
            "self_check_requests": len(head),
        }
        row["ratio"] = row["ours_rps"] / row["lm_eval_rps"]
        print(f"{model_name:>14} {dtype:>8} {shape:>11}: {row['requests']:>4} requests  ours {row['ours_rps']:8.1f} "
              f"req/s  lm-eval {row['lm_eval_rps']:8.1f} req/s  {row['ratio']:5.2f}x  max|diff| "
              f"{row['max_abs_diff']:.2e}  >1e-4: {row['over_1e-4']}  greedy differs: {row['greedy_mismatches']}  "
              f"acc differs: {flips}/{documents}  lm-eval batch 1 vs {batch_size}: {self_diff:.2e}", flush=True)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["demo-llama", "demo-cohere", "gemma3-270m"])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=SHAPES)
    parser.add_argument("--languages", nargs="+", default=["en", "de", "zh"])
    parser.add_argument("--docs", type=int, default=20, help="documents per task and language")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quiet-budget", type=float, default=120.0)
    parser.add_argument("--self-check", type=int, default=60, help="requests lm-eval scores at batch 1 too")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    gate = QuietGate(args.quiet_budget)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        shaped_dir = write_shaped_tasks(ensure_demo_assets(log=lambda *a: None), Path(scratch), args.languages,
                                        args.docs, [s for s in args.shapes if s != "demo"] or ["xnli"])
        for name in args.models:
            rows += measure(name, args.dtype, args.shapes, args.languages, args.docs, args.batch_size, args.repeats,
                            gate, shaped_dir, args.self_check)
    if args.json:
        import lm_eval
        import transformers

        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__, "transformers": transformers.__version__, "lm_eval": lm_eval.__version__,
            "threads": args.threads, "batch_size": args.batch_size, "docs": args.docs, "languages": args.languages,
            "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
