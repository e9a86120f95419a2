"""The reference study's lm-eval tasks in GPU-hours, lm-eval's HFLM against the shared-prefix scorer.

    python benchmarks/kurz2024_tasks.py

`sweep plan sweep/studies/kurz2024.yaml --estimate --tasks` counts the real tasks, but it needs the
hub (the four gated configs and tokenizers, Belebele, XNLI and XStoryCloze); this script gives the same
count offline, with stand-ins that it says are stand-ins:
- the tasks: the Belebele-, XNLI- and XStoryCloze-shaped tasks of engine/demo/shaped_tasks.py (lm-eval's
  own prompt templates, demo-corpus text) at the real tasks' sizes: 900 questions (Belebele), 2,490
  validation premises (XNLI) and 1,511 stories (XStoryCloze) per language, English text;
- the tokenizer: Gemma 3's (the Llama-3 and Aya tokenizers are gated);
- the models: the four models' published shapes (their config.json values, below).
Per shape, `engine.evaluate.task_cost.task_cost` counts the positions each scorer's model calls compute
(lm-eval's batches, or the shared-prefix scorer's prefix and continuation passes), and
`sweep.plan.estimate` turns positions into seconds at the perplexity rate measured on the H100, as
`sweep plan --estimate --tasks` does. For the shared-prefix scorer that is an upper bound: the prefix
positions of a context never go through the output layer, and the rate charges them for it.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from engine.demo.build import ensure_demo_assets  # noqa: E402
from engine.demo.shaped_tasks import task_name, write_shaped_tasks  # noqa: E402
from engine.evaluate.task_cost import task_cost  # noqa: E402
from engine.evaluate.tasks import TaskRequest  # noqa: E402
from sweep.plan.estimate import ModelShape, trial_seconds  # noqa: E402

# The real tasks' documents per language and how many of kurz2024's 7 target languages each covers.
TASKS = {"belebele": (900, 7), "xnli": (2490, 7), "xstorycloze": (1511, 6)}
TRIALS_PER_MODEL = 85  # kurz2024: 84 pruned + 1 dense per model
# (label, gpus, config.json values of the published model)
MODELS = [
    ("llama3-8b-instruct", 1, {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
                               "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                               "num_key_value_heads": 8, "tie_word_embeddings": False}),
    ("llama3-70b-instruct", 4, {"model_type": "llama", "vocab_size": 128256, "hidden_size": 8192,
                                "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
                                "num_key_value_heads": 8, "tie_word_embeddings": False}),
    ("aya23-8b", 1, {"model_type": "cohere", "vocab_size": 256000, "hidden_size": 4096, "intermediate_size": 14336,
                     "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                     "tie_word_embeddings": True}),
    ("aya23-35b", 2, {"model_type": "cohere", "vocab_size": 256000, "hidden_size": 8192, "intermediate_size": 22528,
                      "num_hidden_layers": 40, "num_attention_heads": 64, "num_key_value_heads": 64,
                      "tie_word_embeddings": True}),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=8, help="kurz2024's evaluation.batch_size")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    from transformers import AutoConfig, AutoTokenizer

    from engine.pretrained.build import ensure_model

    proxy = ensure_model("gemma3-270m", log=lambda *a: None)
    tokenizer = AutoTokenizer.from_pretrained(proxy)
    config = AutoConfig.from_pretrained(proxy)
    config.max_position_embeddings = 8192  # the reference models' context
    counts = {}
    with tempfile.TemporaryDirectory() as scratch:
        assets = ensure_demo_assets(log=lambda *a: None)
        for shape, (docs, languages) in TASKS.items():
            include = write_shaped_tasks(assets, Path(scratch) / shape, ("en",), docs, (shape,))
            for scorer in ("lm_eval", "shared_prefix"):
                cost = task_cost(config, tokenizer, [TaskRequest(task_name(shape, "en"))], include, args.batch_size,
                                 scorer)
                counts[(shape, scorer)] = (cost, languages)
                print(f"{shape:>11} {scorer:>13}: per language {cost.summary()}", flush=True)
    rows = []
    for label, gpus, model_config in MODELS:
        shape = ModelShape.from_config(model_config)
        row = {"model": label, "gpus": gpus}
        for scorer in ("lm_eval", "shared_prefix"):
            seconds = 0.0
            for task in TASKS:
                cost, languages = counts[(task, scorer)]
                # task seconds alone: the trial with tasks minus the trial without
                seconds += languages * (trial_seconds(shape, None, 0, 2048, 0, 2048, 989.0, tasks=cost)
                                        - trial_seconds(shape, None, 0, 2048, 0, 2048, 989.0))
            row[f"{scorer}_seconds_per_trial"] = seconds
            row[f"{scorer}_gpu_hours"] = seconds * TRIALS_PER_MODEL * gpus / 3600
        rows.append(row)
        print(f"{label:>20} {gpus} GPU(s): tasks per trial {row['lm_eval_seconds_per_trial']:,.0f} s with lm-eval's "
              f"HFLM, {row['shared_prefix_seconds_per_trial']:,.0f} s with shared prefixes; GPU-hours "
              f"{row['lm_eval_gpu_hours']:.1f} -> {row['shared_prefix_gpu_hours']:.1f}")
    before = sum(r["lm_eval_gpu_hours"] for r in rows)
    after = sum(r["shared_prefix_gpu_hours"] for r in rows)
    print(f"kurz2024 tasks, all 340 trials: {before:.1f} -> {after:.1f} GPU-hours ({before / after:.2f}x)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "stand_ins": "shaped tasks at the real sizes, English demo text, Gemma 3 tokenizer", "rows": rows,
            "positions": {f"{s}/{k}": {"per_language": c.positions, "rows": c.sequences, "languages": n}
                          for (s, k), (c, n) in counts.items()},
            "gpu_hours": {"lm_eval": before, "shared_prefix": after}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
