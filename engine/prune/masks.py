"""Mask builders. A mask is a bool tensor shaped like the weight, True where the weight is pruned.

Ties are broken by position (as the first k of a stable sort), so a mask is a deterministic function of
its scores and the pruned count is exact.
"""
from __future__ import annotations

import torch


def exact_count(total: int, fraction: float) -> int:
    return int(round(total * fraction))


def lowest_k_per_row(scores: torch.Tensor, k: int) -> torch.Tensor:
    """True at the `k` lowest scores of every row of a 2-D tensor, ties going to the earlier position:
    exactly the first k of a stable sort, found by a selection (kthvalue) instead of a full sort, which
    is 2-6x faster on CPUs (benchmarks/mask_selection.py)."""
    rows, cols = scores.shape
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= cols:
        return torch.ones_like(scores, dtype=torch.bool)
    if torch.isnan(scores).any():  # NaN has no rank for kthvalue; a stable sort puts it last
        mask = torch.zeros_like(scores, dtype=torch.bool)
        return mask.scatter_(1, torch.sort(scores, dim=1, stable=True).indices[:, :k], True)
    threshold = torch.kthvalue(scores, k, dim=1, keepdim=True).values
    below = scores < threshold
    tied = scores == threshold
    room = k - below.sum(dim=1, keepdim=True)  # how many of the tied scores still fit, from the left
    return below | (tied & (torch.cumsum(tied, dim=1) <= room))


def lowest_in_rows(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Prune the `round(cols * fraction)` lowest scores of every row (Wanda's per-output comparison group)."""
    return lowest_k_per_row(scores, exact_count(scores.shape[1], fraction))


def lowest_in_matrix(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Prune the `round(numel * fraction)` lowest scores of the whole matrix (one threshold per matrix)."""
    k = exact_count(scores.numel(), fraction)
    return lowest_k_per_row(scores.reshape(1, -1), k).view_as(scores)


def check_nm(cols: int, n: int, m: int, where: str = "") -> None:
    if cols % m:
        at = f" of {where}" if where else ""
        raise ValueError(f"N:M {n}:{m} needs the input width{at} ({cols}) to be a multiple of {m}")


def lowest_n_of_m(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the `n` lowest scores in every group of `m` consecutive inputs of each row."""
    rows, cols = scores.shape
    check_nm(cols, n, m)
    # A sort over groups of m (m is small) stays free of host synchronisation, so SparseGPT's N:M column
    # loop, which calls this, can be captured as a CUDA graph.
    groups = scores.reshape(rows, cols // m, m)
    order = torch.sort(groups, dim=2, stable=True).indices[:, :, :n]
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, order, True)
    return mask.reshape(rows, cols)
