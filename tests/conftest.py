from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
STUDIES = REPO / "sweep" / "studies"

HUB_STUDY = {
    "name": "tiny",
    "models": [
        {"name": "m1", "hub": "org/model-a", "revision": "0123abcd", "dtype": "bfloat16", "gpus": 1},
        {"name": "m2", "hub": "org/model-b", "revision": "4567cdef"},
    ],
    "calibration": {
        "source": {"kind": "hub", "dataset": "allenai/c4", "config": "{mc4}", "split": "train", "revision": "r1"},
        "languages": ["en", "de", "en+de"],
        "samples": 16,
        "seq_len": 256,
        "seeds": [0, 1],
    },
    "pruners": [
        {"method": "wanda", "sparsity": [0.5, "2:4"]},
        {"method": "sparsegpt", "sparsity": 0.5, "params": {"blocksize": 64}},
        {"method": "magnitude", "sparsity": 0.5},
    ],
    "evaluation": {
        "languages": ["en", "de", "sw"],
        "perplexity": {"source": {"kind": "hub", "dataset": "allenai/c4", "config": "{mc4}", "split": "validation",
                                  "revision": "r1"}, "window": 256},
        "tasks": [{"task": "belebele_{flores}", "shots": 0}],
    },
}


@pytest.fixture
def hub_study() -> dict:
    return copy.deepcopy(HUB_STUDY)


def write_study(directory: Path, data: dict | str, name: str = "study.yaml") -> Path:
    path = directory / name
    text = data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    path.write_text(text, encoding="utf-8")
    return path
