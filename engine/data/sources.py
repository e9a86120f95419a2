"""Text sources: a hub dataset streamed through `datasets` (mC4 per language, say) or local files.

Both yield one language's documents in an order drawn from a seed, and are read lazily, so a caller
that stops early (calibration needs a few hundred thousand tokens) never reads the rest.
"""
from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from engine.data.local_files import find_language_files, read_texts
from engine.languages import Language

HUB_SHUFFLE_BUFFER = 10_000


class MissingLanguageText(ValueError):
    pass


@dataclass(frozen=True)
class TextSourceConfig:
    kind: Literal["hub", "local"]
    dataset: str | None = None  # hub: owner/name, or a local directory laid out like the hub repository
    config: str | None = None  # template: {lang} (= {code}, ISO 639-1) {mc4} {flores} {iso639_3}
    revision: str | None = None
    split: str | None = None
    text_field: str = "text"
    path: Path | None = None  # local: one folder or file per language (engine.data.local_files)

    def config_for(self, language: Language) -> str | None:
        if self.config is None:
            return None
        codes = {"lang": language.code, "code": language.code, "mc4": language.mc4, "flores": language.flores,
                 "iso639_3": language.iso639_3}
        missing = [name for name, code in codes.items() if code is None and "{" + name + "}" in self.config]
        if missing:
            raise MissingLanguageText(f"{self.dataset} has no {{{missing[0]}}} code for {language.name} ({language.code})")
        return self.config.format(**codes)

    def describe(self, language: Language) -> str:
        if self.kind == "local":
            split = f" split {self.split!r}" if self.split else ""
            return f"local text for {language.code}{split} under {self.path}"
        return f"{self.dataset} config {self.config_for(language)!r} split {self.split or 'train'!r}"

    def identity(self) -> dict:
        """What names this source's content (paths excluded for local files: the caller fingerprints them)."""
        if self.kind == "hub":
            return {"hub": self.dataset, "config": self.config, "revision": self.revision or "main",
                    "split": self.split or "train", "text_field": self.text_field}
        return {"local": True, "split": self.split, "text_field": self.text_field}


def local_documents(source: TextSourceConfig, language: Language) -> list[str]:
    files = find_language_files(Path(source.path), language.code, source.split)
    if not files:
        raise MissingLanguageText(f"no text for {language.code!r} in {source.describe(language)}")
    texts = [t for t in read_texts(files, source.text_field) if t.strip()]
    if not texts:
        raise MissingLanguageText(f"the files of {source.describe(language)} hold no text")
    return texts


def hub_documents(source: TextSourceConfig, language: Language, seed: int | None) -> Iterator[str]:
    from datasets import load_dataset

    name = source.config_for(language)
    try:
        stream = load_dataset(source.dataset, name=name, split=source.split or "train", revision=source.revision,
                              streaming=True)
    except ValueError as err:  # an unknown config (language) or split
        raise MissingLanguageText(f"{source.describe(language)}: {err}") from None
    if seed is not None:
        stream = stream.shuffle(seed=seed % 2**32, buffer_size=HUB_SHUFFLE_BUFFER)
    for row in stream:
        text = row.get(source.text_field)
        if not isinstance(text, str):
            raise MissingLanguageText(f"{source.describe(language)}: rows have no string field {source.text_field!r}")
        if text.strip():
            yield text


def shuffled(documents: Sequence[str], seed: int) -> list[str]:
    """The documents in an order drawn from `seed`: the same on every machine and Python version."""
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    return [documents[i] for i in order]


def documents(source: TextSourceConfig, language: Language, seed: int | None = None) -> Iterator[str]:
    """The language's documents, shuffled by `seed` (None: in stored order)."""
    if source.kind == "local":
        texts = local_documents(source, language)
        yield from (shuffled(texts, seed) if seed is not None else texts)
    else:
        yield from hub_documents(source, language, seed)
