"""The pruning methods: each one's name, what it needs, and its typed parameters, in one registry
(PRUNER_PARAMS) that the study-file validator reads without loading torch. engine.prune.pruners pairs
each with its implementation.

Parameters with defaults are filled in before a trial key is computed, so `{}` and the spelled-out
defaults name the same trial.
"""
from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field


class PrunerParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    method: ClassVar[str]  # the name study files use
    needs_calibration: ClassVar[bool] = True  # calibration forward passes (inputs' statistics)
    needs_hessian: ClassVar[bool] = False  # X X^T per linear layer, beyond the column norms


class MagnitudeParams(PrunerParams):
    """|W|, thresholded per weight matrix (or per group of M for N:M). Needs no calibration data."""

    method: ClassVar[str] = "magnitude"
    needs_calibration: ClassVar[bool] = False


class WandaParams(PrunerParams):
    """|W_ij| * ||X_j||_2, compared within each output row (Sun et al., 2024)."""

    method: ClassVar[str] = "wanda"


class SparseGPTParams(PrunerParams):
    """OBS with lazy batched updates (Frantar and Alistarh, 2023)."""

    method: ClassVar[str] = "sparsegpt"
    needs_hessian: ClassVar[bool] = True

    blocksize: int = Field(128, gt=0, description="columns pruned and updated together")
    dampening: float = Field(0.01, gt=0, lt=1, description="added to the Hessian diagonal, times its mean")
    max_dampening_retries: int = Field(
        4, ge=0, le=8, description="on a failed Cholesky, retry with dampening x10 this many times"
    )


PRUNER_PARAMS: dict[str, type[PrunerParams]] = {
    params.method: params for params in (MagnitudeParams, WandaParams, SparseGPTParams)}
