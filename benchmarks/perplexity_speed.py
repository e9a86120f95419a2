"""Tokens per second of our perplexity evaluation against lm-eval's `loglikelihood_rolling`, on the same
model, the same text, the same maximum length and the same batch size, side by side in one process.

    python benchmarks/perplexity_speed.py                                   # the demo study's settings
    python benchmarks/perplexity_speed.py --window 512 --max-tokens 0       # whole split, longest window

Text: each language's evaluation split of the demo corpus exactly as a trial reads it
(`engine.trial.evaluation_tokens`: documents joined by a blank line, cut to --max-tokens at a token
boundary). lm-eval gets that text as one document per language (decoded from the same token ids; the
script checks that lm-eval's tokenizer call gives back the very same ids and byte count).

Compared, each timed best of --repeats, repeats interleaved, after one untimed warm-up of each:
- ours: `engine.evaluate.suite.perplexity_of_tokens` (what a trial calls; the tokens are read and
  tokenized once per loaded model, so tokenizing is not in a trial's perplexity time; it is timed
  separately and shown);
- lm-eval, model path: `HFLM.loglikelihood_rolling(requests)` on an HFLM wrapping the already-loaded
  model (tokenizing the text is part of that call);
- lm-eval, whole path: `engine.evaluate.tasks.run_tasks` (HFLM on the loaded model + `simple_evaluate`)
  on a local `loglikelihood_rolling` task per language (`dataset_path: json`, absolute `data_files`),
  all languages in one call: what the stock harness does end to end (task building, dataset loading,
  metrics), as the project runs lm-eval tasks.

Before each timed round the script waits for the CPUs to be idle (benchmarks/quiet.py, --quiet-budget)
and prints how busy other processes kept them.

Windows differ by design. Ours: non-overlapping `[bos] + (window - 1)` tokens, each window predicts its
window - 1 text tokens and its first text token sees only [bos]. lm-eval's rolling windows (context_len
1): the first is `[prefix] + (window - 1)` tokens, every later one is `window` text tokens predicting
`window` tokens, the first of which sees one token of context (the previous window's last token), and
no later window starts with [bos]. So lm-eval needs ceil(N / window) windows where we need
ceil(N / (window - 1)), and the two differ in bits per byte; the breakdown (unless --no-breakdown) scores every
token both ways, untimed, and splits the difference into the tokens that open our windows and the rest.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval opens a progress bar per batch of windows
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from engine.data.sources import TextSourceConfig  # noqa: E402
from engine.evaluate.perplexity import windows_of  # noqa: E402
from engine.evaluate.suite import perplexity_of_tokens  # noqa: E402
from engine.models import ModelSource, load_model, prefix_token_id  # noqa: E402
from engine.trial import PerplexityConfig, evaluation_tokens  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quiet import QuietGate  # noqa: E402

TASK_PREFIX = "perplexity_speed"


def best_of(fn, repeats: int) -> tuple[float, object]:
    best, result = math.inf, None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - started)
    return best, result


def write_tasks(root: Path, texts: dict[str, str]) -> Path:
    """One local loglikelihood_rolling task per language, its one document the language's whole text."""
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    for lang, text in texts.items():
        path = data / f"{lang}.jsonl"
        path.write_text(json.dumps({"text": text}, ensure_ascii=False) + "\n", encoding="utf-8")
        (root / f"{TASK_PREFIX}_{lang}.yaml").write_text(
            f"task: {TASK_PREFIX}_{lang}\n"
            "dataset_path: json\n"
            "dataset_kwargs:\n"
            "  data_files:\n"
            f"    test: {path.resolve()}\n"
            "test_split: test\n"
            "output_type: loglikelihood_rolling\n"
            "doc_to_text: ''\n"
            "doc_to_target: text\n"
            "metric_list:\n"
            "  - metric: word_perplexity\n"
            "  - metric: byte_perplexity\n"
            "  - metric: bits_per_byte\n"
            "metadata:\n"
            "  version: 1\n", encoding="utf-8")
    return root


@torch.no_grad()
def per_token_nll(model, sequences: list[tuple[list[int], int]]) -> torch.Tensor:
    """Untimed reference: for each (sequence, n), the NLL (nats, float64) of its last n tokens given
    everything before them in the sequence, concatenated in order."""
    out = []
    for seq, n in sequences:
        ids = torch.tensor([seq])
        logits = model(input_ids=ids[:, :-1], use_cache=False).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        targets = ids[0, 1:]
        nll = -logp.gather(1, targets[:, None])[:, 0]
        out.append(nll[-n:])
    return torch.cat(out)


