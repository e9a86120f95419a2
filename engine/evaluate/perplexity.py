"""Perplexity and bits per byte over non-overlapping windows of a fixed length.

Each window is `[bos] + (window - 1) text tokens`, so every text token is predicted exactly once and
bits per byte divide the whole text's negative log-likelihood by its UTF-8 bytes. Bits per byte compare
across languages and tokenizers; token perplexity does not (a tokenizer that splits Swahili finely gets
a lower token perplexity for the same model quality).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from engine.evaluate.output_head import split_head, vocabulary_size


@dataclass(frozen=True)
class PerplexityResult:
    window: int  # tokens per window, the prefix token included
    windows: int
    tokens: int  # predicted text tokens
    bytes: int  # UTF-8 bytes of the text those tokens spell
    nll: float  # summed negative log-likelihood, nats
    # Each text token's NLL (nats) in text order: the units a paired bootstrap between two models resamples.
    token_nll: tuple[float, ...] = field(default=(), repr=False, compare=False)

    @property
    def loss(self) -> float:
        return self.nll / self.tokens

    @property
    def token_perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes



def windows_of(token_ids: Sequence[int], window: int, prefix_id: int) -> list[list[int]]:
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    step = window - 1
    return [[prefix_id, *token_ids[i : i + step]] for i in range(0, len(token_ids), step)]


def batches_of_equal_length(chunks: list[list[int]], batch_size: int) -> list[list[list[int]]]:
    """Consecutive windows in batches of at most `batch_size`, never mixing lengths: the last, shorter
    window gets a batch of its own instead of being padded to a full window (which costs a full
    window's forward pass and, with a large vocabulary, most of its time in the output layer)."""
    batches: list[list[list[int]]] = []
    for chunk in chunks:
        if batches and len(batches[-1]) < batch_size and len(batches[-1][0]) == len(chunk):
            batches[-1].append(chunk)
        else:
            batches.append([chunk])
    return batches


@torch.no_grad()
def window_token_nll(model: torch.nn.Module, batch: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Next-token NLL (nats) at every position [rows, width - 1], zero where the target is padding.

    When the model's head splits off (`output_head.split_head`), the body runs once and the head and
    the loss run a chunk of positions at a time, so a chunk's logits are consumed while still in
    cache and a batch's vocabulary-wide logits never all exist at once. Otherwise the whole model runs
    and rows are scored one at a time. Either way the loss is float32 `cross_entropy` of the model's
    own logits."""
    split = split_head(model)
    targets_all = batch[:, 1:]
    if split is None:
        logits = model(input_ids=batch, attention_mask=attention_mask).logits
        targets = targets_all.to(logits.device)  # a model spread over GPUs may answer on its last one
        weights = attention_mask[:, 1:].to(logits.device)
        rows = [torch.nn.functional.cross_entropy(logits[row, :-1].float(), targets[row], reduction="none")
                * weights[row] for row in range(logits.shape[0])]
        return torch.stack(rows)
    hidden = split.body(input_ids=batch, attention_mask=attention_mask, use_cache=False).last_hidden_state
    n_rows, width = targets_all.shape
    flat = hidden[:, :-1].reshape(n_rows * width, hidden.shape[-1])
    targets = targets_all.reshape(-1)
    per_chunk = split.positions_per_chunk(vocabulary_size(split), flat.device)
    losses = []
    for begin in range(0, flat.shape[0], per_chunk):
        logits = split.logits(flat[begin:begin + per_chunk])
        losses.append(torch.nn.functional.cross_entropy(
            logits.float(), targets[begin:begin + per_chunk].to(logits.device), reduction="none"))
    nll = torch.cat(losses).view(n_rows, width)
    return nll * attention_mask[:, 1:].to(nll.device)


def window_nll(model: torch.nn.Module, batch: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL (nats) per row, counting only positions whose target is a real token."""
    return window_token_nll(model, batch, attention_mask).sum(dim=1)


@torch.no_grad()
def perplexity(model: torch.nn.Module, token_ids: Sequence[int], text_bytes: int, window: int, prefix_id: int,
               batch_size: int = 8, pad_id: int = 0) -> PerplexityResult:
    """Perplexity of `model` on one language's text, given as its token ids and its UTF-8 byte count."""
    if not token_ids:
        raise ValueError("no tokens to evaluate")
    device = next(model.parameters()).device
    chunks = windows_of(token_ids, window, prefix_id)
    losses: list[float] = []
    was_training = model.training
    model.eval()
    try:
        for group in batches_of_equal_length(chunks, batch_size):
            width = max(len(c) for c in group)
            batch = torch.full((len(group), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(group), width), dtype=torch.long)
            for row, chunk in enumerate(group):
                batch[row, : len(chunk)] = torch.tensor(chunk)
                mask[row, : len(chunk)] = 1
            per_token = window_token_nll(model, batch.to(device), mask.to(device)).double().cpu()
            for row, chunk in enumerate(group):
                losses.extend(per_token[row, : len(chunk) - 1].tolist())
    finally:
        model.train(was_training)
    return PerplexityResult(window=window, windows=len(chunks), tokens=len(token_ids), bytes=text_bytes,
                            nll=math.fsum(losses), token_nll=tuple(losses))
