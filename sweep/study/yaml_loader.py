"""Safe, strict YAML for study files.

Plain `yaml.safe_load` has traps for this domain: YAML 1.1 reads `2:4` as the base-60 integer 124 and
`no` (Norwegian) as False, silently keeps the last of two duplicated keys, and lets a small file expand
into a huge structure through aliases. This loader uses YAML 1.2 core scalars, rejects duplicate keys,
and bounds size, depth and node count. It never constructs Python objects (SafeLoader underneath).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

MAX_FILE_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_NODES = 200_000


class StudyFileError(Exception):
    """A study file that cannot be read as YAML at all; `where` names the file (and line)."""

    def __init__(self, where: str, message: str):
        self.where = where
        self.message = message
        super().__init__(f"{where}: {message}")


class _StrictLoader(yaml.SafeLoader):
    pass


# YAML 1.2 core schema resolvers, replacing YAML 1.1's (sexagesimal ints, yes/no/on/off booleans).
_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (
        "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:timestamp")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _construct_int(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    text = loader.construct_scalar(node)
    try:
        return int(text)  # base 10 only: 010 is ten, as in YAML 1.2
    except ValueError:  # longer than Python converts (4300 digits)
        raise yaml.constructor.ConstructorError(
            None, None, f"an integer of {len(text)} digits is too long", node.start_mark) from None


def _construct_float(loader: yaml.SafeLoader, node: yaml.Node) -> float:
    return float(str(loader.construct_scalar(node)).lower().replace(".inf", "inf").replace(".nan", "nan"))


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    loader.flatten_mapping(node)
    mapping: dict = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping key must be a plain value", key_node.start_mark) from None
        if key in mapping:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (the first one would be silently ignored)", key_node.start_mark)
        mapping[key] = loader.construct_object(value_node, deep=True)
    return mapping


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_StrictLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)
_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml_text(text: str, where: str) -> Any:
    if len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        raise StudyFileError(where, f"file is larger than {MAX_FILE_BYTES // 1024} KiB; a study file is a short description, not data")
    try:
        # Compose first: the node graph shows depth and alias fan-out before anything is built.
        loader = _StrictLoader(text)
        try:
            root = loader.get_single_node()
            if root is None:
                return None
            _check_shape(root, where)
            return loader.construct_document(root)
        finally:
            loader.dispose()
    except StudyFileError:
        raise
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = " ".join(p for p in (err.context, err.problem) if p)
        raise StudyFileError(f"{where}{line}", f"malformed YAML: {problem}") from None
    except yaml.YAMLError as err:
        raise StudyFileError(where, f"malformed YAML: {err}") from None
    except RecursionError:
        raise StudyFileError(where, f"nesting is deeper than the parser can follow (limit {MAX_DEPTH} levels)") from None


def load_yaml_file(path: Path) -> Any:
    where = str(path)
    if not path.exists():
        raise StudyFileError(where, "no such file")
    if not path.is_file():
        raise StudyFileError(where, "not a file")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise StudyFileError(where, f"file is {size} bytes, over the {MAX_FILE_BYTES // 1024} KiB limit for a study file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise StudyFileError(where, f"not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise StudyFileError(where, f"cannot be read: {err.strerror}") from None
    return load_yaml_text(text, where)


def _check_shape(root: yaml.Node, where: str) -> None:
    """Counts nodes as they would be expanded (aliases included) and the nesting depth, bailing out early."""
    count = 0
    stack: list[tuple[yaml.Node, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise StudyFileError(where, f"the document expands to more than {MAX_NODES} values (aliases included)")
        if depth > MAX_DEPTH:
            line = node.start_mark.line + 1
            raise StudyFileError(f"{where}:{line}", f"nesting deeper than {MAX_DEPTH} levels")
        if isinstance(node, yaml.SequenceNode):
            stack.extend((child, depth + 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                stack.append((key, depth + 1))
                stack.append((value, depth + 1))
