"""The analyses' math, as pure functions on tensors (definitions in docs/analyses.md)."""
from __future__ import annotations

import math

import numpy as np
import torch

# -- masks ------------------------------------------------------------------------------------------

def packed_iou(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """Intersection and union of the pruned positions of two bit-packed masks of one matrix."""
    return int(np.bitwise_count(a & b).sum()), int(np.bitwise_count(a | b).sum())


def iou(intersection: int, union: int) -> float:
    """1 for identical masks, 0 for disjoint ones; two empty masks count as identical."""
    return intersection / union if union else 1.0


# -- language-specific neurons (LAPE) -----------------------------------------------------------------

def activation_probability(active: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[languages, layers, neurons] counts and [languages] token counts -> P(activation > 0)."""
    return active.double() / tokens.double().clamp(min=1).view(-1, *([1] * (active.dim() - 1)))


def lape(probability: torch.Tensor) -> torch.Tensor:
    """Language activation probability entropy per neuron (Tang et al., 2024): the entropy of the
    activation probabilities over languages (dimension 0), normalised to sum to 1. A neuron active in one
    language only has LAPE 0; equally in all k languages, log k. Never-active neurons get NaN."""
    total = probability.sum(dim=0)
    q = probability / total.clamp(min=1e-30)
    entropy = -(torch.where(q > 0, q * q.log(), torch.zeros_like(q))).sum(dim=0)
    return torch.where(total > 0, entropy, torch.full_like(entropy, math.nan))


def language_specific(probability: torch.Tensor, entropy: torch.Tensor, lape_quantile: float,
                      activation_threshold: float) -> torch.Tensor:
    """Neurons in the lowest `lape_quantile` of LAPE whose activation probability reaches
    `activation_threshold` in some language: [layers, neurons] bool."""
    finite = entropy[~entropy.isnan()]
    if finite.numel() == 0:
        return torch.zeros_like(entropy, dtype=torch.bool)
    cut = torch.quantile(finite.float(), lape_quantile) if finite.numel() <= 2**24 else \
        torch.kthvalue(finite.float().cpu(), max(1, int(lape_quantile * finite.numel()))).values
    return (entropy <= cut) & (probability.max(dim=0).values >= activation_threshold)


def neuron_changes(dense: torch.Tensor, pruned: torch.Tensor) -> dict[str, int]:
    """How many language-specific neurons of the dense model survive pruning, vanish, and appear."""
    return {"dense": int(dense.sum()), "pruned": int(pruned.sum()), "survive": int((dense & pruned).sum()),
            "vanish": int((dense & ~pruned).sum()), "appear": int((~dense & pruned).sum())}


# -- latent subspaces -----------------------------------------------------------------------------------

def language_subspace(means: torch.Tensor, rank: int | None = None) -> torch.Tensor:
    """An orthonormal basis [hidden, r] of the language-specific subspace of one layer: the leading right
    singular vectors of the language means centred over languages (Xie et al., 2022). `means` is
    [languages, hidden]; r defaults to languages - 1, the most centred means can span."""
    centred = (means - means.mean(dim=0, keepdim=True)).double()
    _, singular, vt = torch.linalg.svd(centred, full_matrices=False)
    r = min(rank or means.shape[0] - 1, int((singular > singular.max() * 1e-10).sum()) if singular.numel() else 0)
    return vt[:r].T


def subspace_snr(dense: torch.Tensor, pruned: torch.Tensor, basis: torch.Tensor) -> tuple[float, float]:
    """SNR in dB of a pruned representation against the dense one, in the subspace of `basis`
    ([hidden, r], orthonormal) and in its orthogonal complement: 10 log10(||P h_d||^2 / ||P (h_p - h_d)||^2).
    Identical representations give +inf; a zero signal gives -inf."""
    dense, pruned, basis = dense.double(), pruned.double(), basis.double()
    noise = pruned - dense

    def in_subspace(v):
        return basis @ (basis.T @ v)

    out = []
    for project in (in_subspace, lambda v: v - in_subspace(v)):
        signal, error = float(project(dense).pow(2).sum()), float(project(noise).pow(2).sum())
        if error <= 1e-30 * max(signal, 1e-30):
            out.append(math.inf)
        elif signal == 0:
            out.append(-math.inf)
        else:
            out.append(10 * math.log10(signal / error))
    return out[0], out[1]
