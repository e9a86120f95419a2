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


def rank_count(total: int, rate: float) -> int:
    """Tang et al.'s count for a rate: Python's `round(total * rate)` (float product, ties to even)."""
    return round(total * rate)


def probability_threshold(probability: torch.Tensor, rate: float) -> float:
    """Tang et al.'s activation-probability threshold (`filter_rate`, `activation_bar_ratio` in their
    identify.py): the k-th smallest of ALL activation probabilities (every language, layer and neuron,
    flattened), k = round(count * rate) -- an order statistic, not an interpolated quantile. k is kept
    within [1, count] (their kthvalue fails on k = 0)."""
    flat = probability.detach().flatten().double().cpu()
    if flat.numel() == 0:
        raise ValueError("threshold of no probabilities")
    k = min(max(rank_count(flat.numel(), rate), 1), flat.numel())
    return float(torch.kthvalue(flat, k).values)


def filtered_lape(probability: torch.Tensor, threshold: float) -> torch.Tensor:
    """LAPE with Tang et al.'s filter: +inf for a neuron whose probability exceeds `threshold`
    (strictly) in no language; never-active neurons (NaN LAPE here, 0 in their code) always get +inf."""
    entropy = lape(probability)
    passes = (probability > threshold).any(dim=0)
    return torch.where(passes & ~entropy.isnan(), entropy, torch.full_like(entropy, math.inf))


def top_rate_selection(entropy: torch.Tensor, top_rate: float) -> torch.Tensor:
    """The round(all neurons * top_rate) neurons of lowest (filtered) LAPE over all layers together:
    [layers, neurons] bool. As in Tang et al., the quota counts all neurons and +inf ones fill it when
    too few are finite. Ties (their topk leaves the order open) go to the lower flat index (layer-major,
    then neuron): a stable sort on (entropy, index)."""
    flat = entropy.flatten()
    count = min(rank_count(flat.numel(), top_rate), flat.numel())
    order = torch.sort(flat, stable=True).indices[:count]
    selected = torch.zeros(flat.numel(), dtype=torch.bool)
    selected[order] = True
    return selected.view(entropy.shape)


def assign_languages(probability: torch.Tensor, selected: torch.Tensor, activation_bar: float) -> torch.Tensor:
    """Each selected neuron belongs to every language whose probability exceeds `activation_bar`
    strictly (none, one or several): [languages, layers, neurons] bool."""
    return (probability > activation_bar) & selected.unsqueeze(0)


def language_specific(probability: torch.Tensor, top_rate: float, threshold: float,
                      activation_bar: float | None = None) -> torch.Tensor:
    """Tang et al.'s identify.py: filter (LAPE +inf where no probability exceeds `threshold`), select the
    lowest-LAPE `top_rate` of all neurons, assign each to the languages where its probability exceeds
    `activation_bar` (default: `threshold`, as both their ratios are 0.95). [languages, layers, neurons]
    bool; a neuron is language-specific when it belongs to some language (`.any(0)`)."""
    selected = top_rate_selection(filtered_lape(probability, threshold), top_rate)
    return assign_languages(probability, selected, threshold if activation_bar is None else activation_bar)


def neuron_changes(dense: torch.Tensor, pruned: torch.Tensor) -> dict[str, int]:
    """How many language-specific neurons of the dense model survive pruning, vanish, and appear."""
    return {"dense": int(dense.sum()), "pruned": int(pruned.sum()), "survive": int((dense & pruned).sum()),
            "vanish": int((dense & ~pruned).sum()), "appear": int((~dense & pruned).sum())}


@dataclass(frozen=True)
class NeuronSummary:
    mean_lape: float | None  # over neurons active in some language
    active_neurons: int
    specific_per_language: list[int]  # neurons assigned to each language (a neuron may count in several)


def neuron_summary(entropy: torch.Tensor, assigned: torch.Tensor) -> NeuronSummary:
    """What the neuron table reports of one model: mean LAPE (unfiltered, NaN for never-active neurons),
    active neurons, and per language the neurons `language_specific` assigned to it
    ([languages, layers, neurons] bool)."""
    finite = entropy[~entropy.isnan()]
    return NeuronSummary(float(finite.mean()) if finite.numel() else None, int(finite.numel()),
                         [int(assigned[i].sum()) for i in range(assigned.shape[0])])


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

@dataclass(frozen=True)
class LanguageSubspace:
    """LSAR's decomposition of one layer's language means M [hidden, languages] (Xie et al., 2022):
    M ~ mean 1^T + basis coordinates^T, with `mean` orthogonal to the language-specific subspace."""

    mean: torch.Tensor  # mu [hidden]: the component every language shares (language-agnostic)
    basis: torch.Tensor  # M_s [hidden, r], orthonormal columns: the language-specific subspace
    coordinates: torch.Tensor  # Gamma [languages, r]: each language's coordinates in M_s (scaled by the singular values)


