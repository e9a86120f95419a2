"""Calibration windows: `samples` windows of `seq_len` tokens per trial, drawn by seed.

Documents are visited in an order drawn from the seed, tokenized, and joined with an EOS separator into
one stream that is cut into consecutive windows; reading stops as soon as the windows are full, so a
stream is never read further than needed, and documents shorter than a window are joined rather than
rejected (the published loaders loop forever when no document is long enough). A mixture splits the
sample budget across its languages by largest remainder, each language drawn with its own seed.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.data.sources import documents
from engine.io import atomic_path
from engine.languages import get_language


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



CACHE_VERSION = 1


def tokenizer_fingerprint(tokenizer) -> str:
    """Names the tokenizer's behaviour: its serialized vocabulary, merges, normalizer and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    special = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return hashlib.sha256((body + special).encode()).hexdigest()[:24]


def calibration_cache_key(tokenizer_id: str, source_identity: dict, weights: Sequence[tuple[str, float]],
                          request: WindowRequest) -> str:
    payload = {"version": CACHE_VERSION, "tokenizer": tokenizer_id, "source": source_identity,
               "languages": [[code, weight] for code, weight in weights], "samples": request.samples,
               "seq_len": request.seq_len, "seed": request.seed}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def calibration_cache_path(source, tokenizer, weights: Sequence[tuple[str, float]], request: WindowRequest,
                           cache_dir: Path | None, source_fingerprint: str | None = None) -> Path | None:
    """Where `calibration_set` keeps (and looks for) these windows under `cache_dir`; None without a cache."""
    if cache_dir is None:
        return None
    identity = {**source.identity(), "content": source_fingerprint}
    key = calibration_cache_key(tokenizer_fingerprint(tokenizer), identity, weights, request)
    return Path(cache_dir) / "calibration" / f"{key}.safetensors"


def calibration_set(source, tokenizer, weights: Sequence[tuple[str, float]], request: WindowRequest,
                    cache_dir: Path | None = None, source_fingerprint: str | None = None) -> torch.Tensor:
    """(samples, seq_len) calibration token ids for a language or mixture, from the cache when present.

    `source` is an engine.data.sources.TextSourceConfig; `source_fingerprint` names the content of a
    local source (its files), which its configuration alone does not.
    """

    path = calibration_cache_path(source, tokenizer, weights, request, cache_dir, source_fingerprint)
    key = path.stem if path is not None else None
    if path is not None and path.is_file():
        cached = _read_cached(path)
        if cached is not None and tuple(cached.shape) == (request.samples, request.seq_len):
            return cached
    separator = tokenizer.eos_token_id
    if separator is None:
        raise ValueError("the tokenizer has no EOS token to separate calibration documents with")

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    parts = []
    for code, count in split_budget(weights, request.samples).items():
        if count == 0:
            continue
        language = get_language(code)
        seed = language_seed(request.seed, code)
        parts.append(pack_windows(documents(source, language, seed), encode, separator,
                                  WindowRequest(count, request.seq_len, seed), what=source.describe(language)))
    windows = torch.cat(parts)
    if path is not None:
        _write_cached(path, windows, {"key": key, "languages": json.dumps(list(weights))})
    return windows


def _read_cached(path: Path) -> torch.Tensor | None:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))["input_ids"]
    except Exception:  # a corrupt or foreign file is rebuilt, never trusted
        return None


def _write_cached(path: Path, windows: torch.Tensor, metadata: dict[str, str]) -> None:
    """Unique temporary name, then an atomic rename: two processes filling one entry both write whole
    files, and the reader sees one or the other, never a mixture."""
    from safetensors.torch import save_file

    with atomic_path(path) as temporary:
        save_file({"input_ids": windows.contiguous()}, str(temporary), metadata=metadata)
