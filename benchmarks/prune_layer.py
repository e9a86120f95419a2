"""Time and peak memory to prune one decoder layer, per method, with shared input statistics (q/k/v
and gate/up share one) against the plain way (every linear layer accumulates its own), side by side.

    python benchmarks/prune_layer.py --hidden 2048 --tokens 4096          # CPU-sized
    python benchmarks/prune_layer.py --hidden 4096 --tokens 262144 --device cuda   # 128 x 2048 tokens

Shapes follow Llama-3: MLP width 3.5 x hidden, grouped-query attention with 8 KV heads.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from engine.prune.pruners import make_pruner
from engine.prune.sequential import prune_sequentially
from engine.prune.sparsity import parse_sparsity


def one_layer_model(hidden: int, seq_len: int, dtype: torch.dtype) -> LlamaForCausalLM:
    heads = hidden // 128
    config = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=int(hidden * 3.5),
                         num_hidden_layers=1, num_attention_heads=heads, num_key_value_heads=min(8, heads),
                         max_position_embeddings=seq_len)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype).eval()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(hidden: int, tokens: int, seq_len: int, method: str, sparsity: str, share: bool, device: str,
        dtype: torch.dtype) -> dict:
    model = one_layer_model(hidden, seq_len, dtype)
    ids = torch.randint(0, 256, (max(1, tokens // seq_len), seq_len), generator=torch.Generator().manual_seed(1))
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    report = prune_sequentially(model, make_pruner(method), parse_sparsity(sparsity), ids, device=device,
                                batch_size=8, share_statistics=share)
    if device == "cuda":
        torch.cuda.synchronize()
    return {
        "hidden": hidden, "tokens": ids.numel(), "method": method, "sparsity": sparsity,
        "shared_statistics": share, "seconds": time.perf_counter() - started,
        "statistics": report.statistics_computed,
        "statistics_mib": report.peak_statistics_bytes / 2**20,
        "peak_accelerator_mib": (report.peak_accelerator_bytes or 0) / 2**20 if device == "cuda" else None,
        "peak_rss_mib": peak_rss_mib(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, nargs="+", default=[2048])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    parser.add_argument("--sparsity", default="0.5")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}")
    rows = []
    print(f"{'hidden':>6} {'tokens':>7} {'method':>9} {'plain s':>8} {'shared s':>8} {'ratio':>6} {'stats':>7} "
          f"{'stats MiB plain -> shared':>26}")
    for hidden in args.hidden:
        for method in args.methods:
            timings = {}
            for share in (False, True):
                best = min((run(hidden, args.tokens, args.seq_len, method, args.sparsity, share, args.device, dtype)
                            for _ in range(args.repeats)), key=lambda r: r["seconds"])
                rows.append(best)
                timings[share] = best
            plain, shared = timings[False], timings[True]
            print(f"{hidden:>6} {shared['tokens']:>7} {method:>9} {plain['seconds']:>8.2f} {shared['seconds']:>8.2f} "
                  f"{plain['seconds'] / shared['seconds']:>5.2f}x {plain['statistics']:>3}->{shared['statistics']} "
                  f"{plain['statistics_mib']:>12.1f} -> {shared['statistics_mib']:.1f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
