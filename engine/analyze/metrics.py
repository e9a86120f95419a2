"""The analyses' math, as pure functions on tensors (definitions in docs/analyses.md)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# torch.quantile refuses inputs of more than 2**24 elements.
_TORCH_QUANTILE_LIMIT = 2**24


def quantile(values: torch.Tensor, q: float) -> float:
    """torch.quantile's default (linear interpolation between the two nearest order statistics) of all
    elements, at any size: above torch's limit the two order statistics come from kthvalue."""
    flat = values.detach().flatten().double().cpu()
    n = flat.numel()
    if n == 0:
        raise ValueError("quantile of no values")
    if n <= _TORCH_QUANTILE_LIMIT:
        return float(torch.quantile(flat, q))
    position = q * (n - 1)
    low = math.floor(position)
    high = min(low + 1, n - 1)
    below = float(torch.kthvalue(flat, low + 1).values)
    above = float(torch.kthvalue(flat, high + 1).values) if high != low else below
    return below + (above - below) * (position - low)

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
    cut = quantile(finite, lape_quantile)
    return (entropy <= cut) & (probability.max(dim=0).values >= activation_threshold)


def neuron_changes(dense: torch.Tensor, pruned: torch.Tensor) -> dict[str, int]:
    """How many language-specific neurons of the dense model survive pruning, vanish, and appear."""
    return {"dense": int(dense.sum()), "pruned": int(pruned.sum()), "survive": int((dense & pruned).sum()),
            "vanish": int((dense & ~pruned).sum()), "appear": int((~dense & pruned).sum())}


@dataclass(frozen=True)
class NeuronSummary:
    mean_lape: float | None  # over neurons active in some language
    active_neurons: int
    specific_per_language: list[int]  # language-specific neurons whose probability reaches the threshold there


def neuron_summary(probability: torch.Tensor, entropy: torch.Tensor, specific: torch.Tensor,
                   activation_threshold: float) -> NeuronSummary:
    """What the neuron table reports of one model: mean LAPE, active neurons, and per language the
    language-specific neurons that language owns (probability >= the threshold in it)."""
    finite = entropy[~entropy.isnan()]
    owners = (probability >= activation_threshold) & specific.unsqueeze(0)
    return NeuronSummary(float(finite.mean()) if finite.numel() else None, int(finite.numel()),
                         [int(owners[i].sum()) for i in range(owners.shape[0])])


def lape_histogram(entropy: torch.Tensor, languages: int, bins: int) -> list[tuple[float, float, int]]:
    """(low, high, neurons) of `bins` equal bins over [0, log languages], the range of LAPE; neurons
    never active (NaN) are left out."""
    top = math.log(languages)
    edges = torch.linspace(0, top, bins + 1, dtype=torch.float64)
    finite = entropy[~entropy.isnan()]
    counts = torch.histc(finite.double().clamp(0, top), bins=bins, min=0, max=top) if finite.numel() else \
        torch.zeros(bins)
    return [(float(edges[b]), float(edges[b + 1]), int(counts[b])) for b in range(bins)]


# -- latent subspaces -----------------------------------------------------------------------------------

def language_subspace(means: torch.Tensor, rank: int | None = None) -> torch.Tensor:
    """An orthonormal basis [hidden, r] of the language-specific subspace of one layer: the leading right
    singular vectors of the language means centred over languages (Xie et al., 2022). `means` is
    [languages, hidden]; r defaults to languages - 1, the most centred means can span."""
    centred = (means - means.mean(dim=0, keepdim=True)).double()
    _, singular, vt = torch.linalg.svd(centred, full_matrices=False)
    r = min(rank or means.shape[0] - 1, int((singular > singular.max() * 1e-10).sum()) if singular.numel() else 0)
    return vt[:r].T


def subspace_snrs(dense_means: torch.Tensor, pruned_means: torch.Tensor,
                  rank: int | None = None) -> list[tuple[int, int, float, float, int]]:
    """(language index, layer, SNR specific dB, SNR agnostic dB, subspace rank) for every language and
    layer of [languages, layers, hidden] hidden-state means, each layer's subspace from the dense means."""
    out = []
    for layer in range(dense_means.shape[1]):
        basis = language_subspace(dense_means[:, layer], rank)
        for i in range(dense_means.shape[0]):
            specific, agnostic = subspace_snr(dense_means[i, layer], pruned_means[i, layer], basis)
            out.append((i, layer, specific, agnostic, basis.shape[1]))
    return out


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
