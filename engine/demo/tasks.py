"""Offline multilingual lm-eval tasks built from the demo corpus' `tasks` split.

`demo_continuation_<lang>`: pick the true continuation of a paragraph among four. Each document is one
paragraph of `corpus/<lang>/tasks.jsonl` (trimmed to MAX_CHARS) cut near its middle (at a word boundary; at a character for
scripts written without spaces, e.g. zh) into a context and its true continuation, plus three
distractor continuations: the second halves of other paragraphs of the same language. The correct
index is drawn by a seeded RNG, so everything is deterministic from (corpus, seed, GENERATOR_VERSION).

    from engine.demo import ensure_demo_assets
    from engine.demo.tasks import ensure_demo_tasks
    include = ensure_demo_tasks(ensure_demo_assets())    # <assets.root>/lm_eval_tasks
    # lm_eval ... --include_path <include> --tasks demo_continuation_en   (or the group demo_continuation)

Layout of the include directory (YAML data paths are absolute: it is generated on each machine):

    demo_continuation_<lang>.yaml    one multiple_choice task per language
    _demo_continuation.yaml          the group over all languages (acc, acc_norm weighted by size)
    data/<lang>.jsonl                {"id", "source_id", "context", "choices", "label"} per line
    stamp.json                       what the directory was generated from (decides staleness)
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from engine.languages import LANGUAGES

# Bump when the generator changes what it writes for the same inputs.
GENERATOR_VERSION = 3
TASK_PREFIX = "demo_continuation"
GROUP = TASK_PREFIX
INCLUDE_DIRNAME = "lm_eval_tasks"
STAMP = "stamp.json"
SPLIT = "tasks"
N_CHOICES = 4
MIN_CHARS = 80
# Longer paragraphs are first trimmed to at most this many characters (at a word boundary, or a
# character for CHARACTER_SCRIPTS): keeps every request short, so evaluating a model stays cheap.
MAX_CHARS = 400
# Scripts written without spaces between words: cut at a character, join with no delimiter.
CHARACTER_SCRIPTS = frozenset({"Hans", "Hant", "Hani", "Jpan", "Thai", "Khmr", "Laoo", "Mymr", "Tibt"})


def task_name(lang: str) -> str:
    return f"{TASK_PREFIX}_{lang}"


def cuts_by_character(lang: str) -> bool:
    language = LANGUAGES.get(lang)
    return language is not None and language.script in CHARACTER_SCRIPTS


def trim(text: str, by_character: bool, max_chars: int = MAX_CHARS) -> str:
    """`text` cut to at most `max_chars` characters: at the last whitespace that fits (word mode), or
    at `max_chars` (character mode)."""
    if len(text) <= max_chars:
        return text
    if by_character:
        return text[:max_chars]
    cut = max((i for i, ch in enumerate(text[: max_chars + 1]) if ch.isspace()), default=None)
    return text[:cut].rstrip() if cut else text[:max_chars]


def split_paragraph(text: str, by_character: bool) -> tuple[str, str] | None:
    """(context, continuation) cut near the middle of `text`, or None if it is too short to cut.

    Word mode cuts at the whitespace run nearest the middle and drops it (lm-eval puts the task's
    target delimiter, a space, back between them); character mode cuts at the middle character.
    """
    text = trim(text.strip(), by_character)
    if len(text) < MIN_CHARS:
        return None
    middle = len(text) // 2
    if by_character:
        return text[:middle], text[middle:]
    spaces = [i for i, ch in enumerate(text) if ch.isspace()]
    if not spaces:
        return None
    cut = min(spaces, key=lambda i: (abs(i - middle), i))
    context, continuation = text[:cut].rstrip(), text[cut:].lstrip()
    if not context or not continuation:
        return None
    return context, continuation


def build_language_docs(rows: Sequence[Mapping], lang: str, seed: int) -> list[dict]:
    """The task's documents for one language, in corpus order (deterministic from rows and seed)."""
    by_character = cuts_by_character(lang)
    cut: list[tuple[Mapping, str, str]] = []
    seen: set[str] = set()
    for row in rows:
        pair = split_paragraph(row["text"], by_character)
        if pair is None or row["text"].strip() in seen:
            continue
        seen.add(row["text"].strip())
        cut.append((row, *pair))
    if len(cut) < N_CHOICES:
        return []
    rng = random.Random(f"{TASK_PREFIX}:{GENERATOR_VERSION}:{seed}:{lang}")
    docs = []
    for index, (row, context, continuation) in enumerate(cut):
        # Distractors from the same source and of similar length, then every choice cut to the
        # shortest: lm-eval's `acc` sums log-likelihoods, so a difference in length or in style (a
        # technical handbook against general prose) alone would give the answer away, or hide it.
        others = sorted((j for j in range(len(cut)) if j != index and cut[j][2] != continuation),
                        key=lambda j: (cut[j][0].get("source") != row.get("source"),
                                       abs(len(cut[j][2]) - len(continuation)), j))
        pool = others[: 4 * (N_CHOICES - 1)]
        picked = [cut[j][2] for j in rng.sample(pool, min(len(pool), N_CHOICES - 1))]
        shortest = min(len(c) for c in [continuation, *picked])
        continuation = trim(continuation, by_character, shortest)
        distractors: list[str] = []
        for candidate in (trim(c, by_character, shortest) for c in picked):
            if candidate and candidate != continuation and candidate not in distractors:
                distractors.append(candidate)
        if len(distractors) < N_CHOICES - 1 or not continuation:
            continue
        label = rng.randrange(N_CHOICES)
        choices = distractors[:label] + [continuation] + distractors[label:]
        docs.append({
            "id": f"{lang}/{index}",
            "source_id": row.get("id", str(index)),
            "context": context,
            "choices": choices,
            "label": label,
        })
    return docs


