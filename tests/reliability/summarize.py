"""Turns the figures tests/reliability/test_faults.py records (SWEEP_RELIABILITY_REPORT=FILE) into the
Markdown table of reports/reliability.md.

    python -m tests.reliability.summarize FILE
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict


def summarize(lines: list[dict]) -> str:
    by_kind: dict[str, dict] = defaultdict(lambda: {"runs": 0, "faults": 0, "completed": 0, "lost": 0,
                                                    "duplicates": 0, "attempts": 0, "trials": 0})
    for line in lines:
        row = by_kind[line["kind"]]
        row["runs"] += 1
        row["faults"] += int(line.get("faults", 0))
        row["completed"] += int(bool(line.get("completed")))
        row["lost"] += int(line.get("lost", 0))
        row["duplicates"] += int(line.get("duplicates", 0))
        row["attempts"] += int(line.get("attempts", 0))
        row["trials"] += int(line.get("trials", 0))
    out = ["| fault (random timing) | faults injected | studies completed | results lost | duplicates | attempts per trial |",
           "|---|---:|---:|---:|---:|---:|"]
    for kind, row in by_kind.items():
        per_trial = f"{row['attempts'] / row['trials']:.2f}" if row["trials"] else "-"
        out.append(f"| {kind} | {row['faults']} | {row['completed']}/{row['runs']} | {row['lost']} | "
                   f"{row['duplicates']} | {per_trial} |")
    return "\n".join(out)


def main(path: str) -> None:
    with open(path, encoding="utf-8") as handle:
        print(summarize([json.loads(line) for line in handle if line.strip()]))


if __name__ == "__main__":
    main(sys.argv[1])