def _numerical_rank(singular: torch.Tensor) -> int:
    return int((singular > singular.max() * 1e-10).sum()) if singular.numel() and singular.max() > 0 else 0


def lsar(means: torch.Tensor, rank: int | None = None, reestimate: bool = True) -> LanguageSubspace:
    """LSAR (Xie et al., 2022, as its published code computes it), both steps, on `means`
    [languages, hidden] (one row per language; the paper's M is its transpose), in float64:

    1. mu = M 1 / L; M_s, S, V = the top-r SVD of M - mu 1^T; Gamma = V S.
    2. M' = mu 1^T + M_s Gamma^T (the rank-r fit); mu' = (M'^+)^T 1 / ||(M'^+)^T 1||^2;
       M_s', S', V' = the top-r SVD of M' - mu' 1^T; Gamma' = V' S'.

    Step 2 makes mu' orthogonal to M_s' with M' = mu' 1^T + M_s' Gamma'^T exactly (`reestimate=False`
    stops after step 1). r defaults to L - 1 and is capped at the numerical rank of the centred means
    (directions with a zero singular value are not determined by the data)."""
    m = means.double().T  # [hidden, languages]
    languages = m.shape[1]
    ones = torch.ones(languages, dtype=m.dtype)
    mu = m @ ones / languages
    u, s, vh = torch.linalg.svd(m - torch.outer(mu, ones), full_matrices=False)
    r = min(rank or languages - 1, _numerical_rank(s))
    basis, gamma = u[:, :r], vh[:r].T * s[:r]
    if not reestimate:
        return LanguageSubspace(mean=mu, basis=basis, coordinates=gamma)
    fit = torch.outer(mu, ones) + basis @ gamma.T
    # step 2: the published re-estimation of the shared component
    direction = torch.linalg.pinv(fit).T @ ones
    norm = float(direction.pow(2).sum())
    mu2 = direction / norm if norm > 0 else torch.zeros_like(mu)
    u2, s2, vh2 = torch.linalg.svd(fit - torch.outer(mu2, ones), full_matrices=False)
    r2 = min(r, _numerical_rank(s2))
    return LanguageSubspace(mean=mu2, basis=u2[:, :r2], coordinates=vh2[:r2].T * s2[:r2])


def language_subspace(means: torch.Tensor, rank: int | None = None) -> torch.Tensor:
    """An orthonormal basis [hidden, r] of the language-specific subspace of one layer, by LSAR (both
    steps, `lsar`) on `means` [languages, hidden]; r defaults to languages - 1."""
    return lsar(means, rank).basis


def subspace_snrs(dense_means: torch.Tensor, pruned_means: torch.Tensor,
                  rank: int | None = None) -> list[tuple[int, int, float, float, int]]:
    """Centroid SNR: (language index, layer, SNR specific dB, SNR agnostic dB, subspace rank) for every
    language and layer of [languages, layers, hidden] hidden-state means, each layer's subspace from the
    dense means."""
    out = []
    for layer in range(dense_means.shape[1]):
        basis = language_subspace(dense_means[:, layer], rank)
        for i in range(dense_means.shape[0]):
            specific, agnostic = subspace_snr(dense_means[i, layer], pruned_means[i, layer], basis)
            out.append((i, layer, specific, agnostic, basis.shape[1]))
    return out


def token_subspace_snrs(dense_means: torch.Tensor, dense_tokens: torch.Tensor, pruned_tokens: torch.Tensor,
                        counts: list[int], rank: int | None = None) -> list[tuple[int, int, float, float, int]]:
    """Per-token SNR: (language index, layer, SNR specific dB, SNR agnostic dB, subspace rank) from the
    hidden states of the same sampled tokens [languages, layers, tokens, hidden] in the dense and the
    pruned model, language i using its first counts[i] tokens; each layer's subspace is LSAR's on the
    dense means [languages, layers, hidden], as for the centroid SNR. Languages without tokens are left out."""
    out = []
    for layer in range(dense_means.shape[1]):
        basis = language_subspace(dense_means[:, layer], rank)
        for i, n in enumerate(counts):
            if n > 0:
                specific, agnostic = subspace_snr(dense_tokens[i, layer, :n], pruned_tokens[i, layer, :n], basis)
                out.append((i, layer, specific, agnostic, basis.shape[1]))
    return out


def subspace_snr(dense: torch.Tensor, pruned: torch.Tensor, basis: torch.Tensor) -> tuple[float, float]:
    """SNR in dB of a pruned representation against the dense one, in the subspace of `basis`
    ([hidden, r], orthonormal) and in its orthogonal complement:
    10 log10(sum_t ||P h_d(t)||^2 / sum_t ||P (h_p(t) - h_d(t))||^2), summed over the rows of [tokens, hidden]
    inputs (a single [hidden] vector is one token). Identical representations give +inf; a zero signal gives -inf."""
    dense, pruned, basis = dense.double(), pruned.double(), basis.double()
    noise = pruned - dense

    def in_subspace(v):
        return (v @ basis) @ basis.T

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
