"""Pruning the real Gemma 3 270M (slow: built from the package index) on the offline corpus.

On a real pretrained LLM, the published ordering must hold: calibrated one-shot pruning (Wanda,
SparseGPT) keeps the model far better than magnitude pruning, in every language, and nothing beats the
dense model. A driver that fed blocks the wrong masks or rotary embeddings, wrong statistics or a broken
mask builder would lose that.
"""
from __future__ import annotations

import pytest

from engine.data.calibration import WindowRequest, calibration_set
from engine.data.sources import TextSourceConfig
from engine.demo.corpus import read_split
from engine.evaluate.suite import perplexity_by_language
from engine.prune.pruners import make_pruner
from engine.prune.sequential import prune_sequentially
from engine.prune.sparsity import parse_sparsity
from engine.snapshot import DenseSnapshot

pytestmark = pytest.mark.slow

LANGUAGES = ("ar", "de", "en", "es", "ru", "sw", "zh")
CALIBRATION_LANGUAGE = "en"


@pytest.fixture(scope="module")
def corpus():
    from engine.demo.build import ensure_corpus

    return ensure_corpus(log=lambda _line: None)


def test_wanda_and_sparsegpt_beat_magnitude_in_every_language_and_dense_beats_all(gemma3_270m, corpus, tmp_path):
    model, tokenizer = gemma3_270m
    snapshot = DenseSnapshot(model)
    source = TextSourceConfig(kind="local", path=corpus.corpus_dir, split="calibration")
    windows = calibration_set(source, tokenizer, ((CALIBRATION_LANGUAGE, 1.0),), WindowRequest(8, 128, 0), tmp_path)
    texts = {lang: read_split(corpus.corpus_dir, lang, "evaluation") for lang in LANGUAGES}

    def bits_per_byte() -> dict[str, float]:
        results = perplexity_by_language(model, tokenizer, texts, window=128, max_tokens=127, batch_size=4)
        return {lang: result.bits_per_byte for lang, result in results.items()}

    measured = {"dense": bits_per_byte()}
    try:
        for method in ("magnitude", "wanda", "sparsegpt"):
            prune_sequentially(model, make_pruner(method), parse_sparsity(0.5), None if method == "magnitude" else windows)
            measured[method] = bits_per_byte()
            snapshot.restore()
    finally:
        snapshot.restore()
    print("\nbits per byte, Gemma 3 270M, 50% unstructured, calibrated on en:")
    for method, values in measured.items():
        print(f"  {method:>10} " + " ".join(f"{lang} {value:.3f}" for lang, value in values.items()))
    for lang in LANGUAGES:
        assert measured["wanda"][lang] < measured["magnitude"][lang], lang
        assert measured["sparsegpt"][lang] < measured["magnitude"][lang], lang
        assert measured["dense"][lang] < min(measured[m][lang] for m in ("magnitude", "wanda", "sparsegpt")), lang
