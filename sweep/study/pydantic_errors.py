"""Turns pydantic's errors into `Problem`s that name the study-file field and say what is allowed."""
from __future__ import annotations

import difflib
import re
import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

from sweep.study.problems import Problem, join_path

# Loc entries pydantic adds for union members ("str", "MixSpec", "list[...]"): not study-file fields.
_UNION_TAG = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|union\[.*\]|[A-Z]\w*|[a-z]+(?:-[a-z]+)+(?:\[.*\])?)$")

# What a field accepts, for fields whose type is a union (pydantic reports one error per member).
# Keyed by the field path without list indices.
_ALLOWED_FORMS = {
    "calibration.languages": "a language code such as 'en', a mix such as 'en+de', or {mix: {en: 0.75, de: 0.25}}",
    "pruners.sparsity": "a fraction in (0, 1) such as 0.5, an N:M pattern such as '2:4', or a list of these",
    "evaluation.tasks.limit": "a number of documents (integer) or a fraction of the task",
}


def problems_from_validation_error(err: ValidationError, root_model: type[BaseModel], given: Any) -> list[Problem]:
    grouped: dict[tuple, list[dict]] = {}
    for item in err.errors(include_url=False):
        grouped.setdefault(_field_loc(item["loc"], given), []).append(item)
    # A union field fails as a whole and in its members ([True] as a value and as a list): keep the deepest.
    deepest = {loc: items for loc, items in grouped.items()
               if not any(other[:len(loc)] == loc and len(other) > len(loc) for other in grouped)}
    problems = []
    for loc, items in deepest.items():
        problems.append(Problem(join_path(*loc), _message(loc, items, root_model, given)))
    return problems


def _field_loc(loc: tuple, given: Any) -> tuple:
    """`loc` without the union members' tags. A part that looks like a tag is still a field when the input
    has it as a key there: `Execution:` or `output-dir:` typed in a study are reported as themselves."""
    out = []
    current = given
    for part in loc:
        is_key = isinstance(current, dict) and part in current
        if isinstance(part, str) and _UNION_TAG.match(part) and not is_key:
            continue
        out.append(part)
        current = _value_at(current, (part,))
    return tuple(out)


def _message(loc: tuple, items: list[dict], root_model: type[BaseModel], given: Any) -> str:
    kinds = {i["type"] for i in items}
    field_path = ".".join(p for p in loc if isinstance(p, str))
    if "extra_forbidden" in kinds and loc:
        allowed = _allowed_keys(root_model, loc[:-1])
        near = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        return f"unknown key{hint}; allowed here: {', '.join(allowed)}"
    if "missing" in kinds:
        return "is required but missing"
    if kinds & {"too_short"} and len(items) == 1:
        return "is empty; list at least one value (an empty axis gives no trials)"
    value = _value_at(given, loc)
    if len(items) > 1 or field_path in _ALLOWED_FORMS and any(k.endswith("_type") for k in kinds):
        form = _ALLOWED_FORMS.get(field_path, "")
        if form:
            return f"{_show(value)} is not allowed; expected {form}"
        return f"{_show(value)} is not allowed: " + "; or ".join(sorted({_clean(i['msg']) for i in items}))
    item = items[0]
    msg = _clean(item["msg"])
    if item["type"].endswith("_type") or item["type"] in ("literal_error", "bool_parsing"):
        hint = ""
        if item["type"] == "string_type" and isinstance(value, bool):
            hint = " (YAML reads yes/no/on/off/true/false as booleans: quote it)"
        return f"{_show(value)}: {msg[0].lower() + msg[1:]}{hint}"
    if item["type"].startswith(("greater", "less")):
        return f"{_show(value)}: {msg[0].lower() + msg[1:]}"
    return msg


def _clean(msg: str) -> str:
    return re.sub(r"^(Value error|Assertion failed), ", "", msg)


def _show(value: Any) -> str:
    if value is _MISSING:
        return "this value"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_MISSING = object()


def _value_at(given: Any, loc: tuple) -> Any:
    current = given
    for part in loc:
        try:
            current = current[part]
        except (KeyError, IndexError, TypeError):
            return _MISSING
    return current


def _allowed_keys(root_model: type[BaseModel], loc: tuple) -> list[str]:
    model = _model_at(root_model, loc)
    return list(model.model_fields) if model is not None else []


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    annotation: Any = model
    for part in loc:
        annotation = _unwrap(annotation, part)
        if annotation is None:
            return None
    return _as_model(annotation)


def _unwrap(annotation: Any, part: Any) -> Any:
    model = _as_model(annotation)
    if model is not None and isinstance(part, str):
        field = model.model_fields.get(part)
        return field.annotation if field is not None else None
    for candidate in _members(annotation):
        origin = typing.get_origin(candidate)
        if isinstance(part, int) and origin is list:
            return typing.get_args(candidate)[0]
        if isinstance(part, str) and origin is dict:
            return typing.get_args(candidate)[1]
    return None


def _members(annotation: Any) -> list[Any]:
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        out = []
        for arg in typing.get_args(annotation):
            out.extend(_members(arg))
        return out
    return [annotation]


def _as_model(annotation: Any) -> type[BaseModel] | None:
    for candidate in _members(annotation):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None
