"""Checks that need the models' tokenizers, run before any trial starts: is there enough calibration text?

A local source holds a fixed amount of text (for `sampling: published`, a number of documents longer
than seq_len); a mix's language gets only its share of the samples, and
each tokenizer splits text differently. Counting stops as soon as a language has what the study needs,
so a large corpus is not read in full. Hub sources (mC4: billions of tokens) are not counted.
"""
from __future__ import annotations

from engine.data.calibration import split_budget
from engine.data.sources import documents
from engine.languages import get_language
from sweep.study.load import Study
from sweep.study.problems import Problem, StudyInvalid
from sweep.study.trials import text_source


def needed_tokens(study: Study) -> dict[str, int]:
    """Per language, the most calibration tokens any one trial asks of it."""
    cal = study.spec.calibration
    needed: dict[str, int] = {}
    for mix in study.calibration_mixes:
        for code, count in split_budget(mix.weights, cal.samples).items():
            needed[code] = max(needed.get(code, 0), count * cal.seq_len)
    return needed


def check_calibration_text(study: Study, tokenizers: dict[str, object]) -> None:
    """Raises StudyInvalid naming each language (and tokenizer) whose local text is too short.
    `tokenizers` maps a model label to its tokenizer; models sharing a tokenizer may share an entry."""
    cal = study.spec.calibration
    if cal.source.kind != "local":
        return
    source = text_source(study, cal.source)
    problems = []
    counted: dict[tuple[int, str], int] = {}
    published = cal.sampling == "published"
    for label, tokenizer in tokenizers.items():
        for code, need in needed_tokens(study).items():
            cache_key = (id(tokenizer), code)
            if published:  # one document longer than seq_len per sample, not a number of tokens
                need //= cal.seq_len
            if cache_key not in counted:
                total = 0
                for text in documents(source, get_language(code), seed=None):
                    length = len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
                    total += int(length > cal.seq_len) if published else length + 1
                    if total >= need:
                        break
                counted[cache_key] = total
            have = counted[cache_key]
            if have < need and published:
                where = f"calibration.languages ({code})"
                problems.append(Problem(where, f"{source.describe(get_language(code))} holds {have} documents "
                                               f"longer than {cal.seq_len} tokens for {label}'s tokenizer; "
                                               f"`sampling: published` takes each of {need} windows of {code} "
                                               f"from its own. Lower seq_len, add longer documents, or use "
                                               f"`sampling: packed`."))
            elif have < need:
                where = f"calibration.languages ({code})"
                problems.append(Problem(where, f"{source.describe(get_language(code))} holds {have} tokens for "
                                               f"{label}'s tokenizer; {cal.samples} samples x {cal.seq_len} tokens "
                                               f"need {need} of {code}. Lower samples or seq_len, or add text."))
    if problems:
        raise StudyInvalid(study.source, problems)
