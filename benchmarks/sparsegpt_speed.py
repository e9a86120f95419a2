"""SparseGPT before and after, side by side in one run, at Llama-3-8B's shapes (benchmarks/gpu_trial.py
found calibration + SparseGPT the slowest stage of a trial, at 6% of the GPU's measured peak).

    python benchmarks/sparsegpt_speed.py [--tokens 262144] [--device cuda]

Two changes, each measured against what it replaced:
- the column loop: `sparsegpt_prune` (two kernels per column, each block's loop replayed as one CUDA
  graph; also timed without the graphs) against `sparsegpt_prune_columnwise` (the paper's steps one by
  one, eight kernels per column), on each of a block's weight shapes; masks agree up to float ties;
- the Hessian sum_t x_t x_t^T of bf16 activations: float32 products against TF32 tensor-core
  products, which are exact for bf16 inputs (the largest difference is printed to show it).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from engine.prune import sparsegpt_math
from engine.prune.sparsegpt_math import sparsegpt_prune, sparsegpt_prune_columnwise
from engine.prune.sparsity import parse_sparsity
from engine.prune.statistics import InputStatistics

# (out, in) of a Llama-3-8B block's linears, and how many of each (q, k, v, o, gate, up, down)
SHAPES = {(4096, 4096): 2, (1024, 4096): 2, (14336, 4096): 2, (4096, 14336): 1}
INPUT_WIDTHS = {4096: 3, 14336: 1}  # distinct Hessians per block: q/k/v and gate/up share theirs


def timed(fn, device: torch.device, repeats: int = 1) -> float:
    fn()  # warm-up (kernels, allocator)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - started)
    return best


def hessian_seconds(width: int, tokens: int, device: torch.device, tf32: bool) -> tuple[float, torch.Tensor]:
    chunk = 16384  # a calibration batch of 8 x 2048 tokens
    generator = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(chunk, width, device=device, generator=generator).to(torch.bfloat16)
    stats = InputStatistics(width, True, device)

    def run():
        stats.hessian.zero_()
        for _ in range(tokens // chunk):
            if tf32:
                stats.add(x)
            else:  # the float32 products this replaced
                y = x.to(torch.float32)
                stats.hessian.addmm_(y.T, y)

    return timed(run, device), stats.hessian.clone()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=262_144)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scale", type=int, default=1, help="divide every width by this (CPU smoke runs)")
    parser.add_argument("--json")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# {name}, torch {torch.__version__}, {args.tokens:,} calibration tokens", flush=True)
    rows = []
    print(f"{'stage':<34} {'before s':>9} {'after s':>9} {'ratio':>7}  per block")
    block_before = block_after = 0.0
    for sparsity in ("0.5", "2:4"):
        for (out_features, in_features), count in SHAPES.items():
            out_features, in_features = out_features // args.scale, in_features // args.scale
            generator = torch.Generator(device=device).manual_seed(0)
            weight = torch.randn(out_features, in_features, device=device, generator=generator)
            x = torch.randn(4 * in_features, in_features, device=device, generator=generator)
            hessian = x.T @ x
            target = parse_sparsity(sparsity)
            before = timed(lambda w=weight, h=hessian, t=target: sparsegpt_prune_columnwise(w, h, t), device)
            sparsegpt_math.CUDA_GRAPHS = False
            eager = timed(lambda w=weight, h=hessian, t=target: sparsegpt_prune(w, h, t), device)
            sparsegpt_math.CUDA_GRAPHS = True
            after = timed(lambda w=weight, h=hessian, t=target: sparsegpt_prune(w, h, t), device)
            agree = float((sparsegpt_prune(weight, hessian, target).mask
                           == sparsegpt_prune_columnwise(weight, hessian, target).mask).float().mean())
            label = f"prune {out_features}x{in_features} {sparsity}"
            print(f"{label:<34} {before:>9.3f} {after:>9.3f} {before / after:>6.1f}x  x{count}  (no graphs {eager:.3f} s; "
                  f"masks agree {agree:.5%})", flush=True)
            rows.append({"stage": label, "before": before, "after": after, "no_graphs": eager, "count": count,
                         "mask_agreement": agree})
            if sparsity == "0.5":
                block_before += count * before
                block_after += count * after
    hessians_before = hessians_after = 0.0
    for width, count in INPUT_WIDTHS.items():
        width //= args.scale
        before, exact = hessian_seconds(width, args.tokens, device, tf32=False)
        after, fast = hessian_seconds(width, args.tokens, device, tf32=True)
        difference = float((fast - exact).abs().max() / exact.abs().max())
        label = f"hessian {width} wide"
        print(f"{label:<34} {before:>9.3f} {after:>9.3f} {before / after:>6.1f}x  x{count}  max rel. diff {difference:.1e}",
              flush=True)
        rows.append({"stage": label, "before": before, "after": after, "count": count, "max_rel_diff": difference})
        hessians_before += count * before
        hessians_after += count * after
    total_before, total_after = block_before + hessians_before, block_after + hessians_after
    print(f"{'one block, 50% (prune + Hessians)':<34} {total_before:>9.2f} {total_after:>9.2f} "
          f"{total_before / total_after:>6.1f}x")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": name, "tokens": args.tokens, "rows": rows, "block_before": total_before,
                       "block_after": total_after}, handle, indent=1)


if __name__ == "__main__":
    main()
