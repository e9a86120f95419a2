"""Calibration windows: `samples` windows of `seq_len` tokens per trial, drawn by seed, in one of two ways.

`published` (the Wanda and SparseGPT C4 loaders, `get_c4`): per sample, the next document of a seeded
order that is longer than `seq_len` tokens, and one window inside it whose start is drawn uniformly from
`0 .. len - seq_len - 1` (Python's `random.randint`, inclusive, as published); a window never crosses a
document boundary. Documents are tokenized without special tokens (the published loaders count and may
start at the BOS token the tokenizer adds), each document is used at most once (the published loaders
draw with replacement), and at most `MAX_DOCUMENTS_PER_SAMPLE x samples` documents are read: too few long
documents is an error naming the language and what was found (the published loaders loop forever).

`packed`: documents, visited in an order drawn from the seed, are tokenized and joined with a document
boundary token from pretraining (`document_separator`: never a chat end-of-turn token) into one stream
that is cut into consecutive windows; reading stops as soon as the windows are full, and documents
shorter than a window are joined rather than rejected.

A mixture splits the sample budget across its languages by largest remainder, each language drawn with
its own seed.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.data.sources import documents
from engine.io import atomic_path
from engine.languages import get_language


class NotEnoughText(ValueError):
    pass


class TooFewLongDocuments(NotEnoughText):
    """`published` sampling found fewer documents longer than `seq_len` than it needs samples."""


class NoDocumentSeparator(ValueError):
    """`packed` sampling cannot tell which token separated documents in pretraining."""


SAMPLINGS = ("published", "packed")
MAX_DOCUMENTS_PER_SAMPLE = 200  # published: read at most this many documents per sample, then refuse


@dataclass(frozen=True)
class WindowRequest:
    samples: int
    seq_len: int
    seed: int
    sampling: str = "packed"  # `published` or `packed` (see the module docstring)
    separator: str | None = None  # packed: the separator token's text; None: `document_separator` chooses

    def __post_init__(self):
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling {self.sampling!r}: use one of {', '.join(SAMPLINGS)}")


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


def published_windows(documents: Iterable[str], encode: Callable[[str], list[int]], request: WindowRequest,
                      what: str = "the text") -> torch.Tensor:
    """(samples, seq_len) token ids, each row one window inside one document longer than seq_len tokens
    (the rule of the published Wanda and SparseGPT C4 loaders; see the module docstring)."""
    rng = random.Random(request.seed)
    limit = request.samples * MAX_DOCUMENTS_PER_SAMPLE
    rows: list[list[int]] = []
    read = 0
    for document in documents:
        if not document:
            continue
        read += 1
        ids = encode(document)
        if len(ids) > request.seq_len:  # Wanda's rule; SparseGPT's `>=` would fail on randint(0, -1)
            start = rng.randint(0, len(ids) - request.seq_len - 1)
            rows.append(ids[start:start + request.seq_len])
        if len(rows) == request.samples or read >= limit:
            break
    if len(rows) < request.samples:
        stopped = f" (the bound: {MAX_DOCUMENTS_PER_SAMPLE} documents per sample)" if read >= limit else ""
        raise TooFewLongDocuments(
            f"{what}: {len(rows)} of the {read} documents read{stopped} are longer than {request.seq_len} "
            f"tokens; published sampling takes each of its {request.samples} windows from its own such "
            f"document. Lower seq_len, add longer documents, or set `calibration.sampling: packed` (documents "
            f"joined at pretraining document boundaries).")
    return torch.tensor(rows, dtype=torch.long).view(request.samples, request.seq_len)


@dataclass(frozen=True)
class Separator:
    token: str
    id: int
    rule: str  # why this token: override | eos | end-of-text | bos


# A chat turn marker, by name, for tokenizers that carry no chat template.
_TURN_NAME = re.compile(r"eot|turn|im_end|im_start|end_header|start_header", re.IGNORECASE)
# A pretraining end-of-document token, by name: <|endoftext|>, <|end_of_text|>, <eos>, <EOS_TOKEN>, </s>.
_DOCUMENT_END = re.compile(r"^(<\|?(end_?of_?text|eos|eos_token)\|?>|</s>)$", re.IGNORECASE)


def _chat_templates(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        return "\n".join(str(t) for t in template.values())
    return template or ""


def _special_tokens(tokenizer) -> list[tuple[int, str]]:
    """(id, text) of the tokenizer's special tokens, lowest id first."""
    found = {}
    for index, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            found[int(index)] = str(added)
    for text in getattr(tokenizer, "all_special_tokens", []):
        index = tokenizer.convert_tokens_to_ids(text)
        if isinstance(index, int):
            found.setdefault(index, text)
    return sorted(found.items())


