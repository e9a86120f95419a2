"""Choosing the k lowest scores: a stable sort (before) against a selection with ties broken by position
(`engine.prune.masks.lowest_k_per_row`, after), side by side in one run, masks compared bit for bit.

    python benchmarks/mask_selection.py               # Gemma 3 270M and Llama-3-8B matrix shapes
    python benchmarks/mask_selection.py --threads 1

Three uses: magnitude (one threshold per matrix), Wanda (per row) and SparseGPT's per-block choice (one
threshold over a rows x 128 block), each at 50%. The median of `--repeats` runs is reported.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from engine.prune.masks import lowest_k_per_row  # noqa: E402

SHAPES = {"gemma3-270m mlp.down_proj": (640, 2048), "gemma3-270m mlp.up_proj": (2048, 640),
          "llama3-8b mlp.down_proj": (4096, 14336)}


def stable_sort_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(1, torch.sort(scores, dim=1, stable=True).indices[:, :k], True)


def median_seconds(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeats}")
    print(f"{'matrix':<28}{'use':<12}{'sort ms':>10}{'select ms':>11}{'ratio':>8}  identical")
    for name in args.shapes:
        rows, cols = SHAPES[name]
        scores = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)).abs()
        block = scores[:, :128].contiguous()
        cases = {"magnitude": (scores.reshape(1, -1), scores.numel() // 2),
                 "wanda": (scores, cols // 2),
                 "sparsegpt": (block.reshape(1, -1), block.numel() // 2)}
        for use, (matrix, k) in cases.items():
            identical = torch.equal(stable_sort_mask(matrix, k), lowest_k_per_row(matrix, k))
            before = median_seconds(lambda matrix=matrix, k=k: stable_sort_mask(matrix, k), args.repeats)
            after = median_seconds(lambda matrix=matrix, k=k: lowest_k_per_row(matrix, k), args.repeats)
            print(f"{name:<28}{use:<12}{before * 1e3:>10.1f}{after * 1e3:>11.1f}{before / after:>7.1f}x  {identical}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
