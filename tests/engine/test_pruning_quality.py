"""Pruning the trained demo model with real calibration text (slow: needs the demo assets)."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.data.calibration import WindowRequest, language_seed, pack_windows
from engine.data.sources import shuffled
from engine.evaluate.suite import perplexity_by_language
from engine.prune.pruners import make_pruner
from engine.prune.sequential import prune_sequentially
from engine.prune.sparsity import parse_sparsity
from engine.snapshot import DenseSnapshot

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo():
    from engine.demo import ensure_demo_assets

    assets = ensure_demo_assets(log=print)
    path = assets.model_dirs["demo-llama"]
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return assets, model, tokenizer, DenseSnapshot(model)


def texts(assets, lang, split):
    lines = assets.split_path(lang, split).read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines if line.strip()]


def windows(assets, tokenizer, lang, samples=32, seq_len=128, seed=0):
    encode = lambda t: tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"]  # noqa: E731
    return pack_windows(shuffled(texts(assets, lang, "calibration"), language_seed(seed, lang)), encode,
                        tokenizer.eos_token_id, WindowRequest(samples, seq_len, seed), what=f"{lang} calibration")


def test_quality_orders_sparsegpt_wanda_magnitude(demo):
    """Layer-wise reconstruction error orders SparseGPT <= Wanda <= magnitude, and SparseGPT gives the
    lowest held-out bits per byte in the calibration language. (Wanda does not beat magnitude in
    perplexity on this tiny, briefly trained model: it lacks the outlier features that make Wanda win
    on real LLMs; see reports/benchmarks.md.)"""
    assets, model, tokenizer, snapshot = demo
    calibration = windows(assets, tokenizer, "en")
    evaluation = {"en": texts(assets, "en", "evaluation")}
    errors, bpb = {}, {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        snapshot.restore()
        report = prune_sequentially(model, make_pruner(method), parse_sparsity(0.5), calibration, measure_error=True)
        errors[method] = sum(r.relative_error for r in report.layers) / len(report.layers)
        bpb[method] = perplexity_by_language(model, tokenizer, evaluation, window=128)["en"].bits_per_byte
    snapshot.restore()
    print("mean relative layer error", errors, "bits per byte (en)", bpb)
    assert errors["sparsegpt"] <= errors["wanda"] <= errors["magnitude"]
    assert bpb["sparsegpt"] < min(bpb["wanda"], bpb["magnitude"])


def test_target_language_calibration_helps_that_language(demo):
    """The study's question in miniature: Wanda calibrated on Swahili keeps Swahili better than Wanda
    calibrated on English does."""
    assets, model, tokenizer, snapshot = demo
    evaluation = {"sw": texts(assets, "sw", "evaluation"), "en": texts(assets, "en", "evaluation")}
    result = {}
    for lang in ("en", "sw"):
        snapshot.restore()
        prune_sequentially(model, make_pruner("wanda"), parse_sparsity(0.5), windows(assets, tokenizer, lang))
        result[lang] = {k: v.bits_per_byte for k, v in perplexity_by_language(model, tokenizer, evaluation, 128).items()}
    snapshot.restore()
    print("bits per byte by calibration language", result)
    assert result["sw"]["sw"] < result["en"]["sw"]
    assert result["en"]["en"] < result["sw"]["en"]


def test_calibration_language_changes_the_masks(demo):
    assets, model, tokenizer, snapshot = demo
    masks = {}
    for lang in ("en", "zh"):
        snapshot.restore()
        masks[lang] = prune_sequentially(model, make_pruner("wanda"), parse_sparsity(0.5),
                                         windows(assets, tokenizer, lang), keep_masks=True).masks
    snapshot.restore()
    differing = [name for name in masks["en"] if not torch.equal(masks["en"][name], masks["zh"][name])]
    assert len(differing) == len(masks["en"])  # every matrix's mask moves with the calibration language
    overlap = [float((masks["en"][n] & masks["zh"][n]).sum() / (masks["en"][n] | masks["zh"][n]).sum()) for n in masks["en"]]
    assert 0.3 < min(overlap) and max(overlap) < 1.0
