"""Calibration statistics of a linear layer's inputs, accumulated over tokens in float32.

`sq_norms[j]` = sum_t x_tj^2 (Wanda's ||X_j||_2^2); `hessian` = sum_t x_t x_t^T (SparseGPT's H up to a
constant factor, which neither method's result depends on).
"""
from __future__ import annotations

import contextlib

import torch


class InputStatistics:
    def __init__(self, width: int, with_hessian: bool, device: torch.device | str):
        self.width = width
        self.tokens = 0
        self.sq_norms = torch.zeros(width, dtype=torch.float32, device=device)
        self.hessian = torch.zeros(width, width, dtype=torch.float32, device=device) if with_hessian else None

    def add(self, inputs: torch.Tensor) -> None:
        """`inputs`: (tokens, width), padding already removed."""
        x = inputs.reshape(-1, self.width).to(self.sq_norms.device, torch.float32)
        self.tokens += x.shape[0]
        self.sq_norms += x.pow(2).sum(dim=0)
        if self.hessian is not None:
            # bf16 and fp16 values are exact in TF32 (8 and 10 mantissa bits against its 10), so on a GPU
            # the products of half-precision activations lose nothing on tensor cores; the sums stay float32.
            exact_in_tf32 = inputs.dtype in (torch.bfloat16, torch.float16) and x.device.type == "cuda"
            with _tf32(exact_in_tf32):
                self.hessian.addmm_(x.T, x)

    def nbytes(self) -> int:
        total = self.sq_norms.numel() * 4
        return total + (self.hessian.numel() * 4 if self.hessian is not None else 0)


@contextlib.contextmanager
def _tf32(enabled: bool):
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled or before
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def relative_output_error(dense: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor) -> float:
    """||W X - W' X||_F^2 / ||W X||_F^2 over the calibration inputs, from H = X X^T."""
    w = dense.to(hessian.device, torch.float32)
    delta = w - pruned.to(hessian.device, torch.float32)
    numerator = float(((delta @ hessian) * delta).sum())
    denominator = float(((w @ hessian) * w).sum())
    return numerator / denominator if denominator > 0 else float("nan")
