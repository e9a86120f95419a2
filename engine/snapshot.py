"""The dense weights of a model's decoder blocks, copied once to CPU and restored bit for bit after
each trial, so one loaded model serves many pruning trials without reloading from disk."""
from __future__ import annotations

import torch
from torch import nn

from engine.prune.layers import find_decoder_layers


class DenseSnapshot:
    def __init__(self, model: nn.Module):
        prefix, blocks = find_decoder_layers(model)
        self._params = {f"{prefix}.{name}": p for name, p in blocks.named_parameters()}
        pin = torch.cuda.is_available()
        self._copies = {}
        for name, param in self._params.items():
            # straight into page-locked memory: one copy, and restores run at full PCIe speed
            copy = torch.empty(param.shape, dtype=param.dtype, device="cpu", pin_memory=pin)
            self._copies[name] = copy.copy_(param.detach())

    @torch.no_grad()
    def restore(self) -> None:
        for name, param in self._params.items():
            param.copy_(self._copies[name], non_blocking=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def weight(self, module_name: str) -> torch.Tensor:
        """The dense weight of a linear layer inside the decoder blocks, by its module name (on CPU)."""
        return self._copies[f"{module_name}.weight"]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._copies.values())
