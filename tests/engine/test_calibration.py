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
    MAX_DOCUMENTS_PER_SAMPLE,
    NoDocumentSeparator,
    NotEnoughText,
    TooFewLongDocuments,
    WindowRequest,
    calibration_cache_path,
    calibration_set,
    document_separator,
    language_seed,
    pack_windows,
    published_windows,
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


# published sampling ---------------------------------------------------------------------------------

def long_corpus(root: Path, long_docs: int = 30, short_docs: int = 30) -> Path:
    """Per language, documents of 40-80 words (longer than the windows below) among short ones."""
    g = torch.Generator().manual_seed(5)
    for lang, words in WORDS.items():
        (root / lang).mkdir(parents=True, exist_ok=True)
        with open(root / lang / "calibration.jsonl", "w", encoding="utf-8") as handle:
            for i in range(long_docs + short_docs):
                n = int(torch.randint(40, 80, (1,), generator=g)) if i < long_docs else 3
                text = " ".join(words[int(j)] for j in torch.randint(0, len(words), (n,), generator=g))
                handle.write(json.dumps({"text": f"{i} {text}"}, ensure_ascii=False) + "\n")
    return root


def _inside(window: list[int], document: list[int]) -> bool:
    n = len(window)
    return any(document[i:i + n] == window for i in range(len(document) - n + 1))


def test_published_windows_lie_inside_single_documents(tokenizer, tmp_path):
    corpus = long_corpus(tmp_path / "corpus")
    own_ids = [tokenizer(t, add_special_tokens=False)["input_ids"]
               for t in documents(local(corpus), get_language("en"), seed=None)]
    request = WindowRequest(8, 24, seed=0, sampling="published")
    windows = calibration_set(local(corpus), tokenizer, [("en", 1.0)], request)
    assert windows.shape == (8, 24)
    assert not bool((windows == tokenizer.eos_token_id).any())
    sources = []
    for row in windows.tolist():
        holders = [i for i, ids in enumerate(own_ids) if _inside(row, ids)]
        assert holders, "a published window crosses a document boundary"
        assert all(len(own_ids[i]) > 24 for i in holders)
        sources.append(holders[0])
    assert len(set(sources)) == 8  # one document per sample


def test_published_windows_are_seeded(tokenizer, tmp_path):
    corpus = long_corpus(tmp_path / "corpus")
    def draw(seed):
        return calibration_set(local(corpus), tokenizer, [("de", 0.5), ("en", 0.5)],
                               WindowRequest(6, 20, seed=seed, sampling="published"))
    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))
    packed = calibration_set(local(corpus), tokenizer, [("de", 0.5), ("en", 0.5)], WindowRequest(6, 20, seed=0))
    assert not torch.equal(draw(0), packed)


def test_published_window_start_is_drawn_as_in_the_published_loaders(tokenizer):
    """One window per document longer than seq_len (`>`), start = randint(0, len - seq_len - 1)."""
    import random

    docs = ["the mill", " ".join(["the river carries light stones"] * 20), "quiet",
            " ".join(["every spring morning past the mill"] * 20)]
    encode = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    windows = published_windows(iter(docs), encode, WindowRequest(2, 10, seed=42, sampling="published"))
    rng = random.Random(42)
    expected = []
    for doc in (docs[1], docs[3]):
        ids = encode(doc)
        start = rng.randint(0, len(ids) - 10 - 1)
        expected.append(ids[start:start + 10])
    assert windows.tolist() == expected


def test_too_few_long_documents_is_refused_naming_the_language(tokenizer, tmp_path):
    corpus = long_corpus(tmp_path / "corpus", long_docs=3)
    with pytest.raises(TooFewLongDocuments, match=r"local text for sw .*: 3 of the 33 documents read are longer than "
                                                   r"24 tokens.*sampling: packed"):
        calibration_set(local(corpus), tokenizer, [("sw", 1.0)], WindowRequest(8, 24, 0, sampling="published"))
    assert issubclass(TooFewLongDocuments, NotEnoughText)


def test_published_reading_is_bounded(tokenizer):
    consumed = []

    def endless_short_documents():
        while True:
            consumed.append(1)
            yield "the mill"

    with pytest.raises(TooFewLongDocuments, match="the bound"):
        published_windows(endless_short_documents(), lambda t: tokenizer(t, add_special_tokens=False)["input_ids"],
                          WindowRequest(2, 16, 0, sampling="published"))
    assert len(consumed) == 2 * MAX_DOCUMENTS_PER_SAMPLE


# the packed separator -------------------------------------------------------------------------------

def chat_tokenizer(eos: str, specials: list[str], template_tokens: list[str], bos: str | None = None,
                   with_template: bool = True) -> PreTrainedTokenizerFast:
    """A small tokenizer with a chat model's special tokens (as Llama 3, SmolLM2, Aya 23, Gemma have)."""
    model = Tokenizer(models.BPE(unk_token=None))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    model.train_from_iterator([" ".join(w) for w in WORDS.values()] * 5, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=model, eos_token=eos, bos_token=bos)
    if with_template:
        turn = "".join(template_tokens)
        wrapped.chat_template = ("{{ bos_token }}{% for m in messages %}" + template_tokens[0] + "{{ m['role'] }}"
                                 "{{ m['content'] }}" + turn[len(template_tokens[0]):] + "{% endfor %}")
    return wrapped


