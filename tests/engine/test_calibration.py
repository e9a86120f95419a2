"""Calibration windows: reproducible by seed, mixtures as declared, local and hub-format sources, the
on-disk cache, and clear errors when text runs short."""
from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from engine.data.calibration import (
    NotEnoughText,
    WindowRequest,
    calibration_set,
    language_seed,
    pack_windows,
    split_budget,
)
from engine.data.sources import MissingLanguageText, TextSourceConfig, documents
from engine.languages import get_language
from tests.conftest import REPO

WORDS = {
    "en": "the river carries light stones past the quiet mill every spring morning".split(),
    "de": "der fluss trägt leichte steine an der stillen mühle vorbei jeden morgen".split(),
    "sw": "mto unabeba mawe mepesi kupita kinu kimya kila asubuhi ya masika".split(),
}


def make_corpus(root: Path, docs_per_lang: int = 60, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    for lang, words in WORDS.items():
        (root / lang).mkdir(parents=True, exist_ok=True)
        with open(root / lang / "calibration.jsonl", "w", encoding="utf-8") as handle:
            for i in range(docs_per_lang):
                n = int(torch.randint(3, 40, (1,), generator=g))
                text = " ".join(words[int(j)] for j in torch.randint(0, len(words), (n,), generator=g))
                handle.write(json.dumps({"text": f"{i} {text}"}, ensure_ascii=False) + "\n")
    return root


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    model = Tokenizer(models.BPE(unk_token=None))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    model.train_from_iterator([" ".join(w) for w in WORDS.values()] * 20, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=model, eos_token="<|endoftext|>")
    directory = tmp_path_factory.mktemp("tok")
    wrapped.save_pretrained(directory)
    return wrapped


@pytest.fixture
def corpus(tmp_path):
    return make_corpus(tmp_path / "corpus")


def local(corpus: Path) -> TextSourceConfig:
    return TextSourceConfig(kind="local", path=corpus, split="calibration")


def test_same_seed_same_tokens_other_seed_differs(tokenizer, corpus):
    request = WindowRequest(samples=6, seq_len=32, seed=0)
    a = calibration_set(local(corpus), tokenizer, [("en", 1.0)], request)
    b = calibration_set(local(corpus), tokenizer, [("en", 1.0)], request)
    c = calibration_set(local(corpus), tokenizer, [("en", 1.0)], WindowRequest(6, 32, seed=1))
    assert a.shape == (6, 32) and torch.equal(a, b) and not torch.equal(a, c)


def test_same_tokens_in_another_process(tokenizer, corpus, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    code = (
        "import sys, json; from pathlib import Path; from transformers import AutoTokenizer;"
        "from engine.data.calibration import calibration_set, WindowRequest;"
        "from engine.data.sources import TextSourceConfig;"
        f"tok = AutoTokenizer.from_pretrained({str(tmp_path / 'tok')!r});"
        f"src = TextSourceConfig(kind='local', path=Path({str(corpus)!r}), split='calibration');"
        "w = calibration_set(src, tok, [('de', 0.5), ('en', 0.5)], WindowRequest(4, 16, 7));"
        "print(json.dumps(w.tolist()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO,
                         env={"PYTHONHASHSEED": "123", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}).stdout
    here = calibration_set(local(corpus), tokenizer, [("de", 0.5), ("en", 0.5)], WindowRequest(4, 16, 7))
    assert json.loads(out) == here.tolist()


@pytest.mark.parametrize("weights, samples, expected", [
    ([("de", 0.25), ("en", 0.75)], 32, {"de": 8, "en": 24}),
    ([("de", 1 / 3), ("en", 1 / 3), ("sw", 1 / 3)], 10, {"de": 4, "en": 3, "sw": 3}),
    ([("de", 0.5), ("en", 0.5)], 1, {"de": 1, "en": 0}),
])
def test_split_budget_is_proportional_and_exact(weights, samples, expected):
    assert split_budget(weights, samples) == expected


def test_mixture_rows_come_from_each_language_as_declared(tokenizer, corpus):
    weights = [("de", 0.25), ("en", 0.75)]
    mixed = calibration_set(local(corpus), tokenizer, weights, WindowRequest(8, 16, seed=3))
    german = pack_windows(documents(local(corpus), get_language("de"), language_seed(3, "de")),
                          lambda t: tokenizer(t, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id,
                          WindowRequest(2, 16, language_seed(3, "de")))
    assert torch.equal(mixed[:2], german)
    decoded = [tokenizer.decode(row) for row in mixed]
    assert all(any(w in text for w in WORDS["de"]) for text in decoded[:2])
    assert all(any(w in text for w in WORDS["en"]) and "mühle" not in text for text in decoded[2:])


def test_short_documents_are_joined_not_rejected(tokenizer):
    docs = ["the mill"] * 200  # each far shorter than a window
    windows = pack_windows(iter(docs), lambda t: tokenizer(t, add_special_tokens=False)["input_ids"],
                           tokenizer.eos_token_id, WindowRequest(4, 64, 0))
    assert windows.shape == (4, 64)
    assert (windows == tokenizer.eos_token_id).sum() > 10


def test_stream_is_read_no_further_than_needed(tokenizer):
    consumed = []

    def stream():
        for i in range(10_000):
            consumed.append(i)
            yield "the river carries light stones"

    pack_windows(stream(), lambda t: tokenizer(t, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id,
                 WindowRequest(2, 32, 0))
    assert len(consumed) < 20


def test_not_enough_text_says_how_much_exists(tokenizer, corpus):
    with pytest.raises(NotEnoughText, match=r"holds \d+ tokens in 60 documents; 1000 samples x 512 tokens need 512000"):
        calibration_set(local(corpus), tokenizer, [("sw", 1.0)], WindowRequest(1000, 512, 0))


def test_missing_language_and_empty_directory(tokenizer, corpus, tmp_path):
    with pytest.raises(MissingLanguageText, match="no text for 'zh'"):
        calibration_set(local(corpus), tokenizer, [("zh", 1.0)], WindowRequest(1, 8, 0))
    (tmp_path / "empty" / "en").mkdir(parents=True)
    (tmp_path / "empty" / "en" / "calibration.jsonl").write_text("\n\n")
    with pytest.raises(MissingLanguageText):
        calibration_set(TextSourceConfig(kind="local", path=tmp_path / "empty", split="calibration"), tokenizer,
                        [("en", 1.0)], WindowRequest(1, 8, 0))


def make_hub_layout(root: Path) -> Path:
    """A local directory laid out like the hub's allenai/c4 (mC4 configs), read by the same code path."""
    (root / "multilingual").mkdir(parents=True)
    configs = []
    for lang, words in WORDS.items():
        with gzip.open(root / "multilingual" / f"c4-{lang}.tfrecord-00000-of-00002.json.gz", "wt", encoding="utf-8") as f:
            for i in range(80):
                f.write(json.dumps({"text": f"{i} " + " ".join(words[(i + k) % len(words)] for k in range(25)),
                                    "url": "u", "timestamp": "t"}, ensure_ascii=False) + "\n")
        configs.append(f"- config_name: {lang}\n  data_files:\n  - split: train\n    path: multilingual/c4-{lang}.tfrecord-*.json.gz\n")
    (root / "README.md").write_text("---\nconfigs:\n" + "".join(configs) + "---\n")
    return root


def test_hub_code_path_on_a_local_dataset(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    hub = TextSourceConfig(kind="hub", dataset=str(make_hub_layout(tmp_path / "c4")), config="{mc4}", split="train",
                           revision="pinned")
    a = calibration_set(hub, tokenizer, [("sw", 1.0)], WindowRequest(4, 32, 0))
    b = calibration_set(hub, tokenizer, [("sw", 1.0)], WindowRequest(4, 32, 0))
    c = calibration_set(hub, tokenizer, [("sw", 1.0)], WindowRequest(4, 32, 5))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert "mawe" in tokenizer.decode(a[0])
    with pytest.raises(MissingLanguageText, match="BuilderConfig 'zh' not found"):
        calibration_set(hub, tokenizer, [("zh", 1.0)], WindowRequest(1, 8, 0))


def test_cache_hit_reads_nothing(tokenizer, corpus, tmp_path, monkeypatch):
    request = WindowRequest(4, 16, 0)
    first = calibration_set(local(corpus), tokenizer, [("en", 1.0)], request, cache_dir=tmp_path / "cache",
                            source_fingerprint="abc")
    assert len(list((tmp_path / "cache" / "calibration").glob("*.safetensors"))) == 1

    def no_reading(*_args, **_kwargs):
        raise AssertionError("a cache hit must not read the source")

    monkeypatch.setattr("engine.data.calibration.documents", no_reading)
    again = calibration_set(local(corpus), tokenizer, [("en", 1.0)], request, cache_dir=tmp_path / "cache",
                            source_fingerprint="abc")
    assert torch.equal(first, again)
    with pytest.raises(AssertionError, match="must not read"):  # another content fingerprint is another entry
        calibration_set(local(corpus), tokenizer, [("en", 1.0)], request, cache_dir=tmp_path / "cache",
                        source_fingerprint="changed")


def test_concurrent_fills_do_not_corrupt_the_cache(tokenizer, corpus, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    code = (
        "from pathlib import Path; from transformers import AutoTokenizer;"
        "from engine.data.calibration import calibration_set, WindowRequest;"
        "from engine.data.sources import TextSourceConfig;"
        f"tok = AutoTokenizer.from_pretrained({str(tmp_path / 'tok')!r});"
        f"src = TextSourceConfig(kind='local', path=Path({str(corpus)!r}), split='calibration');"
        "[calibration_set(src, tok, [('en', 1.0)], WindowRequest(8, 32, 0),"
        f" cache_dir=Path({str(tmp_path / 'cache')!r})) for _ in range(5)]"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env={"PATH": "/usr/bin:/bin"}) for _ in range(3)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    entries = list((tmp_path / "cache" / "calibration").iterdir())
    assert len(entries) == 1 and entries[0].suffix == ".safetensors"  # no temporary files left behind
    from safetensors.torch import load_file

    expected = calibration_set(local(corpus), tokenizer, [("en", 1.0)], WindowRequest(8, 32, 0))
    assert torch.equal(load_file(str(entries[0]))["input_ids"], expected)


def test_preflight_reports_short_text_before_any_trial(tokenizer, corpus, tmp_path):
    """`samples x seq_len` beyond the local text is an error naming the language and the amount of
    text, raised from the study and tokenizers alone, before anything is pruned."""
    import yaml

    from sweep.plan.preflight import check_calibration_text, needed_tokens
    from sweep.study.load import load_study
    from sweep.study.problems import StudyInvalid

    study_data = {
        "name": "short",
        "models": [{"name": "m", "hub": "org/m", "revision": "r"}],
        "calibration": {"source": {"kind": "local", "path": str(corpus), "split": "calibration"},
                        "languages": ["en", "en:3+sw:1"], "samples": 8, "seq_len": 64, "seeds": [0]},
        "pruners": [{"method": "wanda", "sparsity": 0.5}],
        "evaluation": {"languages": ["en"], "perplexity": {"source": {"kind": "local", "path": str(corpus),
                                                                        "split": "calibration"}, "window": 32}},
    }
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(study_data))
    study = load_study(path)
    assert needed_tokens(study) == {"en": 8 * 64, "sw": 2 * 64}
    check_calibration_text(study, {"m": tokenizer})  # enough text
    study_data["calibration"]["samples"] = 4000
    path.write_text(yaml.safe_dump(study_data))
    with pytest.raises(StudyInvalid) as err:
        check_calibration_text(load_study(path), {"m": tokenizer})
    messages = [str(p) for p in err.value.problems]
    assert any("(en)" in m and "4000 samples x 64 tokens need 256000 of en" in m for m in messages)
    assert any("(sw)" in m and "need 64000 of sw" in m for m in messages)
