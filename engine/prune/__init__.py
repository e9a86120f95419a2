"""Pruning methods behind one interface. Issue 3 adds the algorithms; parameters and sparsity live here now."""
from engine.prune.params import PRUNER_PARAMS, PrunerParams
from engine.prune.sparsity import Sparsity, parse_sparsity

__all__ = ["PRUNER_PARAMS", "PrunerParams", "Sparsity", "parse_sparsity"]
