"""Finding the decoder blocks and their linear layers without per-architecture code."""
from __future__ import annotations

import re

import torch
from torch import nn


class DecoderLayersNotFound(ValueError):
    pass


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of transformer blocks: as long as `config.num_hidden_layers`, each block holding
    linear layers; the largest such list if several qualify (a vision tower, say)."""
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if expected is not None and len(module) != expected:
            continue
        if all(any(isinstance(m, nn.Linear) for m in block.modules()) for block in module):
            size = sum(p.numel() for p in module.parameters())
            candidates.append((size, name, module))
    if not candidates:
        hint = f" of length num_hidden_layers={expected}" if expected is not None else ""
        raise DecoderLayersNotFound(
            f"cannot find the decoder layers of {type(model).__name__}: no list of blocks{hint} holding linear layers")
    _, name, module = max(candidates, key=lambda c: c[0])
    return name, module


def linear_layers(block: nn.Module, targets: list[str] | None = None) -> dict[str, nn.Linear]:
    """The block's nn.Linear modules by name relative to the block (e.g. `self_attn.q_proj`), filtered by
    `targets` (regular expressions searched in the name); all of them by default."""
    patterns = [re.compile(t) for t in targets] if targets else None
    found = {}
    for name, module in block.named_modules():
        if isinstance(module, nn.Linear) and (patterns is None or any(p.search(name) for p in patterns)):
            found[name] = module
    return found


def move(value, device: torch.device | str):
    """Moves tensors inside nested tuples, lists and dicts; leaves everything else alone."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(move(v, device) for v in value)
    if isinstance(value, list):
        return [move(v, device) for v in value]
    if isinstance(value, dict):
        return {k: move(v, device) for k, v in value.items()}
    return value
