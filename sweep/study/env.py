"""Environment defaults that study files may refer to as ${NAME}."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from engine.demo.build import default_corpus_root
from engine.demo.build import default_root as default_demo_root
from engine.io import PROJECT_ROOT
from engine.pretrained.build import default_root as default_models_root

REPO_ROOT = PROJECT_ROOT


def default_demo_dir() -> Path:
    return default_demo_root()


def apply_default_env() -> None:
    """Where the offline assets live, for study files to name: SWEEP_DEMO_DIR (the tiny demo models and
    their corpus, default <repo>/.cache/demo), SWEEP_CORPUS_DIR (the corpus alone, .cache/corpus) and
    SWEEP_MODELS_DIR (real pretrained models, .cache/models)."""
    os.environ.setdefault("SWEEP_DEMO_DIR", str(default_demo_dir()))
    os.environ.setdefault("SWEEP_CORPUS_DIR", str(default_corpus_root()))
    os.environ.setdefault("SWEEP_MODELS_DIR", str(default_models_root()))


def quiet_libraries() -> None:
    """One line per trial instead of datasets' and transformers' progress bars and notices."""

    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    for name in ("lm_eval", "lm-eval", "transformers", "datasets", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
