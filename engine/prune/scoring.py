"""Importance scores (higher = keep), pure functions of a weight and calibration statistics."""
from __future__ import annotations

import torch


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().float()


def wanda_scores(weight: torch.Tensor, input_sq_norms: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2, where `input_sq_norms[j]` is the sum over calibration tokens of x_j^2."""
    if input_sq_norms.shape != (weight.shape[1],):
        raise ValueError(f"input norms of shape {tuple(input_sq_norms.shape)} do not match a weight of {tuple(weight.shape)}")
    return weight.detach().abs().float() * input_sq_norms.float().sqrt().unsqueeze(0)