def read_rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def task_yaml(lang: str, data_file: Path) -> str:
    """One language's task config (JSON is valid YAML; it keeps quoting of paths and '' exact)."""
    config = {
        "task": task_name(lang),
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "fewshot_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "context",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": "" if cuts_by_character(lang) else " ",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1},
    }
    return _as_yaml(config)


def group_yaml(languages: Sequence[str]) -> str:
    config = {
        "group": GROUP,
        "task": [task_name(lang) for lang in languages],
        "aggregate_metric_list": [
            {"metric": "acc", "aggregation": "mean", "weight_by_size": True},
            {"metric": "acc_norm", "aggregation": "mean", "weight_by_size": True},
        ],
        "metadata": {"version": 1},
    }
    return _as_yaml(config)


def _as_yaml(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False, allow_unicode=True, default_flow_style=False)


def inputs_hash(assets, languages: Sequence[str], seed: int, include_dir: Path) -> str:
    """Content hash of everything the directory is generated from (its own path included: the YAMLs
    hold absolute data paths)."""
    digest = hashlib.sha256()
    header = {"generator_version": GENERATOR_VERSION, "seed": seed, "languages": list(languages),
              "include_dir": str(include_dir), "min_chars": MIN_CHARS, "max_chars": MAX_CHARS, "n_choices": N_CHOICES}
    digest.update(json.dumps(header, sort_keys=True).encode())
    for lang in languages:
        digest.update(f"\0{lang}\0".encode())
        digest.update(assets.split_path(lang, SPLIT).read_bytes())
    return digest.hexdigest()[:24]


def _read_stamp(include_dir: Path) -> dict | None:
    try:
        return json.loads((include_dir / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_tasks(target: Path, final_dir: Path, docs_by_language: Mapping[str, list[dict]], stamp: dict) -> None:
    """Writes the include directory's files into `target`, with data paths pointing into `final_dir`."""
    (target / "data").mkdir(parents=True)
    for lang, docs in docs_by_language.items():
        data_name = Path("data") / f"{lang}.jsonl"
        with open(target / data_name, "w", encoding="utf-8", newline="\n") as handle:
            for doc in docs:
                handle.write(json.dumps(doc, ensure_ascii=False, sort_keys=True) + "\n")
        (target / f"{task_name(lang)}.yaml").write_text(task_yaml(lang, final_dir / data_name), encoding="utf-8")
    (target / f"_{GROUP}.yaml").write_text(group_yaml(list(docs_by_language)), encoding="utf-8")
    (target / STAMP).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def ensure_demo_tasks(assets, seed: int = 0) -> Path:
    """The lm-eval include directory `<assets.root>/lm_eval_tasks`, (re)generated only when missing or
    stale, atomically (built in a sibling temp directory, then renamed into place)."""
    include_dir = Path(assets.root).resolve() / INCLUDE_DIRNAME
    languages = tuple(assets.languages)
    wanted = inputs_hash(assets, languages, seed, include_dir)
    stamp = _read_stamp(include_dir)
    if stamp is not None and stamp.get("inputs_hash") == wanted:
        return include_dir

    docs_by_language = {}
    for lang in languages:
        docs = build_language_docs(read_rows(assets.split_path(lang, SPLIT)), lang, seed)
        if not docs:
            raise ValueError(f"demo corpus has too few paragraphs of >= {MIN_CHARS} characters in "
                             f"{assets.split_path(lang, SPLIT)} to build {task_name(lang)}")
        docs_by_language[lang] = docs
    new_stamp = {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "inputs_hash": wanted,
        "tasks": {task_name(lang): len(docs) for lang, docs in docs_by_language.items()},
        "group": GROUP,
    }

    include_dir.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    building = include_dir.with_name(f".{INCLUDE_DIRNAME}.build-{token}")
    retired = include_dir.with_name(f".{INCLUDE_DIRNAME}.old-{token}")
    try:
        write_tasks(building, include_dir, docs_by_language, new_stamp)
        if include_dir.exists():
            os.replace(include_dir, retired)
        try:
            os.replace(building, include_dir)
        except OSError:
            # Another process put a directory in place between our two renames; keep it if it is current.
            current = _read_stamp(include_dir)
            if current is None or current.get("inputs_hash") != wanted:
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
        shutil.rmtree(retired, ignore_errors=True)
    return include_dir
