"""Where a local text source keeps each language's files.

Layout under the source directory, per language code `xx`:
- `xx/` holding .jsonl / .txt / .parquet files (only `<split>.*` files, or those under `xx/<split>/`,
  when a split is named), or
- a single file `xx.jsonl`, `xx.txt` or `xx.parquet`.
"""
from __future__ import annotations

from pathlib import Path

TEXT_SUFFIXES = (".jsonl", ".txt", ".parquet")


def find_language_files(root: Path, lang: str, split: str | None = None) -> list[Path]:
    """The text files for `lang` under `root`, sorted; empty if there are none."""
    found: list[Path] = []
    lang_dir = root / lang
    if lang_dir.is_dir():
        if split is None:
            candidates = lang_dir.rglob("*")
        else:
            candidates = [*lang_dir.glob(f"{split}.*"), *(lang_dir / split).rglob("*")]
        found = [p for p in candidates if p.is_file() and p.suffix in TEXT_SUFFIXES and p.stat().st_size > 0]
    elif split is None:
        found = [root / f"{lang}{suffix}" for suffix in TEXT_SUFFIXES if (root / f"{lang}{suffix}").is_file()]
        found = [p for p in found if p.stat().st_size > 0]
    return sorted(set(found))
