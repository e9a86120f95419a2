"""Hub evaluation text, tokenized once and kept on disk beside the calibration windows.

A hub perplexity source is streamed (mC4 has no download worth making), so without a cache every
loaded model would stream it again and an offline worker could not read it at all. The cache holds
exactly what `engine.evaluate.suite.language_tokens` returns for the language: the token ids and the
UTF-8 bytes they spell, keyed by the tokenizer, the source, the language and `max_tokens`. Local
sources are read from their files each time (no network, and their content is not in the key).

    <cache_dir>/evaluation/<key>.safetensors    input_ids (int64, 1-D); metadata: bytes, language, key
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from engine.io import atomic_path
from engine.languages import get_language

CACHE_VERSION = 2  # 2: max_tokens cuts at a character boundary


def evaluation_cache_key(tokenizer_id: str, source_identity: dict, language: str, max_tokens: int | None) -> str:
    payload = {"version": CACHE_VERSION, "tokenizer": tokenizer_id, "source": source_identity, "language": language,
               "max_tokens": max_tokens}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def evaluation_cache_path(source, tokenizer, language: str, max_tokens: int | None,
                          cache_dir: Path | None) -> Path | None:
    """Where a hub source's tokenized evaluation text for `language` is cached; None for a local source
    or without a cache directory."""
    if cache_dir is None or source.kind != "hub":
        return None
    from engine.data.calibration import tokenizer_fingerprint

    # the config the template names for this language (`{mc4}` for English changed from C4's to mC4's)
    identity = {**source.identity(), "resolved_config": source.config_for(get_language(language))}
    key = evaluation_cache_key(tokenizer_fingerprint(tokenizer), identity, language, max_tokens)
    return Path(cache_dir) / "evaluation" / f"{key}.safetensors"


def read_evaluation_tokens(path: Path) -> tuple[list[int], int] | None:
    """(ids, bytes) from a cache file; None when it is missing, corrupt or foreign (then it is rebuilt)."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            ids = handle.get_tensor("input_ids")
        return [int(i) for i in ids.tolist()], int(metadata["bytes"])
    except Exception:  # noqa: BLE001 - never trust a file that does not read back whole
        return None


def write_evaluation_tokens(path: Path, ids: list[int], n_bytes: int, language: str) -> None:
    """Unique temporary name, then an atomic rename (concurrent writers each write a whole file)."""
    import torch
    from safetensors.torch import save_file

    with atomic_path(path) as temporary:
        save_file({"input_ids": torch.tensor(ids, dtype=torch.long)}, str(temporary),
                  metadata={"bytes": str(n_bytes), "language": language, "key": path.stem})
