"""The pruning math on random tensors, against slow references written from the papers' equations."""
from __future__ import annotations

import pytest
import torch

from engine.prune.masks import lowest_in_matrix, lowest_in_rows, lowest_n_of_m
from engine.prune.params import PRUNER_PARAMS
from engine.prune.pruners import IMPLEMENTATIONS, make_pruner
from engine.prune.sparsegpt_math import CholeskyError, sparsegpt_prune, sparsegpt_prune_columnwise
from engine.prune.sparsity import parse_sparsity
from engine.prune.statistics import InputStatistics, relative_output_error


def correlated_inputs(tokens: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(width, width, generator=g, dtype=torch.float64) * 0.3
    scales = torch.rand(width, generator=g, dtype=torch.float64) * 3 + 0.1  # uneven feature norms, as in LLMs
    return (torch.randn(tokens, width, generator=g, dtype=torch.float64) @ mixing
            + torch.randn(tokens, width, generator=g, dtype=torch.float64)) * scales


@pytest.mark.parametrize("fraction", [0.5, 0.3, 0.7])
def test_row_and_matrix_masks_are_exact(fraction):
    scores = torch.rand(13, 40, generator=torch.Generator().manual_seed(1))
    rows = lowest_in_rows(scores, fraction)
    assert (rows.sum(dim=1) == round(40 * fraction)).all()
    matrix = lowest_in_matrix(scores, fraction)
    assert int(matrix.sum()) == round(13 * 40 * fraction)
    assert scores[matrix].max() <= scores[~matrix].min()


def test_n_of_m_pattern_holds_in_every_group():
    scores = torch.rand(7, 32, generator=torch.Generator().manual_seed(2))
    mask = lowest_n_of_m(scores, 2, 4)
    assert (mask.reshape(7, 8, 4).sum(dim=2) == 2).all()
    mask = lowest_n_of_m(scores, 1, 8)
    assert (mask.reshape(7, 4, 8).sum(dim=2) == 1).all()
    with pytest.raises(ValueError, match="multiple of 3"):
        lowest_n_of_m(torch.rand(2, 8), 1, 3)


def test_ties_are_broken_deterministically():
    scores = torch.ones(4, 8)
    assert torch.equal(lowest_in_rows(scores, 0.5), lowest_in_rows(scores.clone(), 0.5))
    assert (lowest_in_rows(scores, 0.5).sum(dim=1) == 4).all()


def wanda_reference(weight: torch.Tensor, inputs: torch.Tensor, fraction: float) -> torch.Tensor:
    """Direct per-row sort of |W_ij| * ||X_j||_2, in plain Python."""
    norms = [float(torch.linalg.vector_norm(inputs[:, j].double())) for j in range(weight.shape[1])]
    mask = torch.zeros_like(weight, dtype=torch.bool)
    k = round(weight.shape[1] * fraction)
    for i in range(weight.shape[0]):
        scores = [(abs(float(weight[i, j])) * norms[j], j) for j in range(weight.shape[1])]
        for _, j in sorted(scores)[:k]:
            mask[i, j] = True
    return mask


@pytest.mark.parametrize("fraction", [0.5, 0.6])
def test_wanda_matches_per_row_sort(fraction):
    weight = torch.randn(24, 48, generator=torch.Generator().manual_seed(3))
    inputs = correlated_inputs(300, 48, seed=4).float()
    stats = InputStatistics(48, with_hessian=False, device="cpu")
    stats.add(inputs[:100])
    stats.add(inputs[100:])  # accumulating in pieces equals one pass
    out = make_pruner("wanda").prune(weight, stats, parse_sparsity(fraction))
    assert torch.equal(out.mask, wanda_reference(weight, inputs, fraction))
    assert (out.mask.sum(dim=1) == round(48 * fraction)).all()
    assert torch.equal(out.weight[out.mask], torch.zeros(int(out.mask.sum())))
    assert torch.equal(out.weight[~out.mask], weight[~out.mask])


def test_magnitude_is_one_threshold_per_matrix():
    weight = torch.randn(16, 32, generator=torch.Generator().manual_seed(5))
    out = make_pruner("magnitude").prune(weight, None, parse_sparsity(0.5))
    assert int(out.mask.sum()) == 16 * 32 // 2
    assert weight.abs()[out.mask].max() <= weight.abs()[~out.mask].min()
    out = make_pruner("magnitude").prune(weight, None, parse_sparsity("2:4"))
    assert (out.mask.reshape(16, 8, 4).sum(dim=2) == 2).all()


def obs_reference(weight, hessian, sparsity, blocksize, dampening=0.01):
    """Unblocked, column-by-column optimal brain surgeon in float64, with explicit inverses of the
    Hessian of the not-yet-processed columns (no Cholesky trick, no lazy batching)."""
    w = weight.double().clone()
    rows, cols = w.shape
    h = hessian.double().clone()
    h += dampening * torch.diagonal(h).mean() * torch.eye(cols, dtype=torch.float64)
    inverse_first = [torch.linalg.inv(h[j:, j:]) for j in range(cols)]
    diag = torch.tensor([inv[0, 0] for inv in inverse_first], dtype=torch.float64)
    mask = torch.zeros_like(w, dtype=torch.bool)
    for i in range(cols):
        if not sparsity.is_nm and i % blocksize == 0:
            end = min(i + blocksize, cols)
            saliency = w[:, i:end] ** 2 / diag[i:end]
            k = round(rows * end * sparsity.fraction) - round(rows * i * sparsity.fraction)
            chosen = torch.sort(saliency.flatten(), stable=True).indices[:k]
            block = torch.zeros(saliency.numel(), dtype=torch.bool)
            block[chosen] = True
            mask[:, i:end] = block.view_as(saliency)
        if sparsity.is_nm and i % sparsity.m == 0:
            saliency = w[:, i : i + sparsity.m] ** 2 / diag[i : i + sparsity.m]
            mask[:, i : i + sparsity.m] = lowest_n_of_m(saliency, sparsity.n, sparsity.m)
        inv = inverse_first[i]
        kept = torch.where(mask[:, i], torch.zeros_like(w[:, i]), w[:, i])
        w[:, i:] -= (w[:, i] - kept).unsqueeze(1) * (inv[0, :] / inv[0, 0]).unsqueeze(0)
        w[:, i] = kept
    return w, mask


@pytest.mark.parametrize("sparsity, blocksize", [("0.5", 16), ("0.5", 128), ("0.6", 24), ("2:4", 16), ("4:8", 32)])
def test_sparsegpt_matches_unblocked_obs(sparsity, blocksize):
    sparsity = parse_sparsity(sparsity)
    weight = torch.randn(20, 64, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    x = correlated_inputs(512, 64, seed=7)
    hessian = x.T @ x
    out = sparsegpt_prune(weight, hessian, sparsity, blocksize=blocksize)
    ref_weight, ref_mask = obs_reference(weight, hessian, sparsity, blocksize)
    assert torch.equal(out.mask, ref_mask)
    assert torch.allclose(out.weight.double(), ref_weight, atol=1e-4, rtol=1e-4)
    assert int(out.mask.sum()) == round(weight.numel() * sparsity.fraction)
    assert out.retries == 0 and out.dampening == 0.01


@pytest.mark.parametrize("sparsity, blocksize, cols", [("0.5", 128, 200), ("0.7", 32, 96), ("2:4", 64, 136),
                                                       ("1:4", 16, 64)])
def test_fast_sparsegpt_equals_the_columnwise_algorithm(sparsity, blocksize, cols):
    """The two-kernels-per-column loop against the step-by-step one: same masks, same weights (float32)."""
    sparsity = parse_sparsity(sparsity)
    weight = torch.randn(48, cols, generator=torch.Generator().manual_seed(3))
    x = correlated_inputs(1024, cols, seed=4).float()
    fast = sparsegpt_prune(weight, x.T @ x, sparsity, blocksize=blocksize)
    slow = sparsegpt_prune_columnwise(weight, x.T @ x, sparsity, blocksize=blocksize)
    assert torch.equal(fast.mask, slow.mask)
    assert torch.allclose(fast.weight, slow.weight, atol=1e-5, rtol=1e-4)
    assert bool((fast.weight[fast.mask] == 0).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("sparsity", ["0.5", "2:4"])
def test_cuda_graph_replay_equals_the_eager_loop(sparsity):
    from engine.prune import sparsegpt_math

    sparsity = parse_sparsity(sparsity)
    weight = torch.randn(300, 200, device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    x = correlated_inputs(1024, 200, seed=4).float().cuda()
    outputs = []
    for graphs in (True, False, True):  # the second graphed run replays the graphs captured by the first
        sparsegpt_math.CUDA_GRAPHS = graphs
        try:
            outputs.append(sparsegpt_prune(weight, x.T @ x, sparsity, blocksize=64))
        finally:
            sparsegpt_math.CUDA_GRAPHS = True
    for out in outputs[1:]:
        assert torch.equal(out.mask, outputs[0].mask) and torch.equal(out.weight, outputs[0].weight)


def test_sparsegpt_reconstructs_better_than_masking_alone():
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(8))
    x = correlated_inputs(1024, 64, seed=9).float()
    stats = InputStatistics(64, with_hessian=True, device="cpu")
    stats.add(x)
    sparsity = parse_sparsity(0.5)
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        out = make_pruner(method).prune(weight, stats, sparsity)
        errors[method] = relative_output_error(weight, out.weight, stats.hessian)
    masked_only = weight.masked_fill(make_pruner("sparsegpt").prune(weight, stats, sparsity).mask, 0)
    assert errors["sparsegpt"] < relative_output_error(weight, masked_only, stats.hessian)
    assert errors["sparsegpt"] <= errors["wanda"] <= errors["magnitude"]


@pytest.mark.parametrize("sparsity", ["0.5", "2:4"])
@pytest.mark.parametrize("prune", [sparsegpt_prune, sparsegpt_prune_columnwise])
def test_dead_inputs_are_zeroed_before_pruning_as_published(prune, sparsity):
    """sparsegpt.py `fasterprune`: `dead = diag(H) == 0; W[:, dead] = 0` before the masks are chosen. The
    dead columns end at zero even where the mask cannot take them all (here more dead inputs than a 2:4
    group or a 50% block prunes); the mask, chosen on the zeroed weights, takes dead entries first
    (saliency 0) and keeps exactly the target share."""
    sparsity = parse_sparsity(sparsity)
    weight = torch.randn(16, 32, generator=torch.Generator().manual_seed(11))
    x = correlated_inputs(256, 32, seed=12).float()
    dead = torch.zeros(32, dtype=torch.bool)
    dead[[0, 1, 2, 5, 6, 7, 9, 10, 11, 13]] = True  # 10 of the first block's 16 inputs, 3 of 4 in groups
    x[:, dead] = 0
    out = prune(weight, x.T @ x, sparsity, blocksize=16)
    assert bool((out.weight[:, dead] == 0).all())
    assert int(out.mask.sum()) == round(weight.numel() * sparsity.fraction)
    assert not bool(out.mask[:, [3, 4, 8]].any())  # live inputs beside more dead ones than are pruned: all kept
    assert bool((out.weight[out.mask] == 0).all())


def test_failed_cholesky_retries_with_more_dampening():
    hessian = torch.eye(32)
    hessian[-1, -1] = -0.05  # indefinite: 1% of the mean diagonal does not fix it, 10% does
    out = sparsegpt_prune(torch.randn(4, 32), hessian, parse_sparsity(0.5), blocksize=8)
    assert out.retries == 1 and out.dampening == pytest.approx(0.1)


def test_hopeless_hessian_fails_clearly():
    with pytest.raises(CholeskyError, match="dampening up to"):
        sparsegpt_prune(torch.randn(4, 8), -torch.eye(8), parse_sparsity(0.5), max_retries=2)
    bad = torch.eye(8)
    bad[0, 0] = float("inf")
    with pytest.raises(CholeskyError, match="non-finite"):
        sparsegpt_prune(torch.randn(4, 8), bad, parse_sparsity(0.5))


@pytest.mark.parametrize("value", [0, 1, 0.0, 1.0, "0:4", "4:4", "5:4"])
def test_degenerate_sparsity_is_refused(value):
    with pytest.raises(ValueError):
        parse_sparsity(value)


@pytest.mark.parametrize("values", ["continuous", "few-distinct", "all-equal"])
@pytest.mark.parametrize("k", [0, 1, 7, 32, 63, 64])
def test_selection_equals_the_first_k_of_a_stable_sort(values, k):
    """Masks come from a selection (kthvalue) with ties given to the earlier position; that must be
    exactly the first k of a stable sort, including on heavy ties."""
    from engine.prune.masks import lowest_k_per_row

    generator = torch.Generator().manual_seed(k)
    scores = {"continuous": torch.randn(9, 64, generator=generator),
              "few-distinct": torch.randint(0, 3, (9, 64), generator=generator).float(),
              "all-equal": torch.ones(9, 64)}[values]
    expected = torch.zeros_like(scores, dtype=torch.bool)
    expected.scatter_(1, torch.sort(scores, dim=1, stable=True).indices[:, :k], True)
    assert torch.equal(lowest_k_per_row(scores, k), expected)
    flat = scores.reshape(1, -1)
    expected_flat = torch.zeros_like(flat, dtype=torch.bool)
    expected_flat.scatter_(1, torch.sort(flat, dim=1, stable=True).indices[:, :5 * k], True)
    assert torch.equal(lowest_k_per_row(flat, 5 * k), expected_flat)


def test_selection_with_nan_scores_puts_them_last():
    from engine.prune.masks import lowest_k_per_row

    scores = torch.tensor([[0.3, float("nan"), 0.1, 0.2]])
    assert lowest_k_per_row(scores, 3).tolist() == [[True, False, True, True]]


def test_every_registered_method_has_one_implementation_with_its_needs():
    assert set(IMPLEMENTATIONS) == set(PRUNER_PARAMS.values())
    for method, params_cls in PRUNER_PARAMS.items():
        pruner = make_pruner(method, {})
        assert (pruner.method, pruner.needs_inputs, pruner.needs_hessian) == \
            (method, params_cls.needs_calibration, params_cls.needs_hessian)
    assert [m for m, p in PRUNER_PARAMS.items() if not p.needs_calibration] == ["magnitude"]
    assert [m for m, p in PRUNER_PARAMS.items() if p.needs_hessian] == ["sparsegpt"]
    with pytest.raises(ValueError, match="unknown pruning method 'obs'; available: magnitude, wanda, sparsegpt"):
        make_pruner("obs")
