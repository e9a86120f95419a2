"""Layer-by-layer pruning driven by calibration activations, the same for every decoder architecture.

1. Let the model's own forward record, for every calibration batch, the hidden state entering the first
   decoder block and everything it passes each block (attention mask, position ids, rotary embeddings,
   ...: per block, since models such as Gemma 3 give each layer type its own; engine.prune.block_inputs).
   Check on one sample that replaying the dense blocks one by one reproduces the model's own forward.
2. For each block in turn: move it to the working device; run it on its inputs (the previous block's
   output plus its own recorded arguments) with hooks that accumulate input statistics for its linear
   layers (layers fed the same tensor, q/k/v or gate/up, share one statistic); prune its linear layers;
   run it again so the next block sees pruned outputs, as the published Wanda and SparseGPT pipelines
   do; move it back.
Only one block and the activations live on the working device, so a model larger than the accelerator
can be pruned on it. A model already spread over several GPUs (engine.placement) is pruned block by
block on the GPU that holds each block, the activations following the blocks from GPU to GPU.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from engine.analyze.mask_sample import sample_mask
from engine.prune.block_inputs import (
    BlockCall,
    CalibrationBatch,
    Mover,
    block_output_hidden,
    capture_block_inputs,
    check_replay,
)
from engine.prune.layers import find_decoder_layers, linear_layers
from engine.prune.pruners import Pruner, check_sparsity_fits
from engine.prune.sparsegpt_math import CholeskyError
from engine.prune.sparsity import Sparsity
from engine.prune.statistics import InputStatistics, relative_output_error


@dataclass
class LinearReport:
    name: str  # e.g. model.layers.3.mlp.up_proj
    shape: tuple[int, int]
    sparsity: float
    shared_statistics_with: str | None = None
    relative_error: float | None = None  # ||WX - W'X||^2 / ||WX||^2 on the calibration inputs
    info: dict = field(default_factory=dict)


@dataclass
class PruneReport:
    method: str
    sparsity: str
    layers: list[LinearReport]
    seconds: float
    calibration_tokens: int
    peak_accelerator_bytes: int | None
    statistics_computed: int  # statistics accumulated (fewer than pruned layers when inputs are shared)
    peak_statistics_bytes: int  # the largest block's statistics (norms and Hessians) held at once
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> bool mask on CPU, if kept
    # name -> the mask's bits at a fixed sample of positions (engine.analyze.mask_sample), if asked
    mask_samples: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def extra_dampening(self) -> dict[str, float]:
        return {r.name: r.info["dampening"] for r in self.layers if r.info.get("dampening_retries")}


def batches_of(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, batch_size: int) -> list[CalibrationBatch]:
    if input_ids.ndim != 2 or input_ids.shape[0] == 0:
        raise ValueError("calibration needs at least one sample: input_ids of shape (samples, seq_len)")
    return [CalibrationBatch(input_ids[i : i + batch_size],
                             None if attention_mask is None else attention_mask[i : i + batch_size])
            for i in range(0, input_ids.shape[0], batch_size)]


class _StatisticsHooks:
    """Forward hooks feeding InputStatistics; layers whose input is the very same tensor share one."""

    def __init__(self, linears: dict[str, nn.Linear], with_hessian: bool, device, share: bool = True):
        self.linears = linears
        self.share = share
        self.with_hessian = with_hessian
        self.device = device
        self.stats: dict[str, InputStatistics] = {}
        self.shared_with: dict[str, str] = {}
        self.token_mask: torch.Tensor | None = None
        self._seen: dict[tuple, tuple[str, torch.Tensor]] = {}
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in linears.items()]

    def new_forward(self, token_mask: torch.Tensor | None) -> None:
        self.token_mask = token_mask
        self._seen.clear()  # references held during one forward keep data_ptr from being reused

    def _hook(self, name: str):
        def hook(module, args, output):
            x = args[0]
            identity = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype)
            first = self._seen.get(identity) if self.share else None
            if first is not None and first[0] != name:
                self.shared_with.setdefault(name, first[0])
                return
            self._seen[identity] = (name, x)
            owner = self.shared_with.get(name, name)
            if owner != name:
                return
            if name not in self.stats:
                self.stats[name] = InputStatistics(x.shape[-1], self.with_hessian, self.device)
            flat = x.reshape(-1, x.shape[-1])
            if self.token_mask is not None:
                flat = flat[self.token_mask.reshape(-1).to(flat.device).bool()]
            self.stats[name].add(flat)
        return hook

    def statistics_for(self, name: str) -> InputStatistics | None:
        return self.stats.get(self.shared_with.get(name, name))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def devices_of(module: nn.Module) -> set[torch.device]:
    return {p.device for p in module.parameters()}


def _peak_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


@torch.no_grad()
def prune_sequentially(model: nn.Module, pruner: Pruner, sparsity: Sparsity, input_ids: torch.Tensor | None = None,
                       attention_mask: torch.Tensor | None = None, targets: list[str] | None = None,
                       device: str | torch.device | None = None, batch_size: int = 8, keep_masks: bool = False,
                       mask_sample: int | None = None,
                       measure_error: bool = False, share_statistics: bool = True,
                       check_inputs: bool = True) -> PruneReport:
    """Prunes `model` in place. `input_ids` (samples, seq_len) are the calibration windows; methods that
    need no calibration (magnitude) take None. `measure_error` accumulates each layer's Hessian (if the
    method does not already) to report ||WX - W'X||^2 / ||WX||^2. `share_statistics=False` gives every
    linear layer its own statistic (the plain way; for benchmarks). `check_inputs` first verifies on the
    first calibration sample that the blocks fed one by one reproduce the model's own forward
    (engine.prune.block_inputs.check_replay; skipped when the blocks live elsewhere than `device`, where
    the model's own forward would run on the CPU)."""
    started = time.perf_counter()
    prefix, blocks = find_decoder_layers(model)
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    if any(d.type == "meta" for d in devices_of(blocks)):
        raise ValueError("some decoder weights are offloaded (on the meta device): pruning changes weights in place "
                         "and needs them all resident on a GPU or the CPU; load the model without offloading")
    spread = len(devices_of(blocks)) > 1
    for used in (devices_of(blocks) if spread else {device}):
        if used.type == "cuda":
            torch.cuda.reset_peak_memory_stats(used)
    needs_inputs = pruner.needs_inputs or measure_error
    with_hessian = pruner.needs_hessian or measure_error
    for index, block in enumerate(blocks):
        for name, linear in linear_layers(block, targets).items():
            check_sparsity_fits(sparsity, linear.in_features, f"{prefix}.{index}.{name}")

    hidden: list[torch.Tensor] = []  # per batch: what enters the block being pruned
    calls: list[list[BlockCall]] = []  # per block, per batch: what the model's forward passes it
    token_masks: list[torch.Tensor | None] = []
    tokens = 0
    if needs_inputs:
        if input_ids is None:
            raise ValueError(f"{pruner.method} needs calibration samples; got none")
        batches = batches_of(input_ids, attention_mask, batch_size)
        tokens = int(attention_mask.sum()) if attention_mask is not None else input_ids.numel()
        if tokens == 0:
            raise ValueError("the calibration samples hold no real tokens (all padding)")

    reports: list[LinearReport] = []
    masks: dict[str, torch.Tensor] = {}
    samples: dict[str, torch.Tensor] = {}
    statistics_computed = 0
    peak_statistics_bytes = 0
    model_was_training = model.training
    model.eval()
    try:
        if needs_inputs:
            if check_inputs and (spread or devices_of(blocks) == {device}):
                first = batches[0]
                check_replay(model, blocks, CalibrationBatch(
                    first.input_ids[:1], None if first.attention_mask is None else first.attention_mask[:1]))
            captured = capture_block_inputs(model, blocks, batches)
            hidden, calls = captured.hidden, captured.calls
            token_masks = [b.attention_mask for b in batches]
            del captured
        for index, block in enumerate(blocks):
            block_home = next(block.parameters()).device
            work = block_home if spread else device
            block.to(work)
            linears = linear_layers(block, targets)
            hooks = None
            if needs_inputs:
                mover = Mover(work)  # the block's arguments on its device, each shared tensor copied once
                block_calls = [call.moved(mover) for call in calls[index]]
                calls[index] = []  # this block's recorded arguments are no longer needed
                for i, h in enumerate(hidden):
                    hidden[i] = h.to(work)
                hooks = _StatisticsHooks(linears, with_hessian, work, share_statistics)
                for call, h, token_mask in zip(block_calls, hidden, token_masks):
                    hooks.new_forward(token_mask)
                    call.run(block, h)
                hooks.remove()
                statistics_computed += len(hooks.stats)
                peak_statistics_bytes = max(peak_statistics_bytes, sum(st.nbytes() for st in hooks.stats.values()))
            for name, linear in linears.items():
                full_name = f"{prefix}.{index}.{name}"
                stats = hooks.statistics_for(name) if hooks else None
                dense = linear.weight.detach().clone() if measure_error else None
                try:
                    out = pruner.prune(linear.weight, stats, sparsity)
                except CholeskyError as err:
                    raise CholeskyError(f"{full_name}: {err}") from None
                linear.weight.copy_(out.weight.to(linear.weight.dtype))
                report = LinearReport(full_name, tuple(linear.weight.shape), float(out.mask.float().mean()),
                                      info=dict(out.info))
                if hooks is not None and name in hooks.shared_with:
                    report.shared_statistics_with = f"{prefix}.{index}.{hooks.shared_with[name]}"
                if measure_error and stats is not None and stats.hessian is not None:
                    report.relative_error = relative_output_error(dense, linear.weight, stats.hessian)
                reports.append(report)
                if keep_masks:
                    masks[full_name] = out.mask.cpu()
                if mask_sample:
                    samples[full_name] = sample_mask(out.mask, full_name, mask_sample)
            if needs_inputs:
                del hooks
                for i, call in enumerate(block_calls):  # in place: one set of activations at a time
                    hidden[i] = block_output_hidden(call.run(block, hidden[i]))
                del block_calls, mover
            block.to(block_home)
    finally:
        model.train(model_was_training)
    return PruneReport(
        method=pruner.method,
        sparsity=sparsity.canonical(),
        layers=reports,
        seconds=time.perf_counter() - started,
        calibration_tokens=tokens,
        peak_accelerator_bytes=max((_peak_bytes(d) or 0 for d in (devices_of(blocks) if spread else {device})),
                                   default=0) or None,
        statistics_computed=statistics_computed,
        peak_statistics_bytes=peak_statistics_bytes,
        masks=masks,
        mask_samples=samples,
    )
