"""What each decoder block receives from the model's own forward, captured once and replayed block by block.

Models differ in what their forward passes each block. Gemma 2/3, Qwen2/3 with sliding windows, Cohere2,
gpt-oss, Ministral, OLMo 3 and others give every block the attention mask and rotary embeddings of that
block's own layer type, so arguments captured at the first block are wrong for the others. Rather than
list architectures, the capture lets the model's forward build every block's arguments itself:

- every block's `forward` is swapped for a recorder that stores the block's arguments (everything but
  the hidden state) and hands its input hidden state on unchanged, so one cheap pass through the
  model's forward records what it passes each block, without computing any block;
- the hidden state entering the first block is kept; the driver then runs the real blocks one by one,
  each on the previous block's output plus the arguments the model's forward gave *that* block.

This holds whenever a block's arguments do not depend on an earlier block's output (masks, positions,
rotary embeddings and per-layer inputs are computed from the input ids). `check_replay` verifies it on
the model at hand: the replay of the dense model must reproduce the model's own forward.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn


class _LastBlockReached(Exception):
    pass


class ReplayMismatch(ValueError):
    """The blocks replayed one by one do not reproduce the model's own forward."""


@dataclass(frozen=True)
class CalibrationBatch:
    input_ids: torch.Tensor  # (batch, seq)
    attention_mask: torch.Tensor | None = None  # 1 for real tokens, 0 for padding


@dataclass
class BlockCall:
    """One call of one block, minus its hidden state: `hidden_name` is the keyword the block takes it
    by, or None when it comes first among the positional arguments."""

    args: tuple
    kwargs: dict
    hidden_name: str | None

    def run(self, block: nn.Module, hidden: torch.Tensor):
        if self.hidden_name is None:
            return block(hidden, *self.args, **self.kwargs)
        return block(*self.args, **{**self.kwargs, self.hidden_name: hidden})

    def moved(self, mover: Mover) -> BlockCall:
        return BlockCall(mover(self.args), mover(self.kwargs), self.hidden_name)


@dataclass
class CapturedInputs:
    """`hidden[b]`: the hidden state entering the first block for batch b; `calls[i][b]`: what the
    model's forward passed block i for batch b."""

    hidden: list[torch.Tensor]
    calls: list[list[BlockCall]]


