"""Validation problems: one line each, `field.path: what is wrong and what is allowed`."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class StudyInvalid(Exception):
    """The study file is invalid; `problems` lists every problem found, `source` names the file."""

    def __init__(self, source: str, problems: list[Problem]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: invalid study file ({len(problems)} problem(s))\n" + "\n".join(map(str, problems)))

    def describe(self) -> str:
        """What a command prints: the file, how many problems, and one indented line per problem."""
        n = len(self.problems)
        head = f"{self.source}: invalid study file ({n} problem{'s' if n != 1 else ''}); nothing was started or written"
        return "\n".join([head, *(f"  {problem}" for problem in self.problems)])


def join_path(*parts: object) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "" or part is None:
            continue
        else:
            out += f".{part}" if out else str(part)
    return out
