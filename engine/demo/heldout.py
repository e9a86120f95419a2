"""Held-out cross-entropy of a causal LM, and the unigram baseline it must beat."""
from __future__ import annotations

import math

import torch
from transformers import PreTrainedModel


def prediction_windows(stream: torch.Tensor, seq_len: int) -> list[torch.Tensor]:
    """Non-overlapping windows covering the stream; the last may be shorter. Each window's first token
    is context only, so the predicted tokens are the stream minus one token per window."""
    return [stream[i : i + seq_len] for i in range(0, len(stream), seq_len) if len(stream[i : i + seq_len]) > 1]


def predicted_tokens(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The tokens `model_loss` scores, in order (what the unigram baseline is scored on too)."""
    windows = prediction_windows(stream, seq_len)
    return torch.cat([w[1:] for w in windows]) if windows else torch.empty(0, dtype=torch.long)


@torch.no_grad()
def model_loss(model: PreTrainedModel, stream: torch.Tensor, seq_len: int, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats/token) over non-overlapping windows, computed in float32."""
    windows = prediction_windows(stream, seq_len)
    if not windows:
        raise ValueError("stream too short to score")
    model.eval()
    total, count = 0.0, 0
    full = [w for w in windows if len(w) == seq_len]
    batches = [torch.stack(full[i : i + batch_size]) for i in range(0, len(full), batch_size)]
    batches += [w.unsqueeze(0) for w in windows if len(w) != seq_len]
    for batch in batches:
        logits = model(input_ids=batch).logits[:, :-1].float()
        targets = batch[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum")
        total += float(nll)
        count += targets.numel()
    return total / count


def unigram_log_probs(train_stream: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Add-one smoothed unigram log-probabilities over the whole vocabulary."""
    counts = torch.bincount(train_stream, minlength=vocab_size).double() + 1.0
    return torch.log(counts / counts.sum())


def unigram_loss(train_stream: torch.Tensor, eval_stream: torch.Tensor, vocab_size: int, seq_len: int) -> float:
    """Cross-entropy (nats/token) of exactly the tokens `model_loss` scores, under the unigram model."""
    targets = predicted_tokens(eval_stream, seq_len)
    if targets.numel() == 0:
        return math.nan
    return float(-unigram_log_probs(train_stream, vocab_size)[targets].mean())
