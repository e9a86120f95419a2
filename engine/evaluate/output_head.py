"""A causal LM split into its body (everything up to the last hidden state) and its output head.

Scoring text needs the log-softmax of the logits at many positions. Run whole, the model writes every
position's vocabulary-wide logits to memory before anything reads them (67 MB for 2,048 positions of
an 8k vocabulary; 2 GB at Llama-3's 128k), and on a CPU that write, not the arithmetic, sets the
speed. Split, the body runs once and the head runs over a few positions at a time, each chunk's logits
consumed while they are still in cache: 2.6x faster for head plus loss on 2,048 x 8,192 on one core
(chunk sizes: `SplitHead.positions_per_chunk`).

Nothing architecture-specific is assumed. `split_head` takes the model's own `base_model` and
`get_output_embeddings()`, then checks on a probe input that body + head gives the model's own logits,
exactly or up to one scalar factor (Cohere's `logit_scale`, Granite's `logits_scaling`); any other
transform of the logits (a soft cap, say) fails the check and the caller runs the whole model instead.
"""
from __future__ import annotations

import contextlib
import inspect
import weakref
from dataclasses import dataclass

import torch

# The probe's tolerance: body + head must give the model's logits to this relative precision.
PROBE_RTOL = 1e-5
# Positions per head chunk on a CPU: enough that the head's weight, read once per chunk, is not what
# costs (at least `hidden` positions: Gemma 3's 262k x 640 head is 5x slower in chunks of 8 than of
# 640), and as few more as keep the chunk's float32 logits in cache (4 MiB: 128 positions of an 8k
# vocabulary) but never over CPU_CHUNK_MAX_BYTES of them.
CPU_CHUNK_CACHE_BYTES = 1 << 22
CPU_CHUNK_MAX_BYTES = 1 << 29
# On a GPU, chunks only bound memory.
GPU_CHUNK_ELEMENTS = 1 << 28


@dataclass(frozen=True)
class SplitHead:
    body: torch.nn.Module
    head: torch.nn.Module
    scale: float | None  # the model's logits are head(hidden) * scale (None: exactly head(hidden))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)
        return logits if self.scale is None else logits * self.scale

    def positions_per_chunk(self, vocab: int, device: torch.device) -> int:
        if device.type != "cpu":
            return max(1, GPU_CHUNK_ELEMENTS // vocab)
        hidden = int(getattr(self.head, "in_features", 0) or self.head.weight.shape[1])
        wanted = max(CPU_CHUNK_CACHE_BYTES // (4 * vocab), hidden)
        return max(1, min(wanted, CPU_CHUNK_MAX_BYTES // (4 * vocab)))


def vocabulary_size(split: SplitHead) -> int:
    out = getattr(split.head, "out_features", None)
    return int(out) if out else int(split.head.weight.shape[0])


_SPLITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def forward_parameters(module: torch.nn.Module) -> set[str]:
    return set(inspect.signature(module.forward).parameters)


def cache_argument(module: torch.nn.Module) -> str:
    """transformers 5 renamed `past_key_values` to `cache`; either is accepted, the new one preferred."""
    return "cache" if "cache" in forward_parameters(module) else "past_key_values"


def returned_cache(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def input_device(model: torch.nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


_HOOK_TABLES = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


@contextlib.contextmanager
def _hooks_paused(model: torch.nn.Module):
    """The probe's random tokens must not reach forward hooks an analysis has attached (they would be
    counted as evaluation text), so every module's hook tables are emptied for its duration."""
    saved = []
    for module in model.modules():
        for table in _HOOK_TABLES:
            hooks = getattr(module, table, None)
            if hooks:
                saved.append((hooks, dict(hooks)))
                hooks.clear()
    try:
        yield
    finally:
        for hooks, entries in saved:
            hooks.update(entries)


@torch.no_grad()
def _probe(model: torch.nn.Module) -> SplitHead | None:
    body = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if body is None or body is model or head is None:
        return None
    vocab = int(getattr(head, "out_features", 0) or model.config.vocab_size)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(vocab, model.get_input_embeddings().num_embeddings), (2, 12),
                        generator=generator).to(input_device(model))
    was_training = model.training
    model.eval()
    try:
        with _hooks_paused(model):
            whole = model(input_ids=ids, use_cache=False).logits.float()
            hidden = body(input_ids=ids, use_cache=False).last_hidden_state
            raw = head(hidden).float()
    except Exception:  # a body that cannot run alone: score with the whole model
        return None
    finally:
        model.train(was_training)
    if raw.shape != whole.shape:
        return None
    whole, raw = whole.to(raw.device), raw
    tolerance = PROBE_RTOL * float(whole.abs().max())
    if float((whole - raw).abs().max()) <= tolerance:
        return SplitHead(body, head, None)
    scale = float((whole * raw).sum() / (raw * raw).sum())
    if float((whole - raw * scale).abs().max()) <= tolerance:
        return SplitHead(body, head, scale)
    return None


def split_head(model: torch.nn.Module) -> SplitHead | None:
    """The model's body and head (module docstring), or None when they do not reproduce its logits.
    Checked once per model object: pruning changes weights, not how the logits are formed."""
    if model in _SPLITS:
        return _SPLITS[model]
    split = _probe(model)
    _SPLITS[model] = split
    return split
