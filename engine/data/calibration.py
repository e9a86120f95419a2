"""Calibration windows: `samples` windows of `seq_len` tokens per trial, drawn by seed.

Documents are visited in an order drawn from the seed, tokenized, and joined with an EOS separator into
one stream that is cut into consecutive windows; reading stops as soon as the windows are full, so a
stream is never read further than needed, and documents shorter than a window are joined rather than
rejected (the published loaders loop forever when no document is long enough). A mixture splits the
sample budget across its languages by largest remainder, each language drawn with its own seed.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch


class NotEnoughText(ValueError):
    pass


@dataclass(frozen=True)
class WindowRequest:
    samples: int
    seq_len: int
    seed: int


def split_budget(weights: Sequence[tuple[str, float]], samples: int) -> dict[str, int]:
    """Samples per language, proportional to the weights, summing to `samples` (largest remainder;
    ties go to the language listed first)."""
    total = sum(w for _, w in weights)
    exact = [(code, samples * w / total) for code, w in weights]
    counts = {code: int(share) for code, share in exact}
    left = samples - sum(counts.values())
    by_remainder = sorted(range(len(exact)), key=lambda i: (-(exact[i][1] - int(exact[i][1])), i))
    for i in by_remainder[:left]:
        counts[exact[i][0]] += 1
    return counts


def language_seed(seed: int, language: str) -> int:
    """A per-language seed, stable across processes and Python versions (unlike hash())."""
    digest = hashlib.sha256(f"{seed}:{language}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def shuffled(documents: Sequence[str], seed: int) -> list[str]:
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    return [documents[i] for i in order]


def pack_windows(documents: Iterable[str], encode: Callable[[str], list[int]], separator_id: int,
                 request: WindowRequest, what: str = "the text") -> torch.Tensor:
    """(samples, seq_len) token ids from consecutive stretches of the EOS-joined document stream."""
    needed = request.samples * request.seq_len
    stream: list[int] = []
    seen_documents = 0
    for document in documents:
        if not document:
            continue
        if stream:
            stream.append(separator_id)
        stream.extend(encode(document))
        seen_documents += 1
        if len(stream) >= needed:
            break
    if len(stream) < needed:
        raise NotEnoughText(
            f"{what} holds {len(stream)} tokens in {seen_documents} documents; {request.samples} samples x "
            f"{request.seq_len} tokens need {needed}. Lower samples or seq_len, or add text.")
    return torch.tensor(stream[:needed], dtype=torch.long).view(request.samples, request.seq_len)