def breakdown(model, ids: list[int], n_bytes: int, window: int, prefix: int) -> dict:
    """Scores every text token the way each side does and splits the bits-per-byte difference into the
    tokens that open one of our windows after the first (predicted from [bos] alone by us, from one or
    more tokens of context by lm-eval) and all other tokens."""
    from lm_eval import utils

    ours = per_token_nll(model, [(w, len(w) - 1) for w in windows_of(ids, window, prefix)])
    rolling = [utils.make_disjoint_window(p) for p in
               utils.get_rolling_token_windows(token_list=ids, prefix_token=prefix, max_seq_len=window, context_len=1)]
    theirs = per_token_nll(model, [(ctx + cont, len(cont)) for ctx, cont in rolling])
    assert ours.numel() == theirs.numel() == len(ids)
    opening = torch.zeros(len(ids), dtype=torch.bool)
    opening[window - 1 :: window - 1] = True
    to_bpb = 1 / math.log(2) / n_bytes
    return {
        "ours_nll": float(ours.sum()), "lm_eval_nll": float(theirs.sum()),
        "our_openings": int(opening.sum()),
        "openings_nll_ours_mean": float(ours[opening].mean()) if opening.any() else None,
        "openings_nll_lm_eval_mean": float(theirs[opening].mean()) if opening.any() else None,
        "bpb_difference": float((ours - theirs).sum()) * to_bpb,
        "bpb_difference_openings": float((ours - theirs)[opening].sum()) * to_bpb,
        "bpb_difference_rest": float((ours - theirs)[~opening].sum()) * to_bpb,
    }


