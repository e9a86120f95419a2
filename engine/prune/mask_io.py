"""Pruning masks as bit-packed safetensors: 1 bit per weight, so masks from every calibration language
can be kept and compared. Each tensor is stored as uint8 bytes (8 mask bits each, big-endian bit order);
its shape is kept in the file's metadata."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from engine.io import atomic_path

SHAPES_KEY = "mask_shapes"


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask.detach().cpu().numpy().astype(bool).reshape(-1)))


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    count = int(np.prod(shape))
    bits = np.unpackbits(packed.numpy())[:count]
    return torch.from_numpy(bits.astype(bool)).reshape(shape)


def save_masks(path: Path, masks: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Writes atomically: a crash leaves either the old file or the new one, never half of one."""
    shapes = {name: list(mask.shape) for name, mask in masks.items()}
    tensors = {name: pack_mask(mask) for name, mask in masks.items()}
    meta = {**(metadata or {}), SHAPES_KEY: json.dumps(shapes, sort_keys=True)}
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata=meta)


def load_masks(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        shapes = json.loads(handle.metadata()[SHAPES_KEY])
    packed = load_file(str(path))
    return {name: unpack_mask(packed[name], tuple(shapes[name])) for name in shapes}
