"""Per-language perplexity of one in-memory model on the study's evaluation text."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from engine.evaluate.perplexity import PerplexityResult, perplexity
from engine.models import prefix_token_id

DOCUMENT_SEPARATOR = "\n\n"


def language_tokens(tokenizer, texts: Sequence[str], max_tokens: int | None) -> tuple[list[int], int]:
    """The language's evaluation text as one token stream (documents joined by a blank line), cut to at
    most `max_tokens` at a token boundary that is also a character boundary; returns the ids and the
    UTF-8 bytes they spell."""
    joined = DOCUMENT_SEPARATOR.join(texts)
    ids = tokenizer(joined, add_special_tokens=False, verbose=False)["input_ids"]
    if max_tokens is None or len(ids) <= max_tokens:
        return ids, len(joined.encode("utf-8"))
    cut = character_boundary_cut(tokenizer, ids, max_tokens, joined)
    spelled = tokenizer.decode(ids[:cut], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return ids[:cut], len(spelled.encode("utf-8"))


def character_boundary_cut(tokenizer, ids: Sequence[int], limit: int, text: str) -> int:
    """The largest n <= limit whose first n tokens spell whole characters of `text`.

    A byte-level tokenizer can split a character's UTF-8 bytes over tokens; cut between them and the
    decoded prefix ends in U+FFFD, whose 3 bytes are not the 1-3 bytes the tokens hold, so the byte
    count (the bits-per-byte denominator) would be wrong. A character is at most 4 bytes, so at most 3
    tokens are given back. Text the tokenizer normalises (its decoding is not a prefix of `text`) is cut
    at `limit` as before."""
    for n in range(limit, max(limit - 4, 0), -1):
        spelled = tokenizer.decode(ids[:n], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if not spelled.endswith("\ufffd") or text.startswith(spelled):
            return n
    return limit


def perplexity_of_tokens(model, tokenizer, ids: Sequence[int], text_bytes: int, window: int,
                         batch_size: int = 8) -> PerplexityResult:
    """Perplexity of already tokenized text, windows opened by the tokenizer's BOS (or EOS)."""
    prefix = prefix_token_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else prefix
    return perplexity(model, ids, text_bytes, window, prefix, batch_size=batch_size, pad_id=pad)


def perplexity_by_language(model, tokenizer, texts_by_language: Mapping[str, Sequence[str]], window: int,
                           max_tokens: int | None = None, batch_size: int = 8) -> dict[str, PerplexityResult]:
    results = {}
    for language, texts in texts_by_language.items():
        ids, n_bytes = language_tokens(tokenizer, texts, max_tokens)
        results[language] = perplexity_of_tokens(model, tokenizer, ids, n_bytes, window, batch_size)
    return results