def common_text(tokenizer, lm, ids: list[int]) -> tuple[str, int]:
    """The text both sides evaluate: `ids` decoded, and how many trailing tokens had to be dropped for
    lm-eval's tokenizer call to give back exactly those ids (a cut at --max-tokens can fall inside a
    multi-byte character, which decodes to U+FFFD and so does not tokenize back)."""
    for trimmed in range(min(8, len(ids) - 1) + 1):
        kept = ids[: len(ids) - trimmed]
        text = tokenizer.decode(kept, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if lm.tok_encode(text) == kept:
            return text, trimmed
    raise SystemExit("the evaluation text does not tokenize back to its own ids")


def _window_nll_variant(use_cache: bool, mask_when_full: bool):
    """`engine.evaluate.perplexity.window_token_nll` with two call options changed (for --variants only;
    engine/ is not modified): `use_cache=False` (the forward builds no KV cache) and no attention
    mask when the batch has no padding (every window but a language's last is full)."""

    @torch.no_grad()
    def window_token_nll(model, batch, attention_mask):
        full = not mask_when_full and bool(attention_mask.all())
        kwargs = {} if use_cache else {"use_cache": False}
        logits = model(input_ids=batch, attention_mask=None if full else attention_mask, **kwargs).logits
        targets = batch[:, 1:].to(logits.device)
        weights = attention_mask[:, 1:].to(logits.device)
        rows = [torch.nn.functional.cross_entropy(logits[row, :-1].float(), targets[row], reduction="none")
                * weights[row] for row in range(logits.shape[0])]
        return torch.stack(rows)

    return window_token_nll


VARIANTS = {"as is": None, "use_cache=False": (False, True), "no mask on full batches": (True, False),
            "both": (False, False)}


def time_variants(model, tokenizer, tokens: dict, args) -> dict:
    """Our perplexity over all languages with each VARIANTS entry, best of --repeats, interleaved."""
    import engine.evaluate.perplexity as module

    original = module.window_token_nll  # what perplexity() calls per batch
    best, nll = {}, {}
    gate = QuietGate(args.quiet_budget / 2)
    try:
        for attempt in range(args.repeats + 1):  # the first round is a warm-up
            gate.wait()
            for name, options in VARIANTS.items():
                module.window_token_nll = original if options is None else _window_nll_variant(*options)
                started = time.perf_counter()
                nll[name] = sum(perplexity_of_tokens(model, tokenizer, ids, n_bytes, args.window, args.batch_size).nll
                                for ids, n_bytes in tokens.values())
                if attempt:
                    best[name] = min(best.get(name, math.inf), time.perf_counter() - started)
    finally:
        module.window_token_nll = original
    n = sum(len(ids) for ids, _ in tokens.values())
    return {name: {"seconds": best[name], "tokens_per_s": n / best[name],
                   "nll_relative_change": nll[name] / nll["as is"] - 1} for name in VARIANTS}


def bench_model(name: str, path: Path, corpus: Path, languages: list[str], args) -> dict:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from engine.evaluate.tasks import TaskRequest, run_tasks

    model, tokenizer = load_model(ModelSource(str(path), dtype="float32"))
    config = PerplexityConfig(TextSourceConfig(kind="local", path=corpus, split="evaluation"), args.window,
                              args.max_tokens or None)
    prefix = prefix_token_id(tokenizer)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, max_length=args.window,
              device="cpu")
    if lm.prefix_token_id != prefix:
        raise SystemExit(f"{name}: lm-eval's prefix token {lm.prefix_token_id} is not ours ({prefix})")

    texts, tokens, rows = {}, {}, {}
    for lang in languages:
        ids, n_bytes = evaluation_tokens(config, lang, tokenizer)
        tokenize_s, _ = best_of(lambda lang=lang: evaluation_tokens(config, lang, tokenizer), args.repeats)
        text, trimmed = common_text(tokenizer, lm, ids)
        if trimmed:  # the cut fell inside a character: both sides get the text without it
            ids = ids[: len(ids) - trimmed]
            n_bytes = len(text.encode("utf-8"))
        texts[lang], tokens[lang] = text, (ids, n_bytes)
        rows[lang] = {"language": lang, "tokens": len(ids), "bytes": n_bytes, "tokenize_s": tokenize_s,
                      "trimmed_tokens": trimmed,
                      "our_windows": len(windows_of(ids, args.window, prefix)),
                      "lm_eval_windows": math.ceil(len(ids) / args.window)}

    def ours(lang):
        ids, n_bytes = tokens[lang]
        return perplexity_of_tokens(model, tokenizer, ids, n_bytes, args.window, args.batch_size)

    def lm_eval_api(lang):
        request = Instance(request_type="loglikelihood_rolling", doc={"text": texts[lang]},
                           arguments=(texts[lang],), idx=0)
        return lm.loglikelihood_rolling([request], disable_tqdm=True)[0]

    with tempfile.TemporaryDirectory(prefix="perplexity_speed_") as tmp:
        include = write_tasks(Path(tmp), texts)
        requests = [TaskRequest(f"{TASK_PREFIX}_{lang}") for lang in languages]

        def lm_eval_tasks():
            return run_tasks(model, tokenizer, requests, include_path=include, batch_size=args.batch_size,
                             max_length=args.window, device="cpu")

        for lang in languages:  # warm-up: allocator, lm-eval's task manager and dataset cache
            ours(lang)
            lm_eval_api(lang)
        lm_eval_tasks()
        best = {"ours": {}, "api": {}, "tasks": math.inf}
        results = {}
        gate = QuietGate(args.quiet_budget)
        busy = []
        for _ in range(args.repeats):
            busy.append(gate.wait())
            for lang in languages:
                for key, fn in (("ours", ours), ("api", lm_eval_api)):
                    seconds, results[(key, lang)] = best_of(lambda fn=fn, lang=lang: fn(lang), 1)
                    best[key][lang] = min(best[key].get(lang, math.inf), seconds)
            seconds, results["tasks"] = best_of(lm_eval_tasks, 1)
            best["tasks"] = min(best["tasks"], seconds)

    for lang in languages:
        row = rows[lang]
        ours_result = results[("ours", lang)]
        row["ours_s"], row["lm_eval_api_s"] = best["ours"][lang], best["api"][lang]
        row["ours_bpb"] = ours_result.bits_per_byte
        row["lm_eval_api_bpb"] = -results[("api", lang)] / math.log(2) / row["bytes"]
        row["lm_eval_tasks_bpb"] = results["tasks"]["tasks"][f"{TASK_PREFIX}_{lang}"]["metrics"]["bits_per_byte"]
        if args.breakdown:
            ids, n_bytes = tokens[lang]
            parts = breakdown(model, ids, n_bytes, args.window, prefix)
            for side, value in (("ours", ours_result.nll), ("lm_eval", -results[("api", lang)])):
                if not math.isclose(parts[f"{side}_nll"], value, rel_tol=1e-4):
                    raise SystemExit(f"{name}/{lang}: reference NLL {parts[f'{side}_nll']} != {side} {value}")
            row["breakdown"] = parts
    variants = time_variants(model, tokenizer, tokens, args) if args.variants else None
    total_tokens = sum(r["tokens"] for r in rows.values())
    total = {"tokens": total_tokens, "bytes": sum(r["bytes"] for r in rows.values()),
             "ours_s": sum(r["ours_s"] for r in rows.values()),
             "ours_with_tokenizing_s": sum(r["ours_s"] + r["tokenize_s"] for r in rows.values()),
             "lm_eval_api_s": sum(r["lm_eval_api_s"] for r in rows.values()),
             "lm_eval_tasks_s": best["tasks"]}
    total["others_busy_before_rounds"] = busy
    return {"model": name, "languages": list(rows.values()), "total": total, "variants": variants}


