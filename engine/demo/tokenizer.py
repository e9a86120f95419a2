"""A byte-level BPE tokenizer for the demo models, trained on the calibration split of every language."""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"


@dataclass(frozen=True)
class TokenizerConfig:
    vocab_size: int = 8192
    min_frequency: int = 2
    model_max_length: int = 512


def balanced_texts(texts_by_lang: Mapping[str, Sequence[str]]) -> Iterator[str]:
    """Every language's texts, the smaller languages repeated so each contributes about as many UTF-8
    bytes as the largest: BPE merges follow byte-pair counts, so without this a language with little
    text (Swahili) or few characters per byte (Chinese) would get few merges of its own."""
    sizes = {lang: sum(len(t.encode("utf-8")) for t in texts) for lang, texts in texts_by_lang.items()}
    target = max(sizes.values(), default=0)
    for lang in sorted(texts_by_lang):
        texts = texts_by_lang[lang]
        if not texts or sizes[lang] == 0:
            continue
        repeats = max(1, round(target / sizes[lang]))
        for _ in range(repeats):
            yield from texts


def train_tokenizer(texts_by_lang: Mapping[str, Sequence[str]], config: TokenizerConfig) -> PreTrainedTokenizerFast:
    # The byte alphabet is always in the vocabulary, so any text encodes and decodes back exactly.
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(balanced_texts(texts_by_lang), trainer=trainer)
    return wrap(tokenizer, config)


def wrap(tokenizer: Tokenizer, config: TokenizerConfig) -> PreTrainedTokenizerFast:
    # No BOS is prepended on encode (GPT-2 style): documents are separated by EOS in training, and
    # decode(encode(x)) == x holds without skipping special tokens.
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=config.model_max_length,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    return [Path(p) for p in tokenizer.save_pretrained(str(directory))]


def tokenizer_info(tokenizer: PreTrainedTokenizerFast) -> dict:
    return {
        "type": "byte-level BPE",
        "vocab_size": len(tokenizer),
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "adds_bos": False,
    }
