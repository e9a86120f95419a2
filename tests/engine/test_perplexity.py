"""Perplexity against an independent, unbatched computation on a small random model."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from engine.evaluate.perplexity import perplexity, windows_of


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def reference_token_nll(model, token_ids, window, prefix):
    losses = []
    for start in range(0, len(token_ids), window - 1):
        sequence = torch.tensor([[prefix, *token_ids[start : start + window - 1]]])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=sequence).logits[0].double(), dim=-1)
        for position in range(1, sequence.shape[1]):
            losses.append(-float(log_probs[position - 1, sequence[0, position]]))
    return losses


def reference_nll(model, token_ids, window, prefix):
    return math.fsum(reference_token_nll(model, token_ids, window, prefix))


@pytest.mark.parametrize("n_tokens, window, batch_size", [(200, 16, 4), (37, 8, 3), (5, 32, 8)])
def test_matches_unbatched_reference(tiny_model, n_tokens, window, batch_size):
    generator = torch.Generator().manual_seed(n_tokens)
    ids = torch.randint(1, 97, (n_tokens,), generator=generator).tolist()
    result = perplexity(tiny_model, ids, text_bytes=3 * n_tokens, window=window, prefix_id=0,
                        batch_size=batch_size, pad_id=0)
    per_token = reference_token_nll(tiny_model, ids, window, prefix=0)
    expected = math.fsum(per_token)
    assert result.tokens == n_tokens
    # Every token's own loss, in text order: the units the reducer's paired bootstrap resamples.
    assert len(result.token_nll) == n_tokens
    assert result.token_nll == pytest.approx(per_token, rel=1e-4, abs=1e-5)
    assert result.windows == math.ceil(n_tokens / (window - 1))
    assert result.nll == pytest.approx(expected, rel=1e-5)
    assert result.token_perplexity == pytest.approx(math.exp(expected / n_tokens), rel=1e-5)
    assert result.bits_per_byte == pytest.approx(expected / math.log(2) / (3 * n_tokens), rel=1e-5)


def test_windows_cover_every_token_once():
    ids = list(range(1, 24))
    windows = windows_of(ids, window=5, prefix_id=0)
    assert all(w[0] == 0 and len(w) <= 5 for w in windows)
    assert [t for w in windows for t in w[1:]] == ids
    with pytest.raises(ValueError):
        windows_of(ids, window=1, prefix_id=0)


def test_empty_text_is_an_error(tiny_model):
    with pytest.raises(ValueError, match="no tokens"):
        perplexity(tiny_model, [], 0, 8, 0)


def test_max_tokens_cut_never_splits_a_character():
    """A byte-level tokenizer splits rare characters over tokens; a cut between them must give the
    tokens back rather than count U+FFFD's 3 bytes for the 1-2 the tokens hold."""
    from transformers import AutoTokenizer

    from engine.demo import ensure_demo_assets
    from engine.evaluate.suite import language_tokens

    tokenizer = AutoTokenizer.from_pretrained(str(ensure_demo_assets().model_dirs["demo-llama"]))
    texts = ["𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ 龘靐齉 text", "second 𓀀𓀁 document"]  # rare: one character, several tokens
    joined = "\n\n".join(texts)
    ids = tokenizer(joined, add_special_tokens=False)["input_ids"]

    def spelled(n):
        return tokenizer.decode(ids[:n], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    mid_character = [n for n in range(1, len(ids)) if spelled(n).endswith("\ufffd")]
    assert mid_character, "the test text no longer splits a character over tokens; pick rarer characters"
    first_boundary = min(n for n in range(1, len(ids)) if n not in mid_character)
    for limit in range(first_boundary, len(ids)):
        cut, n_bytes = language_tokens(tokenizer, texts, limit)
        assert cut == ids[: len(cut)] and limit - 3 <= len(cut) <= limit
        text = spelled(len(cut))
        assert joined.startswith(text) and "\ufffd" not in text
        assert n_bytes == len(text.encode("utf-8"))
        if limit not in mid_character:
            assert len(cut) == limit
    assert language_tokens(tokenizer, texts, None) == (ids, len(joined.encode("utf-8")))
