"""Offline lm-eval tasks in the shapes of the reference study's benchmarks, built from the demo corpus.

The reference study's tasks (Belebele, XNLI, XStoryCloze) live on the hub; their request shapes are
what decides how fast a scorer is and where its arithmetic could go wrong. These tasks reproduce each
shape with lm-eval's own prompt templates (copied field for field from lm-eval 0.4's YAMLs), filled
with text from the demo corpus:

- `shaped_belebele_<lang>`: a long passage, a question and four answers in the context, and the
  one-token continuations " A" / " B" / " C" / " D" (the context is shared, the answers are one token);
- `shaped_xnli_<lang>`: an empty context and three continuations "premise, right? Yes/Also/No,
  hypothesis" (nothing shared by context; the premise is shared by the continuations' start);
- `shaped_xstorycloze_<lang>`: four sentences as the context and two multi-token endings.

The text is not a benchmark (the answers are random): these tasks test and time scoring, not models.

    from engine.demo.shaped_tasks import write_shaped_tasks, SHAPES
    include = write_shaped_tasks(assets, folder, languages=("en", "de"), docs=20)
"""
from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from engine.demo.tasks import read_rows

SHAPES = ("belebele", "xnli", "xstorycloze")
SPLIT = "tasks"

_ACC = {"metric": "acc", "aggregation": "mean", "higher_is_better": True}
_ACC_NORM = {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}

# lm-eval 0.4's templates: belebele/_default_template_yaml, xnli/xnli_en.yaml, xstorycloze/default_en.yaml.
TEMPLATES = {
    "belebele": {
        "output_type": "multiple_choice",
        "doc_to_text": "P: {{flores_passage}}\nQ: {{question.strip()}}\nA: {{mc_answer1}}\nB: {{mc_answer2}}\n"
                       "C: {{mc_answer3}}\nD: {{mc_answer4}}\nAnswer:",
        "doc_to_choice": ["A", "B", "C", "D"],
        "doc_to_target": "{{['1', '2', '3', '4'].index(correct_answer_num)}}",
        "metric_list": [_ACC, _ACC_NORM],
    },
    "xnli": {
        "output_type": "multiple_choice",
        "doc_to_text": "",
        "doc_to_choice": '{{[premise+", right? Yes, "+hypothesis,premise+", right? Also, "+hypothesis,'
                         'premise+", right? No, "+hypothesis]}}',
        "doc_to_target": "label",
        "metric_list": [_ACC],
    },
    "xstorycloze": {
        "output_type": "multiple_choice",
        "doc_to_text": "{{[input_sentence_1, input_sentence_2, input_sentence_3, input_sentence_4]|join(' ')}}",
        "doc_to_choice": "{{[sentence_quiz1, sentence_quiz2]}}",
        "doc_to_target": "{{answer_right_ending-1}}",
        "metric_list": [_ACC],
    },
}


def task_name(shape: str, lang: str) -> str:
    return f"shaped_{shape}_{lang}"


def _pieces(text: str, n: int, size: int) -> list[str]:
    """`n` consecutive pieces of about `size` characters, cut at spaces where there are any."""
    out, rest = [], text.strip()
    for _ in range(n):
        cut = rest.rfind(" ", 0, size) if " " in rest[:size] else size
        cut = cut if cut > 0 else size
        piece, rest = rest[:cut].strip(), rest[cut:].strip()
        if not piece:
            break
        out.append(piece)
    return out


def _docs(shape: str, texts: list[str], docs: int, rng: random.Random) -> list[dict]:
    """Each document from its own pair of paragraphs (the first len(texts) documents start with each
    paragraph in turn), so no two documents are the same even past the corpus' paragraph count."""
    out = []
    used: set[tuple[int, int]] = set()
    for i in range(docs):
        first, second = i % len(texts), (i * 7 + 3) % len(texts)
        while (first, second) in used or first == second:
            first, second = rng.randrange(len(texts)), rng.randrange(len(texts))
        used.add((first, second))
        text, other = texts[first], texts[second]
        if shape == "belebele":
            answers = [_pieces(texts[(i + k * 5 + 1) % len(texts)], 1, 40)[0] for k in range(4)]
            out.append({"flores_passage": " ".join(_pieces(text + " " + other, 1, 900)), "question":
                        _pieces(other, 1, 80)[0] + "?", **{f"mc_answer{k + 1}": a for k, a in enumerate(answers)},
                        "correct_answer_num": str(rng.randrange(1, 5))})
        elif shape == "xnli":
            out.append({"premise": _pieces(text, 1, 160)[0], "hypothesis": _pieces(other, 1, 80)[0],
                        "label": rng.randrange(3)})
        else:
            sentences = _pieces(text + " " + other, 4, 90)
            endings = [_pieces(texts[(i + k * 11 + 2) % len(texts)], 1, 70)[0] for k in range(2)]
            out.append({**{f"input_sentence_{k + 1}": s for k, s in enumerate(sentences)},
                        "sentence_quiz1": endings[0], "sentence_quiz2": endings[1],
                        "answer_right_ending": rng.randrange(1, 3)})
    return out


def write_shaped_tasks(assets, folder: Path, languages: Sequence[str] = ("en",), docs: int = 20,
                       shapes: Sequence[str] = SHAPES, seed: int = 0) -> Path:
    """Writes one task per (shape, language) under `folder` (an lm-eval include path) and returns it."""
    folder = Path(folder)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for shape in shapes:
        if shape not in TEMPLATES:
            raise ValueError(f"unknown task shape {shape!r}; expected one of {', '.join(SHAPES)}")
        for lang in languages:
            rng = random.Random(f"shaped:{seed}:{shape}:{lang}")
            texts = [row["text"] for row in read_rows(assets.split_path(lang, SPLIT)) if len(row["text"]) > 200]
            if len(texts) < 12:
                raise ValueError(f"{assets.split_path(lang, SPLIT)}: too few paragraphs over 200 characters "
                                 f"({len(texts)}) to build {task_name(shape, lang)}")
            data = folder / "data" / f"{shape}_{lang}.jsonl"
            data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in _docs(shape, texts, docs, rng)),
                            encoding="utf-8")
            config = {"task": task_name(shape, lang), "dataset_path": "json",
                      "dataset_kwargs": {"data_files": {"test": str(data.resolve())}}, "test_split": "test",
                      **TEMPLATES[shape], "metadata": {"version": 1}}
            (folder / f"{task_name(shape, lang)}.yaml").write_text(json.dumps(config, ensure_ascii=False, indent=1),
                                                                    encoding="utf-8")
    return folder