def chat_tokens(tokenizer) -> set[str]:
    """Special tokens that mark chat turns: written literally in the chat template, or named like a turn
    marker (eot, turn, im_end, ...)."""
    template = _chat_templates(tokenizer)
    return {text for _, text in _special_tokens(tokenizer) if (template and text in template) or _TURN_NAME.search(text)}


def document_separator(tokenizer, override: str | None = None) -> Separator:
    """The token that separated documents in pretraining, for `packed` windows; never a chat turn marker.

    `override` (the study's `calibration.separator`) must be one token of the vocabulary. Otherwise, first
    that is not a chat token (`chat_tokens`): the EOS token; a special token named like an end of text
    (`<|end_of_text|>`, `<|endoftext|>`, `<eos>`, `<EOS_TOKEN>`, `</s>`), lowest id first; the BOS token
    (documents start with it in pretraining). An instruct model's EOS often ends a chat turn instead
    (Llama 3 `<|eot_id|>`, SmolLM2 `<|im_end|>`, Aya 23 `<|END_OF_TURN_TOKEN|>`): then the next rule applies.
    """
    chat = chat_tokens(tokenizer)
    if override is not None:
        index = tokenizer.convert_tokens_to_ids(override)
        unknown = index is None or (index == tokenizer.unk_token_id and override != tokenizer.unk_token)
        if unknown or not isinstance(index, int):
            raise NoDocumentSeparator(f"calibration.separator {override!r} is not one token of the tokenizer's "
                                      f"vocabulary")
        if override in chat:
            raise NoDocumentSeparator(f"calibration.separator {override!r} marks chat turns, not documents")
        return Separator(override, index, "override")
    eos, bos = tokenizer.eos_token, tokenizer.bos_token
    if eos is not None and tokenizer.eos_token_id is not None and eos not in chat:
        return Separator(eos, tokenizer.eos_token_id, "eos")
    for index, text in _special_tokens(tokenizer):
        if _DOCUMENT_END.match(text) and text not in chat:
            return Separator(text, index, "end-of-text")
    if bos is not None and tokenizer.bos_token_id is not None and bos not in chat:
        return Separator(bos, tokenizer.bos_token_id, "bos")
    raise NoDocumentSeparator(
        f"cannot tell the token that separated documents in pretraining: EOS {eos!r} marks chat turns and no "
        f"end-of-text or BOS token is free of the chat template. Set `calibration.separator` to that token, or "
        f"use `calibration.sampling: published` (no separator: each window lies inside one document).")


CACHE_VERSION = 2  # 2: the sampling rule, and the packed separator (no longer always the EOS token)


def tokenizer_fingerprint(tokenizer) -> str:
    """Names the tokenizer's behaviour: its serialized vocabulary, merges, normalizer and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    special = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return hashlib.sha256((body + special).encode()).hexdigest()[:24]


def calibration_cache_key(tokenizer_id: str, source_identity: dict, weights: Sequence[tuple[str, float]],
                          request: WindowRequest, separator: Separator | None = None) -> str:
    """`separator`: the packed separator actually used (None for published sampling)."""
    payload = {"version": CACHE_VERSION, "tokenizer": tokenizer_id, "source": source_identity,
               "languages": [[code, weight] for code, weight in weights], "samples": request.samples,
               "seq_len": request.seq_len, "seed": request.seed, "sampling": request.sampling,
               "separator": None if separator is None else [separator.token, separator.id]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def calibration_cache_path(source, tokenizer, weights: Sequence[tuple[str, float]], request: WindowRequest,
                           cache_dir: Path | None, source_fingerprint: str | None = None) -> Path | None:
    """Where `calibration_set` keeps (and looks for) these windows under `cache_dir`; None without a cache."""
    if cache_dir is None:
        return None
    identity = {**source.identity(), "content": source_fingerprint}
    if source.kind == "hub":  # the configs the template names (`{mc4}` for English changed from C4's to mC4's)
        identity["resolved_configs"] = {code: source.config_for(get_language(code)) for code, _ in weights}
    separator = document_separator(tokenizer, request.separator) if request.sampling == "packed" else None
    key = calibration_cache_key(tokenizer_fingerprint(tokenizer), identity, weights, request, separator)
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
    separator = document_separator(tokenizer, request.separator) if request.sampling == "packed" else None

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    parts = []
    for code, count in split_budget(weights, request.samples).items():
        if count == 0:
            continue
        language = get_language(code)
        seed = language_seed(request.seed, code)
        part = WindowRequest(count, request.seq_len, seed, request.sampling, request.separator)
        stream = documents(source, language, seed)
        if separator is None:
            parts.append(published_windows(stream, encode, part, what=source.describe(language)))
        else:
            parts.append(pack_windows(stream, encode, separator.id, part, what=source.describe(language)))
    windows = torch.cat(parts)
    if path is not None:
        _write_cached(path, windows, {"key": key, "languages": json.dumps(list(weights)), "sampling": request.sampling,
                                      "separator": "" if separator is None else separator.token})
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
