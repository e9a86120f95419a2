"""The offline demo assets: corpus splits, determinism, caching, tokenizer, metadata, model reloads.

The fast tests build `DemoRecipe.tiny()` (seconds) into temporary directories; the slow test builds
the full default assets into the default root, so a later `make demo` reuses them.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.demo import DEMO_LANGUAGES, SPLITS, DemoAssets, DemoRecipe, ensure_demo_assets
from engine.demo import build as build_mod
from engine.demo.corpus import build_corpus

quiet = lambda _msg: None  # noqa: E731


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> DemoAssets:
    return ensure_demo_assets(tmp_path_factory.mktemp("tiny") / "demo", DemoRecipe.tiny(), log=quiet)


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny):
    return AutoTokenizer.from_pretrained(str(tiny.tokenizer_dir))


def test_layout_and_languages(tiny):
    assert set(tiny.languages) == set(DEMO_LANGUAGES) == {"ar", "de", "en", "es", "ru", "sw", "zh"}
    assert set(tiny.model_dirs) == {"demo-llama", "demo-cohere"}
    for lang in DEMO_LANGUAGES:
        for split in SPLITS:
            rows = read_jsonl(tiny.split_path(lang, split))
            assert rows, (lang, split)
            assert all(set(r) == {"text", "source", "id"} and r["text"] for r in rows)
            assert {r["source"] for r in rows} <= {"dataset-build", "debian-handbook"}


def test_splits_are_disjoint(tiny):
    for lang in DEMO_LANGUAGES:
        texts = {split: {r["text"] for r in read_jsonl(tiny.split_path(lang, split))} for split in SPLITS}
        ids = {split: {r["id"] for r in read_jsonl(tiny.split_path(lang, split))} for split in SPLITS}
        for i, a in enumerate(SPLITS):
            for b in SPLITS[i + 1 :]:
                assert not texts[a] & texts[b], (lang, a, b)
                assert not ids[a] & ids[b], (lang, a, b)
        sizes = {split: len(texts[split]) for split in SPLITS}
        assert sizes["calibration"] > sizes["evaluation"] and sizes["calibration"] > sizes["tasks"], (lang, sizes)


def test_aligned_handbook_paragraphs_share_a_split(tiny):
    if not any(s["name"] == "debian-handbook" for s in tiny.metadata["sources"]):
        pytest.skip("debian-handbook is not installed here")
    split_of: dict[str, str] = {}
    for lang in DEMO_LANGUAGES:
        for split in SPLITS:
            for row in read_jsonl(tiny.split_path(lang, split)):
                if row["source"] == "debian-handbook":
                    assert split_of.setdefault(row["id"], split) == split, row["id"]


def test_same_seed_is_byte_identical_and_other_seed_differs(tiny, tmp_path):
    again = ensure_demo_assets(tmp_path / "again", DemoRecipe.tiny(), log=quiet)
    for lang in DEMO_LANGUAGES:
        for split in SPLITS:
            assert tiny.split_path(lang, split).read_bytes() == again.split_path(lang, split).read_bytes()
    vocab = lambda d: json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))["model"]  # noqa: E731
    assert vocab(tiny.tokenizer_dir) == vocab(again.tokenizer_dir)

    other = tmp_path / "seed1"
    build_corpus(DemoRecipe.tiny(seed=1).corpus_config(), other)
    ids = lambda root, lang: [r["id"] for r in read_jsonl(root / lang / "evaluation.jsonl")]  # noqa: E731
    assert any(ids(tiny.corpus_dir, lang) != ids(other, lang) for lang in DEMO_LANGUAGES)


def test_cache_hit_then_rebuild_on_changed_recipe(tiny, monkeypatch):
    meta_path = tiny.root / "metadata.json"
    before = meta_path.stat().st_mtime_ns

    def no_build(*args, **kwargs):
        raise AssertionError("a cache hit must not build anything")

    with monkeypatch.context() as patch:
        patch.setattr(build_mod, "build_assets", no_build)
        hit = ensure_demo_assets(tiny.root, DemoRecipe.tiny(), log=quiet)
    assert meta_path.stat().st_mtime_ns == before
    assert hit.metadata["recipe_hash"] == tiny.metadata["recipe_hash"]

    changed = dataclasses.replace(DemoRecipe.tiny(), train=dataclasses.replace(DemoRecipe.tiny().train, steps=20))
    assert changed.recipe_hash() != DemoRecipe.tiny().recipe_hash()
    rebuilt = ensure_demo_assets(tiny.root, changed, log=quiet)
    assert rebuilt.metadata["recipe_hash"] == changed.recipe_hash()
    assert rebuilt.metadata["models"]["demo-llama"]["training"]["steps"] == 20
    # Back to the fixture's recipe for the tests that follow.
    restored = ensure_demo_assets(tiny.root, DemoRecipe.tiny(), log=quiet)
    assert restored.metadata["recipe_hash"] == tiny.metadata["recipe_hash"]


def test_failed_build_leaves_no_tree(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash mid-build")

    monkeypatch.setattr(build_mod, "_train_one", boom)
    root = tmp_path / "demo"
    with pytest.raises(RuntimeError, match="simulated"):
        ensure_demo_assets(root, DemoRecipe.tiny(), log=quiet)
    assert not root.exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_default_root_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SWEEP_DEMO_DIR", str(tmp_path / "elsewhere"))
    assert build_mod.default_root() == tmp_path / "elsewhere"
    monkeypatch.delenv("SWEEP_DEMO_DIR")
    assert build_mod.default_root() == Path(__file__).resolve().parents[2] / ".cache" / "demo"


def test_tokenizer_round_trips_every_language(tiny, tiny_tokenizer):
    from_model_dir = AutoTokenizer.from_pretrained(str(tiny.model_dirs["demo-cohere"]))
    for lang in DEMO_LANGUAGES:
        for split in SPLITS:
            for row in read_jsonl(tiny.split_path(lang, split)):
                ids = tiny_tokenizer(row["text"])["input_ids"]
                assert tiny_tokenizer.decode(ids) == row["text"], (lang, row["id"])
                assert from_model_dir(row["text"])["input_ids"] == ids
    assert tiny_tokenizer.eos_token == tiny_tokenizer.bos_token == "<|endoftext|>"
    assert tiny_tokenizer.pad_token == "<pad>"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
def test_tokenizer_round_trips_any_text(tiny_tokenizer, text):
    assert tiny_tokenizer.decode(tiny_tokenizer(text)["input_ids"]) == text


def test_metadata_records_sources_and_figures(tiny):
    meta = tiny.metadata
    sources = {s["name"]: s for s in meta["sources"]}
    assert "dataset-build" in sources
    assert sources["dataset-build"]["licence"] == "BSD-2-Clause"
    assert sources["dataset-build"]["version"] == "0.1.11"
    assert set(sources["dataset-build"]["languages"]) == set(DEMO_LANGUAGES)
    if "debian-handbook" in sources:
        assert "CC-BY-SA-3.0" in sources["debian-handbook"]["licence"]
        assert "sw" not in sources["debian-handbook"]["languages"]
    assert meta["source_identity"]["debian-handbook"]["present"] == ("debian-handbook" in sources)
    for lang in DEMO_LANGUAGES:
        for split in SPLITS:
            counts = meta["corpus"][lang][split]
            assert counts["paragraphs"] > 0 and counts["chars"] > 0 and counts["tokens"] > 0
    for model in meta["models"].values():
        assert model["parameters"] > 0 and model["training"]["tokens"] > 0
        assert set(model["heldout"]) == set(DEMO_LANGUAGES)
    assert meta["tokenizer"]["vocab_size"] == DemoRecipe.tiny().vocab_size


def test_corpus_without_handbook_is_dataset_build_alone(tmp_path, monkeypatch):
    from engine.demo import corpus as corpus_mod

    monkeypatch.setattr(corpus_mod, "handbook_dir", lambda: None)  # as on a machine without the package
    config = DemoRecipe.tiny().corpus_config()
    result = build_corpus(config, tmp_path / "corpus")
    assert [s["name"] for s in result.sources] == ["dataset-build"]
    assert corpus_mod.source_identity(config)["debian-handbook"]["present"] is False
    for lang in DEMO_LANGUAGES:
        rows = read_jsonl(tmp_path / "corpus" / lang / "calibration.jsonl")
        assert rows and {r["source"] for r in rows} == {"dataset-build"}


def test_tiny_models_reload_offline(tiny, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(str(tiny.model_dirs["demo-llama"]))
    batch = tokenizer(["Habari ya dunia", "Hallo Welt, wie geht es?"], return_tensors="pt", padding=True)
    for name, expected_type in (("demo-llama", "llama"), ("demo-cohere", "cohere")):
        model_dir = tiny.model_dirs[name]
        assert (model_dir / "model.safetensors").is_file()
        model = AutoModelForCausalLM.from_pretrained(str(model_dir))
        assert model.config.model_type == expected_type
        assert next(model.parameters()).dtype == torch.float32
        with torch.no_grad():
            logits = model(**batch).logits
        assert logits.shape[-1] == len(tokenizer)
        assert torch.isfinite(logits).all()


# ---------------------------------------------------------------- slow: the real demo models


def _stream(tokenizer, texts: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for text in texts:
        ids.append(tokenizer.eos_token_id)
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    return torch.tensor(ids)


@torch.no_grad()
def _heldout_losses(model, stream: torch.Tensor, seq_len: int) -> tuple[float, torch.Tensor]:
    """Mean next-token NLL over non-overlapping windows, and the tokens it scored."""
    total, targets = 0.0, []
    for start in range(0, len(stream) - 1, seq_len):
        window = stream[start : start + seq_len].unsqueeze(0)
        if window.shape[1] < 2:
            continue
        logp = torch.log_softmax(model(input_ids=window).logits[0, :-1].float(), dim=-1)
        tgt = window[0, 1:]
        total -= float(logp.gather(1, tgt[:, None]).sum())
        targets.append(tgt)
    scored = torch.cat(targets)
    return total / len(scored), scored


@pytest.mark.slow
def test_full_demo_models_beat_unigram_in_every_language(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assets = ensure_demo_assets(log=lambda s: print(s, flush=True))  # default root; honours SWEEP_DEMO_DIR
    assert set(assets.model_dirs) == {"demo-llama", "demo-cohere"}
    seq_len = 256
    for name, expected_type in (("demo-llama", "llama"), ("demo-cohere", "cohere")):
        model_dir = assets.model_dirs[name]
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
        assert model.config.model_type == expected_type
        vocab = model.config.vocab_size
        for lang in DEMO_LANGUAGES:
            calibration = [r["text"] for r in read_jsonl(assets.split_path(lang, "calibration"))]
            evaluation = [r["text"] for r in read_jsonl(assets.split_path(lang, "evaluation"))]
            loss, scored = _heldout_losses(model, _stream(tokenizer, evaluation), seq_len)
            counts = torch.bincount(_stream(tokenizer, calibration), minlength=vocab).double() + 1.0
            unigram = float(-torch.log(counts / counts.sum())[scored].mean())
            assert math.isfinite(loss)
            assert loss <= unigram - 0.5, f"{name} {lang}: held-out {loss:.3f} vs unigram {unigram:.3f}"
