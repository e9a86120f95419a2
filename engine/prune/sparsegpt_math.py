"""SparseGPT (Frantar and Alistarh, 2023) for one weight matrix, from its calibration Hessian.

With H = sum_t x_t x_t^T over calibration inputs, pruning column i and compensating the columns after
it is the optimal-brain-surgeon update w[i:] -= (w_i - q_i) / [H_(i)^-1]_00 * [H_(i)^-1]_0,: where
H_(i) is H restricted to columns i.. . All those rows come at once from the upper Cholesky factor U of
H^-1 (row i of U is the needed row scaled by 1/sqrt of its first entry), so one factorisation serves
every column. As published, the weights of inputs never active in calibration (zero Hessian diagonal)
are zeroed first, and those inputs get an identity row in H. Columns are processed in blocks whose updates to later columns are applied lazily, in
one matrix product per block. Masks are chosen per block from the already-updated weights by the OBS
saliency w^2 / [H^-1]_ii^2 (unstructured: the lowest share of the block; N:M: the lowest N in each
group of M of a row).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.prune.masks import check_nm, exact_count, lowest_k_per_row, lowest_n_of_m
from engine.prune.sparsity import Sparsity


class CholeskyError(RuntimeError):
    """The damped Hessian stayed not positive definite through every allowed retry."""


@dataclass(frozen=True)
class SparseGPTOutput:
    weight: torch.Tensor  # float32, pruned and compensated
    mask: torch.Tensor  # True where pruned
    dampening: float  # the relative dampening that worked
    retries: int  # how many x10 increases it took


def inverse_hessian_factor(hessian: torch.Tensor, dampening: float, max_retries: int) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, retrying with damp x10 on failure.

    Each matrix is freed as soon as the next exists: about 3 H-sized float32 matrices at the peak
    besides `hessian` (LAPACK's workspaces included), against 5 when all are kept to the end
    (benchmarks/hessian_factor_memory.py; Llama-3-8B down_proj's H is 0.77 GiB)."""
    if not torch.isfinite(hessian).all():
        raise CholeskyError("the Hessian has non-finite entries (the calibration activations overflowed)")
    diagonal = torch.diagonal(hessian).to(torch.float32)
    dead = diagonal == 0
    mean_diagonal = float(torch.where(dead, 1.0, diagonal).mean())
    for attempt in range(max_retries + 1):
        damp = dampening * (10.0 ** attempt)
        damped = hessian.to(torch.float32, copy=True)
        damped_diagonal = torch.diagonal(damped)
        damped_diagonal[dead] = 1.0  # inputs never active: their columns get an identity row, as if independent
        damped_diagonal += damp * mean_diagonal
        lower, info = torch.linalg.cholesky_ex(damped)
        del damped, damped_diagonal
        if int(info) != 0:
            continue
        inverse = torch.cholesky_inverse(lower)
        del lower
        upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
        del inverse
        if int(info) == 0 and torch.isfinite(upper).all():
            return upper, damp, attempt
    raise CholeskyError(
        f"Cholesky failed with dampening up to {dampening * 10.0 ** max_retries:g} x mean diagonal "
        f"({max_retries} retries); the calibration set may be too small for this layer's width")


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: Sparsity, blocksize: int = 128,
                    dampening: float = 0.01, max_retries: int = 4) -> SparseGPTOutput:
    """Prunes `weight` (out, in) given the Hessian of its inputs (in, in). Same result as
    `sparsegpt_prune_columnwise` (up to float rounding), with two kernels per column instead of eight:
    a pruned column's own update leaves it at (almost exactly) zero, so it needs no separate write, and
    the error is the column times a per-block factor (1 / [H^-1]_ii where pruned, 0 where kept). On a GPU
    the per-column launches, not the arithmetic, bound this loop."""
    rows, cols = weight.shape
    upper, damp, retries = _checked_factor(weight, hessian, sparsity, blocksize, dampening, max_retries)
    w = _zero_dead_inputs(weight.detach().to(device=upper.device, dtype=torch.float32).clone(), hessian)
    mask = torch.zeros_like(w, dtype=torch.bool)
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        width = end - start
        # Column-major copies: each step below reads and writes whole columns.
        block = w[:, start:end].t().contiguous()  # (width, rows)
        u_block = upper[start:end, start:end]
        u_diag = torch.diagonal(u_block)
        errors = torch.empty_like(block)
        block_mask = torch.zeros_like(block, dtype=torch.bool)
        if not sparsity.is_nm:
            k = exact_count(rows * end, sparsity.fraction) - exact_count(rows * start, sparsity.fraction)
            if k:
                # the same order as the column-wise version, which ranks the (rows, width) block row-major
                saliency = (block.pow(2) / u_diag.pow(2).unsqueeze(1)).t().contiguous()
                block_mask = lowest_k_per_row(saliency.reshape(1, -1), k).view(rows, width).t().contiguous()
            factor = block_mask / u_diag.unsqueeze(1)  # (width, rows): 1/d where pruned, 0 where kept
        else:
            factor = torch.empty_like(block)
        if block.device.type == "cuda" and CUDA_GRAPHS:
            _graphed_column_updates(block, factor, u_block, errors, block_mask, sparsity)
        else:
            _column_updates(block, factor, u_block, errors, block_mask, sparsity)
        w[:, start:end] = block.t()
        mask[:, start:end] = block_mask.t()
        w[:, end:] -= errors.t() @ upper[start:end, end:]
    w[mask] = 0.0
    return SparseGPTOutput(weight=w, mask=mask, dampening=damp, retries=retries)


