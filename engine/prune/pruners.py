"""One small class per pruning method behind one interface. A method's name and needs are its
parameters class's (engine.prune.params); `make_pruner` finds the class implementing them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from engine.prune.masks import check_nm, lowest_in_matrix, lowest_in_rows, lowest_n_of_m
from engine.prune.params import PRUNER_PARAMS, MagnitudeParams, PrunerParams, SparseGPTParams, WandaParams
from engine.prune.scoring import magnitude_scores, wanda_scores
from engine.prune.sparsegpt_math import sparsegpt_prune
from engine.prune.sparsity import Sparsity
from engine.prune.statistics import InputStatistics


@dataclass(frozen=True)
class PruneOutput:
    weight: torch.Tensor  # float32, already zero where pruned
    mask: torch.Tensor  # True where pruned
    info: dict = field(default_factory=dict)


class Pruner(Protocol):
    params: PrunerParams

    @property
    def method(self) -> str: ...

    @property
    def needs_inputs(self) -> bool: ...  # whether calibration forward passes are needed at all

    @property
    def needs_hessian(self) -> bool: ...

    def prune(self, weight: torch.Tensor, stats: InputStatistics | None, sparsity: Sparsity) -> PruneOutput: ...


def _mask_from_scores(scores: torch.Tensor, sparsity: Sparsity, per_row: bool) -> torch.Tensor:
    if sparsity.is_nm:
        return lowest_n_of_m(scores, sparsity.n, sparsity.m)
    return lowest_in_rows(scores, sparsity.fraction) if per_row else lowest_in_matrix(scores, sparsity.fraction)


def _apply(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return weight.detach().float().masked_fill(mask, 0.0)


class _Described:
    """A pruner's name and needs, read off its parameters."""

    params: PrunerParams

    @property
    def method(self) -> str:
        return self.params.method

    @property
    def needs_inputs(self) -> bool:
        return self.params.needs_calibration

    @property
    def needs_hessian(self) -> bool:
        return self.params.needs_hessian


@dataclass(frozen=True)
class MagnitudePruner(_Described):
    params: MagnitudeParams = MagnitudeParams()

    def prune(self, weight: torch.Tensor, stats: InputStatistics | None, sparsity: Sparsity) -> PruneOutput:
        mask = _mask_from_scores(magnitude_scores(weight), sparsity, per_row=False)
        return PruneOutput(_apply(weight, mask), mask)


@dataclass(frozen=True)
class WandaPruner(_Described):
    params: WandaParams = WandaParams()

    def prune(self, weight: torch.Tensor, stats: InputStatistics | None, sparsity: Sparsity) -> PruneOutput:
        if stats is None or stats.tokens == 0:
            raise ValueError("Wanda needs calibration inputs; none reached this layer")
        mask = _mask_from_scores(wanda_scores(weight, stats.sq_norms.to(weight.device)), sparsity, per_row=True)
        return PruneOutput(_apply(weight, mask), mask)


@dataclass(frozen=True)
class SparseGPTPruner(_Described):
    params: SparseGPTParams = SparseGPTParams()

    def prune(self, weight: torch.Tensor, stats: InputStatistics | None, sparsity: Sparsity) -> PruneOutput:
        if stats is None or stats.hessian is None or stats.tokens == 0:
            raise ValueError("SparseGPT needs the calibration Hessian; none reached this layer")
        out = sparsegpt_prune(weight, stats.hessian, sparsity, self.params.blocksize, self.params.dampening,
                              self.params.max_dampening_retries)
        return PruneOutput(out.weight, out.mask, {"dampening": out.dampening, "dampening_retries": out.retries})


# Each implementation, by the parameters class it takes.
IMPLEMENTATIONS: dict[type[PrunerParams], type] = {
    type(cls().params): cls for cls in (MagnitudePruner, WandaPruner, SparseGPTPruner)}


def make_pruner(method: str, params: dict | PrunerParams | None = None) -> Pruner:
    params_cls = PRUNER_PARAMS.get(method)
    if params_cls is None or params_cls not in IMPLEMENTATIONS:
        raise ValueError(f"unknown pruning method {method!r}; available: {', '.join(PRUNER_PARAMS)}")
    if not isinstance(params, params_cls):
        params = params_cls.model_validate(params or {})
    return IMPLEMENTATIONS[params_cls](params=params)


def check_sparsity_fits(sparsity: Sparsity, width: int, where: str) -> None:
    if sparsity.is_nm:
        check_nm(width, sparsity.n, sparsity.m, where)
