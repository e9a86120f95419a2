"""Offline demo assets: a seven-language corpus, a byte-level BPE tokenizer and two small trained
causal LMs (Llama-3-style and Cohere/Aya-23-style), built from files already on the machine.

    from engine.demo import ensure_demo_assets
    assets = ensure_demo_assets()          # cached under $SWEEP_DEMO_DIR or <repo>/.cache/demo

Names resolve lazily (PEP 562) so `python -m engine.demo.build` does not import build.py twice, and
torch/transformers load only when assets must actually be built.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DemoAssets": "engine.demo.build",
    "DemoRecipe": "engine.demo.build",
    "ModelRecipe": "engine.demo.build",
    "TrainRecipe": "engine.demo.build",
    "default_root": "engine.demo.build",
    "ensure_demo_assets": "engine.demo.build",
    "DEMO_LANGUAGES": "engine.demo.corpus",
    "SPLITS": "engine.demo.corpus",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'engine.demo' has no attribute {name!r}")