class Mover:
    """Moves the tensors inside nested tuples, lists and dicts to one device, each distinct tensor once:
    the blocks of one layer type share their mask and rotary embeddings, and so do their copies."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self._moved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, value):
        if isinstance(value, torch.Tensor):
            seen = self._moved.get(id(value))
            if seen is None or seen[0] is not value:
                seen = (value, value.to(self.device))
                self._moved[id(value)] = seen
            return seen[1]
        if isinstance(value, tuple):
            return tuple(self(v) for v in value)
        if isinstance(value, list):
            return [self(v) for v in value]
        if isinstance(value, dict):
            return {k: self(v) for k, v in value.items()}
        return value


def block_output_hidden(output) -> torch.Tensor:
    """A block's output hidden state: blocks return it alone or first in a tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _hidden_parameter(block: nn.Module) -> str:
    parameters = [p for p in inspect.signature(type(block).forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    # parameters[0] is `self`
    if len(parameters) < 2:
        raise TypeError(f"{type(block).__name__}.forward takes no hidden-state argument")
    return parameters[1].name


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, batches: list[CalibrationBatch]) -> CapturedInputs:
    """Runs the model's forward on each batch with every block replaced by a recorder (see the module's
    docstring). One real block call on the first batch tells what a block returns (a tensor or a tuple),
    so the recorders hand the hidden state on in the shape the model's forward expects."""
    hidden_names = [_hidden_parameter(block) for block in blocks]
    calls: list[list[BlockCall]] = [[] for _ in blocks]
    first_hidden: list[torch.Tensor] = []
    output_shape: list = []  # [real output of one block], learnt once

    def recorder(index: int, real_forward):
        def record(*args, **kwargs):
            name = hidden_names[index]
            if args:
                hidden, call = args[0], BlockCall(tuple(args[1:]), dict(kwargs), None)
            elif name in kwargs:
                rest = dict(kwargs)
                hidden = rest.pop(name)
                call = BlockCall((), rest, name)
            else:
                raise TypeError(f"block {index} ({type(blocks[index]).__name__}) was called without its hidden "
                                f"state ({name!r})")
            calls[index].append(call)
            if index == 0:
                first_hidden.append(hidden)
            if index == len(blocks) - 1:
                raise _LastBlockReached
            if not output_shape:
                output_shape.append(real_forward(*args, **kwargs))
            real = output_shape[0]
            if isinstance(real, (tuple, list)):
                return type(real)((hidden, *real[1:]))
            return hidden
        return record

    own_forwards = [block.__dict__.get("forward") for block in blocks]  # e.g. accelerate's dispatch wrapper
    for index, block in enumerate(blocks):
        block.forward = recorder(index, block.forward)
    embed_device = model.get_input_embeddings().weight.device
    try:
        for batch in batches:
            mask = None if batch.attention_mask is None else batch.attention_mask.to(embed_device)
            try:
                model(input_ids=batch.input_ids.to(embed_device), attention_mask=mask, use_cache=False)
            except _LastBlockReached:
                continue
            raise RuntimeError(f"{type(model).__name__} never called its last decoder block")
    finally:
        for block, own in zip(blocks, own_forwards):
            if own is None:
                del block.forward
            else:
                block.forward = own
    for index, block_calls in enumerate(calls):
        if len(block_calls) != len(batches):
            raise RuntimeError(f"{type(model).__name__} called decoder block {index} {len(block_calls)} times for "
                               f"{len(batches)} batches; the layer-by-layer driver needs one call per block")
    return CapturedInputs(first_hidden, calls)


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.to(a.device).float()
    return float((a - b).norm() / b.norm().clamp_min(torch.finfo(torch.float32).tiny))


@torch.no_grad()
def check_replay(model: nn.Module, blocks: nn.ModuleList, batch: CalibrationBatch, tolerance: float | None = None) -> float:
    """Replays the (dense) blocks one by one on one batch and compares the last block's output with the
    model's own forward. Returns the relative difference; raises ReplayMismatch past `tolerance`
    (default: 1e-4 in float32, 1e-2 in 16-bit precisions), naming the first block that drifts."""
    own_outputs: list[torch.Tensor] = []

    def keep(_module, _args, output):
        own_outputs.append(block_output_hidden(output))
        if len(own_outputs) == len(blocks):
            raise _LastBlockReached  # the final norm and the head are not needed

    handles = [block.register_forward_hook(keep) for block in blocks]
    embed_device = model.get_input_embeddings().weight.device
    try:
        mask = None if batch.attention_mask is None else batch.attention_mask.to(embed_device)
        model(input_ids=batch.input_ids.to(embed_device), attention_mask=mask, use_cache=False)
    except _LastBlockReached:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if len(own_outputs) != len(blocks):
        raise RuntimeError(f"{type(model).__name__} called its {len(blocks)} decoder blocks {len(own_outputs)} times")
    captured = capture_block_inputs(model, blocks, [batch])
    hidden = captured.hidden[0]
    dtype = hidden.dtype
    if tolerance is None:
        tolerance = 1e-4 if dtype == torch.float32 else 1e-2
    worst = 0.0
    for index, block in enumerate(blocks):
        device = next(block.parameters()).device
        call = captured.calls[index][0].moved(Mover(device))
        hidden = block_output_hidden(call.run(block, hidden.to(device)))
        difference = _relative_difference(hidden, own_outputs[index])
        worst = max(worst, difference)
        if difference > tolerance:
            raise ReplayMismatch(
                f"{type(model).__name__}: decoder block {index} fed block by block differs from the model's own "
                f"forward by {difference:.2e} (relative; tolerance {tolerance:g}). Its forward changes the hidden "
                "state between blocks, or passes blocks arguments that depend on earlier blocks' outputs, which "
                "the layer-by-layer driver cannot replay; this architecture cannot be pruned with calibration "
                "data here")
    return worst
