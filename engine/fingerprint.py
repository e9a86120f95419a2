"""Cheap content fingerprints for local models and text, so a trial key follows the data, not its path.

Hashing every byte of a 140 GB checkpoint would make `sweep plan` take minutes; instead each file
contributes its name, size and a hash of its first and last MiB. Retrained weights differ there; a
moved directory does not change the fingerprint.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

SAMPLE_BYTES = 1 << 20
MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".txt", ".jinja", ".py", ".tiktoken")


def file_fingerprint(path: Path) -> str:
    size = path.stat().st_size
    digest = hashlib.sha256(f"{size}:".encode())
    with path.open("rb") as handle:
        digest.update(handle.read(SAMPLE_BYTES))
        if size > 2 * SAMPLE_BYTES:
            handle.seek(size - SAMPLE_BYTES)
            digest.update(handle.read(SAMPLE_BYTES))
        elif size > SAMPLE_BYTES:
            digest.update(handle.read())
    return digest.hexdigest()[:24]


def files_fingerprint(files: list[Path], relative_to: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(f"{path.relative_to(relative_to).as_posix()}={file_fingerprint(path)};".encode())
    return digest.hexdigest()[:24]


def model_dir_fingerprint(model_dir: Path) -> str:
    files = [p for p in model_dir.iterdir() if p.is_file() and p.suffix in MODEL_FILE_SUFFIXES]
    return files_fingerprint(files, model_dir)