def _zero_dead_inputs(w: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """As published (sparsegpt.py `fasterprune`: `W[:, dead] = 0`): the weights of inputs never active in
    calibration (zero Hessian diagonal) are zeroed before the masks are chosen, so those entries have
    saliency 0, are pruned first and count towards the pruned share."""
    dead = torch.diagonal(hessian) == 0
    if bool(dead.any()):
        w[:, dead.to(w.device)] = 0.0
    return w


def _checked_factor(weight: torch.Tensor, hessian: torch.Tensor, sparsity: Sparsity, blocksize: int,
                    dampening: float, max_retries: int) -> tuple[torch.Tensor, float, int]:
    cols = weight.shape[1]
    if hessian.shape != (cols, cols):
        raise ValueError(f"Hessian of shape {tuple(hessian.shape)} does not match a weight of {tuple(weight.shape)}")
    if sparsity.is_nm:
        check_nm(cols, sparsity.n, sparsity.m)
        if blocksize % sparsity.m:
            raise ValueError(f"blocksize {blocksize} must be a multiple of M={sparsity.m} for N:M pruning")
    return inverse_hessian_factor(hessian, dampening, max_retries)


CUDA_GRAPHS = True  # replay each block's column loop as one CUDA graph (set False to compare)


def _column_updates(block: torch.Tensor, factor: torch.Tensor, u_block: torch.Tensor, errors: torch.Tensor,
                    block_mask: torch.Tensor, sparsity: Sparsity) -> None:
    """The sequential part of one block, in place: for each column i (row i of the column-major `block`),
    its error and the update of the columns after it in the block. N:M masks are chosen here, from the
    updated weights, at the first column of each group."""
    u_diag = torch.diagonal(u_block)
    for i in range(block.shape[0]):
        if sparsity.is_nm and i % sparsity.m == 0:
            group = slice(i, i + sparsity.m)
            saliency = (block[group].pow(2) / u_diag[group].pow(2).unsqueeze(1)).t()
            block_mask[group] = lowest_n_of_m(saliency, sparsity.n, sparsity.m).t()
            factor[group] = block_mask[group] / u_diag[group].unsqueeze(1)
        torch.mul(block[i], factor[i], out=errors[i])
        block[i:].addr_(u_block[i, i:], errors[i], alpha=-1.0)


_GRAPHS: dict[tuple, tuple] = {}


def _graphed_column_updates(block: torch.Tensor, factor: torch.Tensor, u_block: torch.Tensor, errors: torch.Tensor,
                            block_mask: torch.Tensor, sparsity: Sparsity) -> None:
    """`_column_updates` as a CUDA graph captured once per (shape, sparsity, device) and replayed: the
    loop launches 2-8 tiny kernels per column, and launching them, not running them, was its cost."""
    key = (tuple(block.shape), block.device, sparsity.canonical())
    if key not in _GRAPHS:
        static = [t.clone() for t in (block, factor, u_block, errors, block_mask)]
        side = torch.cuda.Stream(block.device)
        side.wait_stream(torch.cuda.current_stream(block.device))
        with torch.cuda.stream(side):
            _column_updates(*static, sparsity)  # warm-up outside the graph, as capture requires
        torch.cuda.current_stream(block.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            _column_updates(*static, sparsity)
        _GRAPHS[key] = (graph, static)
    graph, static = _GRAPHS[key]
    for target, value in zip(static, (block, factor, u_block, errors, block_mask)):
        target.copy_(value)
    graph.replay()
    for value, result in zip((block, factor, errors, block_mask), (static[0], static[1], static[3], static[4])):
        value.copy_(result)


def sparsegpt_prune_columnwise(weight: torch.Tensor, hessian: torch.Tensor, sparsity: Sparsity, blocksize: int = 128,
                    dampening: float = 0.01, max_retries: int = 4) -> SparseGPTOutput:
    """The algorithm as written in the paper, one column at a time with every step spelled out: the
    reference `sparsegpt_prune` is tested against, and the "before" of benchmarks/sparsegpt_speed.py."""
    rows, cols = weight.shape
    upper, damp, retries = _checked_factor(weight, hessian, sparsity, blocksize, dampening, max_retries)
    w = _zero_dead_inputs(weight.detach().to(device=upper.device, dtype=torch.float32).clone(), hessian)
    mask = torch.zeros_like(w, dtype=torch.bool)
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        block = w[:, start:end].clone()
        u_block = upper[start:end, start:end]
        u_diag = torch.diagonal(u_block)
        errors = torch.zeros_like(block)
        block_mask = torch.zeros_like(block, dtype=torch.bool)
        if not sparsity.is_nm:
            # Cumulative rounding gives every block its share and the whole matrix exactly its target.
            k = exact_count(rows * end, sparsity.fraction) - exact_count(rows * start, sparsity.fraction)
            saliency = block.pow(2) / u_diag.pow(2).unsqueeze(0)
            if k:
                flat = torch.sort(saliency.flatten(), stable=True).indices[:k]
                block_mask.view(-1)[flat] = True
        for i in range(end - start):
            if sparsity.is_nm and i % sparsity.m == 0:
                group = slice(i, i + sparsity.m)
                saliency = block[:, group].pow(2) / u_diag[group].pow(2).unsqueeze(0)
                block_mask[:, group] = lowest_n_of_m(saliency, sparsity.n, sparsity.m)
            column = block[:, i]
            kept = torch.where(block_mask[:, i], torch.zeros_like(column), column)
            error = (column - kept) / u_diag[i]
            block[:, i:] -= error.unsqueeze(1) * u_block[i, i:].unsqueeze(0)
            block[:, i] = kept
            errors[:, i] = error
        w[:, start:end] = block
        mask[:, start:end] = block_mask
        w[:, end:] -= errors @ upper[start:end, end:]
    w[mask] = 0.0
    return SparseGPTOutput(weight=w, mask=mask, dampening=damp, retries=retries)
