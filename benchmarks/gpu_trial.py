"""One trial's stages at Llama-3-8B's shapes on one GPU: calibration + Wanda, calibration + SparseGPT,
perplexity over seven languages; seconds, peak GPU memory, and how far each is from the GPU's compute
bound (FLOPs done / seconds / peak FLOP/s).

    python benchmarks/gpu_trial.py                       # Llama-3-8B shapes, 128 x 2048 calibration tokens,
                                                         # 7 x 262,144 evaluation tokens (sweep/studies/kurz2024.yaml)
    python benchmarks/gpu_trial.py --tiny                # a CPU smoke run of the same code

The model is random-init (no hub here) with Llama-3-8B's config; token ids are random. Neither changes
the work done: same matrix shapes, same number of tokens. Peak FLOP/s is measured in the same run (a
bf16 8192^3 matrix product) and the datasheet figure is given beside it. FLOP counts are for matrix
products only (2 x m x n x k), written out per stage in engine/flops.py; elementwise work is left out,
so the fractions are upper bounds of what the stage could gain.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from engine import flops
from engine.evaluate.perplexity import perplexity
from engine.prune.pruners import make_pruner
from engine.prune.sequential import prune_sequentially
from engine.prune.sparsity import parse_sparsity
from engine.snapshot import DenseSnapshot

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0)
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=448, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)
DATASHEET_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "A10G": 125.0, "L4": 121.0}  # bf16 dense


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    started = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 10 * 2 * 8192**3 / (time.perf_counter() - started) / 1e12


def dims(c: dict) -> flops.Dims:
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    return flops.Dims(hidden=c["hidden_size"], intermediate=c["intermediate_size"], layers=c["num_hidden_layers"],
                      q_width=c["num_attention_heads"] * head_dim, kv_width=c["num_key_value_heads"] * head_dim,
                      vocab=c["vocab_size"])


def build(config: dict, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = LlamaForCausalLM(LlamaConfig(**config, attn_implementation="sdpa"))
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small shapes, for a CPU smoke run")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--eval-tokens", type=int, default=262_144, help="per language")
    parser.add_argument("--languages", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--methods", nargs="*", default=["wanda", "sparsegpt"])
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.tiny:
        args.samples, args.seq_len, args.eval_tokens = min(args.samples, 8), min(args.seq_len, 128), min(args.eval_tokens, 2048)
    config = TINY if args.tiny else LLAMA3_8B
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    datasheet = next((v for k, v in DATASHEET_TFLOPS.items() if k in name), None)
    peak = measured_peak_tflops(device)
    out: dict = {"device": name, "torch": torch.__version__, "config": config, "samples": args.samples,
                 "seq_len": args.seq_len, "eval_tokens_per_language": args.eval_tokens, "languages": args.languages,
                 "batch_size": args.batch_size, "measured_peak_tflops": peak, "datasheet_tflops": datasheet,
                 "stages": {}}
    print(f"# {name}, torch {torch.__version__}; bf16 matmul peak measured {peak or 0:.0f} TFLOP/s "
          f"(datasheet {datasheet or '?'})", flush=True)

    started = time.perf_counter()
    model = build(config, device, dtype)
    sync(device)
    out["build_seconds"] = time.perf_counter() - started
    parameters = sum(p.numel() for p in model.parameters())
    out["parameters"] = parameters
    started = time.perf_counter()
    snapshot = DenseSnapshot(model)
    out["snapshot_seconds"] = time.perf_counter() - started
    print(f"# {parameters:,} parameters; built in {out['build_seconds']:.1f} s, dense snapshot to host "
          f"{out['snapshot_seconds']:.1f} s", flush=True)

    generator = torch.Generator().manual_seed(1)
    calibration = torch.randint(0, config["vocab_size"], (args.samples, args.seq_len), generator=generator)
    tokens = calibration.numel()
    rows = []
    for method in args.methods:
        reset_peak(device)
        sync(device)
        started = time.perf_counter()
        report = prune_sequentially(model, make_pruner(method), parse_sparsity("0.5"), calibration, device=device,
                                    batch_size=args.batch_size)
        sync(device)
        seconds = time.perf_counter() - started
        work = flops.pruning(dims(config), method, tokens, args.seq_len)
        rows.append((f"calibration + {method}", seconds, peak_gib(device), work))
        started = time.perf_counter()
        snapshot.restore()
        out["restore_seconds"] = time.perf_counter() - started
        out["stages"][method] = {"seconds": seconds, "peak_gib": peak_gib(device), "flops": work,
                                 "calibration_tokens": tokens, "statistics": report.statistics_computed,
                                 "extra_dampening": len(report.extra_dampening)}

    ids = torch.randint(0, config["vocab_size"], (args.eval_tokens,), generator=generator).tolist()
    reset_peak(device)
    sync(device)
    started = time.perf_counter()
    for _ in range(args.languages):
        result = perplexity(model, ids, args.eval_tokens * 4, window=args.seq_len, prefix_id=1,
                            batch_size=args.batch_size)
    sync(device)
    seconds = time.perf_counter() - started
    eval_tokens = args.languages * args.eval_tokens
    work = flops.evaluation(dims(config), eval_tokens, args.seq_len)
    rows.append((f"perplexity, {args.languages} languages", seconds, peak_gib(device), work))
    out["stages"]["perplexity"] = {"seconds": seconds, "peak_gib": peak_gib(device), "flops": work,
                                   "tokens": eval_tokens, "tokens_per_second": eval_tokens / seconds,
                                   "finite": bool(result.token_perplexity == result.token_perplexity)}

    print(f"{'stage':<28} {'seconds':>8} {'peak GiB':>9} {'TFLOP':>8} {'TFLOP/s':>8} {'of measured':>11} {'of datasheet':>12}")
    for label, seconds, gib, work in rows:
        rate = work / seconds / 1e12
        print(f"{label:<28} {seconds:>8.1f} {gib or 0:>9.1f} {work / 1e12:>8.0f} {rate:>8.1f} "
              f"{(rate / peak if peak else 0):>10.1%} {(rate / datasheet if datasheet else 0):>11.1%}")
    out["restore_seconds"] = out.get("restore_seconds")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(out, handle, indent=1)


if __name__ == "__main__":
    main()
