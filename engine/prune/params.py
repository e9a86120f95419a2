"""Typed parameters of each pruning method; the study-file validator checks `params:` against these.

Parameters with defaults are filled in before a trial key is computed, so `{}` and the spelled-out
defaults name the same trial.
"""
from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field


class PrunerParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    uses_calibration: ClassVar[bool] = True


class MagnitudeParams(PrunerParams):
    """|W|, thresholded per weight matrix (or per group of M for N:M). Needs no calibration data."""

    uses_calibration: ClassVar[bool] = False


class WandaParams(PrunerParams):
    """|W_ij| * ||X_j||_2, compared within each output row (Sun et al., 2024)."""


class SparseGPTParams(PrunerParams):
    """OBS with lazy batched updates (Frantar and Alistarh, 2023)."""

    blocksize: int = Field(128, gt=0, description="columns pruned and updated together")
    dampening: float = Field(0.01, gt=0, lt=1, description="added to the Hessian diagonal, times its mean")
    max_dampening_retries: int = Field(
        4, ge=0, le=8, description="on a failed Cholesky, retry with dampening x10 this many times"
    )


PRUNER_PARAMS: dict[str, type[PrunerParams]] = {
    "magnitude": MagnitudeParams,
    "wanda": WandaParams,
    "sparsegpt": SparseGPTParams,
}