def print_model(result: dict) -> None:
    print(f"\n## {result['model']}")
    print(f"{'lang':>4} {'tokens':>6} {'windows':>9} {'ours tok/s':>10} {'lm-eval tok/s':>13} {'ratio':>6} "
          f"{'bpb ours':>9} {'bpb lm-eval':>11} {'diff':>7} {'openings':>8} {'rest':>7}")
    for row in result["languages"]:
        parts = row.get("breakdown", {})
        print(f"{row['language']:>4} {row['tokens']:>6} {row['our_windows']:>4}/{row['lm_eval_windows']:<4} "
              f"{row['tokens'] / row['ours_s']:>10.0f} {row['tokens'] / row['lm_eval_api_s']:>13.0f} "
              f"{row['lm_eval_api_s'] / row['ours_s']:>5.2f}x {row['ours_bpb']:>9.4f} {row['lm_eval_api_bpb']:>11.4f} "
              f"{row['ours_bpb'] - row['lm_eval_api_bpb']:>+7.4f} {parts.get('bpb_difference_openings', math.nan):>+8.4f} "
              f"{parts.get('bpb_difference_rest', math.nan):>+7.4f}")
    total = result["total"]
    n = total["tokens"]
    print(f"all {n} tokens: ours {n / total['ours_s']:.0f} tok/s ({n / total['ours_with_tokenizing_s']:.0f} with "
          f"tokenizing); lm-eval loglikelihood_rolling {n / total['lm_eval_api_s']:.0f} tok/s; lm-eval task via "
          f"simple_evaluate {n / total['lm_eval_tasks_s']:.0f} tok/s; ours / lm-eval: "
          f"{total['lm_eval_api_s'] / total['ours_s']:.2f}x (model path), "
          f"{total['lm_eval_tasks_s'] / total['ours_s']:.2f}x (whole path)")
    for variant, row in (result.get("variants") or {}).items():
        print(f"  ours, {variant:<24} {row['tokens_per_s']:>7.0f} tok/s  (NLL changed by {row['nll_relative_change']:+.1e})")
    print(f"CPUs busy (others) before each timed round: {', '.join(f'{b:.0%}' for b in total['others_busy_before_rounds'])}")
    worst = max(abs(r["lm_eval_tasks_bpb"] - r["lm_eval_api_bpb"]) for r in result["languages"])
    print(f"lm-eval task bits per byte equal its loglikelihood_rolling's to {worst:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["demo-llama", "demo-cohere"])
    parser.add_argument("--languages", nargs="+", default=None, help="default: all the demo's languages")
    parser.add_argument("--window", type=int, default=128, help="tokens per window = lm-eval's max_length")
    parser.add_argument("--max-tokens", type=int, default=4096, help="evaluation tokens per language; 0: all")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-breakdown", dest="breakdown", action="store_false")
    parser.add_argument("--quiet-budget", type=float, default=60.0,
                        help="seconds per model to wait for idle CPUs before timed rounds (0: never wait)")
    parser.add_argument("--variants", action="store_true",
                        help="also time our evaluation with window_token_nll's call options changed (in this process only)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    from importlib.metadata import version

    import lm_eval  # noqa: F401  (version below)
    import transformers

    from engine.demo import ensure_demo_assets

    assets = ensure_demo_assets()
    languages = args.languages or list(assets.languages)
    print(f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} "
          f"threads), transformers {transformers.__version__}, lm-eval {version('lm_eval')}, "
          f"{datetime.now(UTC):%Y-%m-%d}")
    print(f"# load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"# window {args.window}, max tokens {args.max_tokens or 'all'}, batch {args.batch_size}, float32, "
          f"best of {args.repeats}; tok/s = predicted text tokens per second")
    out = {"args": vars(args), "torch": torch.__version__, "transformers": transformers.__version__,
           "lm_eval": version("lm_eval"), "threads": torch.get_num_threads(), "models": []}
    for name in args.models:
        result = bench_model(name, assets.model_dirs[name], assets.corpus_dir, languages, args)
        print_model(result)
        out["models"].append(result)
    print(f"# load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
