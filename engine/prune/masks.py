"""Mask builders. A mask is a bool tensor shaped like the weight, True where the weight is pruned.

Ties are broken by position (stable sort), so a mask is a deterministic function of its scores and
the pruned count is exact.
"""
from __future__ import annotations

import torch


def exact_count(total: int, fraction: float) -> int:
    return int(round(total * fraction))


def lowest_in_rows(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Prune the `round(cols * fraction)` lowest scores of every row (Wanda's per-output comparison group)."""
    rows, cols = scores.shape
    k = exact_count(cols, fraction)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k:
        order = torch.sort(scores, dim=1, stable=True).indices[:, :k]
        mask.scatter_(1, order, True)
    return mask


def lowest_in_matrix(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Prune the `round(numel * fraction)` lowest scores of the whole matrix (one threshold per matrix)."""
    k = exact_count(scores.numel(), fraction)
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k:
        mask[torch.sort(scores.flatten(), stable=True).indices[:k]] = True
    return mask.view_as(scores)


def check_nm(cols: int, n: int, m: int, where: str = "") -> None:
    if cols % m:
        at = f" of {where}" if where else ""
        raise ValueError(f"N:M {n}:{m} needs the input width{at} ({cols}) to be a multiple of {m}")


def lowest_n_of_m(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the `n` lowest scores in every group of `m` consecutive inputs of each row."""
    rows, cols = scores.shape
    check_nm(cols, n, m)
    groups = scores.reshape(rows, cols // m, m)
    order = torch.sort(groups, dim=2, stable=True).indices[:, :, :n]
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, order, True)
    return mask.reshape(rows, cols)
