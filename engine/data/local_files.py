"""Where a local text source keeps each language's files.

Layout under the source directory, per language code `xx`:
- `xx/` holding .jsonl / .txt / .parquet files (only `<split>.*` files, or those under `xx/<split>/`,
  when a split is named), or
- a single file `xx.jsonl`, `xx.txt` or `xx.parquet`.
"""
from __future__ import annotations

import json
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


def read_texts(files: list[Path], text_field: str = "text") -> list[str]:
    """Documents from .jsonl (one JSON object per line, `text_field` holding the text), .txt (paragraphs
    separated by blank lines) or .parquet (a `text_field` column) files, in file order."""

    texts: list[str] = []
    for path in files:
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as handle:
                for number, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except ValueError as err:
                        raise ValueError(f"{path}:{number}: not a JSON line ({err})") from None
                    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                        raise ValueError(f"{path}:{number}: no string field {text_field!r}")
                    texts.append(record[text_field])
        elif path.suffix == ".txt":
            content = path.read_text(encoding="utf-8")
            texts.extend(p.strip() for p in content.split("\n\n") if p.strip())
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path, columns=[text_field])
            texts.extend(str(t) for t in table.column(text_field).to_pylist() if t)
        else:
            raise ValueError(f"{path}: unsupported text file type (use .jsonl, .txt or .parquet)")
    return texts