CHAT_TOKENIZERS = {
    # name: (eos, special tokens, tokens written in the chat template, bos, expected boundary)
    "llama3-instruct": ("<|eot_id|>", ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                       "<|end_header_id|>", "<|eot_id|>"],
                        ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|begin_of_text|>",
                        "<|end_of_text|>"),
    "smollm2-instruct": ("<|im_end|>", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                         ["<|im_start|>", "<|im_end|>"], "<|im_start|>", "<|endoftext|>"),
    "aya23": ("<|END_OF_TURN_TOKEN|>", ["<BOS_TOKEN>", "<EOS_TOKEN>", "<|START_OF_TURN_TOKEN|>",
                                        "<|END_OF_TURN_TOKEN|>", "<|CHATBOT_TOKEN|>"],
              ["<|START_OF_TURN_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|END_OF_TURN_TOKEN|>"], "<BOS_TOKEN>", "<EOS_TOKEN>"),
    "gemma-it": ("<end_of_turn>", ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"],
                 ["<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>"),
    "base": ("<|endoftext|>", ["<|endoftext|>"], [], None, "<|endoftext|>"),
}


@pytest.mark.parametrize("name", sorted(CHAT_TOKENIZERS))
@pytest.mark.parametrize("with_template", [True, False])
def test_packed_separator_is_a_pretraining_boundary_never_a_chat_turn_end(name, with_template, tmp_path):
    eos, specials, template_tokens, bos, expected = CHAT_TOKENIZERS[name]
    tok = chat_tokenizer(eos, specials, template_tokens or ["<|endoftext|>"], bos, with_template and bool(template_tokens))
    separator = document_separator(tok)
    assert separator.token == expected and separator.id == tok.convert_tokens_to_ids(expected)
    windows = calibration_set(local(make_corpus(tmp_path / "corpus")), tok, [("en", 1.0)], WindowRequest(4, 64, 0))
    assert bool((windows == separator.id).any())
    for turn_token in template_tokens:
        assert not bool((windows == tok.convert_tokens_to_ids(turn_token)).any())


def test_separator_override_and_refusals():
    eos, specials, template_tokens, bos, _ = CHAT_TOKENIZERS["llama3-instruct"]
    tok = chat_tokenizer(eos, specials, template_tokens, bos)
    assert document_separator(tok, "<|begin_of_text|>").token == "<|begin_of_text|>"
    with pytest.raises(NoDocumentSeparator, match="not one token"):
        document_separator(tok, "<|no_such_token|>")
    with pytest.raises(NoDocumentSeparator, match="marks chat turns"):
        document_separator(tok, "<|eot_id|>")
    only_turns = chat_tokenizer("<|im_end|>", ["<|im_start|>", "<|im_end|>"], ["<|im_start|>", "<|im_end|>"])
    with pytest.raises(NoDocumentSeparator, match="Set `calibration.separator`"):
        document_separator(only_turns)
    with pytest.raises(NoDocumentSeparator):
        calibration_set(TextSourceConfig(kind="local", path=Path("/nonexistent")), only_turns, [("en", 1.0)],
                        WindowRequest(1, 8, 0))


def test_cache_key_tells_sampling_and_separator_apart(tokenizer, tmp_path):
    source = local(tmp_path)
    paths = {calibration_cache_path(source, tokenizer, [("en", 1.0)], WindowRequest(4, 16, 0, sampling=s), tmp_path)
             for s in ("packed", "published")}
    eos, specials, template_tokens, bos, _ = CHAT_TOKENIZERS["llama3-instruct"]
    tok = chat_tokenizer(eos, specials, template_tokens, bos)
    paths |= {calibration_cache_path(source, tok, [("en", 1.0)], WindowRequest(4, 16, 0, separator=s), tmp_path)
              for s in (None, "<|begin_of_text|>")}
    assert len(paths) == 4
    with pytest.raises(ValueError, match="sampling 'random'"):
        WindowRequest(4, 16, 0, sampling="random")


def test_preflight_counts_long_documents_for_published_sampling(tokenizer, tmp_path):
    import yaml

    from sweep.plan.preflight import check_calibration_text
    from sweep.study.load import load_study
    from sweep.study.problems import StudyInvalid

    corpus = long_corpus(tmp_path / "corpus", long_docs=5)
    study_data = {
        "name": "published",
        "models": [{"name": "m", "hub": "org/m", "revision": "r"}],
        "calibration": {"source": {"kind": "local", "path": str(corpus), "split": "calibration"},
                        "languages": ["en"], "samples": 5, "seq_len": 24, "seeds": [0], "sampling": "published"},
        "pruners": [{"method": "wanda", "sparsity": 0.5}],
        "evaluation": {"languages": ["en"], "perplexity": {"source": {"kind": "local", "path": str(corpus),
                                                                        "split": "calibration"}, "window": 32}},
    }
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(study_data))
    check_calibration_text(load_study(path), {"m": tokenizer})  # 5 long documents for 5 samples
    study_data["calibration"]["samples"] = 6  # 35 documents, 35 x 24 tokens: enough for packed, not published
    path.write_text(yaml.safe_dump(study_data))
    with pytest.raises(StudyInvalid, match=r"holds 5 documents longer than 24 tokens"):
        check_calibration_text(load_study(path), {"m": tokenizer})
