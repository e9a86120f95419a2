"""docs/study-files.md's key reference is what the schema says, field for field."""
from __future__ import annotations

from pydantic import Field

from sweep.study.reference import DOC, END, START, reference, replace_block, sections
from sweep.study.schema import StudySpec


def test_the_committed_reference_is_the_generated_one():
    document = DOC.read_text(encoding="utf-8")
    assert replace_block(document, reference()) == document, (
        "docs/study-files.md is out of date with sweep/study/schema.py: run `python -m sweep.study.reference --write`")


def test_every_key_of_every_section_is_described():
    text = reference()
    paths = [path for path, _ in sections()]
    assert paths[0] == "" and {"models[]", "calibration.source", "evaluation.perplexity.source",
                               "evaluation.tasks[]", "analyses.masks", "execution"} <= set(paths)
    for _, model in sections():
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            assert f"| `{name}` |" in text


def test_a_field_added_to_the_schema_makes_the_committed_reference_stale():
    class Grown(StudySpec):
        colour: str = Field("blue", description="a new key")

    grown = reference(Grown)
    assert '| `colour` | string | `"blue"` |  | a new key |' in grown
    document = DOC.read_text(encoding="utf-8")
    assert replace_block(document, grown) != document
    rows = [line for line in reference().splitlines() if line.startswith("| `")]
    assert len(rows) == sum(len(m.model_fields) for _, m in sections())
    assert reference().startswith(START) and reference().rstrip().endswith(END)
