"""The shared-prefix scorer gives lm-eval's numbers: per request, the log-likelihood within 1e-4 nats
(float32) and the same greedy flag as lm-eval's own HFLM, and the same acc and acc_norm per document,
on the demo tasks and on offline tasks in the shapes of Belebele, XNLI and XStoryCloze, on both demo
models and the real Gemma 3 270M (sliding-window layers, with contexts past its window)."""
from __future__ import annotations

import math
import random

import pytest
import torch

from engine.demo.build import ensure_demo_assets
from engine.demo.shaped_tasks import SHAPES, write_shaped_tasks
from engine.demo.shaped_tasks import task_name as shaped_name
from engine.demo.tasks import ensure_demo_tasks
from engine.demo.tasks import task_name as demo_name
from engine.evaluate.output_head import split_head
from engine.evaluate.shared_prefix import (
    ScoringRequest,
    batches_for,
    effective_request,
    group_by_context,
    score_requests,
)
from engine.evaluate.tasks import TaskRequest, run_tasks
from tests.conftest import OFFLINE, environment

TOLERANCE = 1e-4  # nats, float32
RELATIVE = 1e-6


def tolerance(value: float) -> float:
    """1e-4 nats, or 1e-6 of the value where that is larger (8 float32 spacings). A float32 sum near
    -500 nats moves in steps of 3.1e-5, and lm-eval disagrees with itself there by more than 1e-4: on
    Gemma 3 270M's XNLI-shaped requests its batch sizes 1 and 16 differ by up to 1.5e-4
    (benchmarks/task_scoring.py, reports/benchmarks.md)."""
    return max(TOLERANCE, RELATIVE * abs(value))


# ------------------------------------------------------------------------------------------ planning
def test_effective_request_is_what_lm_eval_feeds():
    # lm-eval feeds (context + continuation)[-(max_length + 1):][:-1] and scores the last len(cont) positions
    request = effective_request(0, list(range(10)), [10, 11, 12], max_length=8)
    assert request.context + request.continuation == tuple(range(4, 13))
    assert request.continuation == (10, 11, 12)
    assert effective_request(1, [1, 2], [3], max_length=8).context == (1, 2)
    with pytest.raises(ValueError, match="exceeds max_length"):
        effective_request(2, [1], list(range(9)), max_length=8)
    with pytest.raises(ValueError, match="empty context"):
        effective_request(3, [], [1], max_length=8)


def test_groups_share_context_and_the_continuations_common_start():
    xnli_like = [ScoringRequest(i, (1,), (5, 6, 7, 8, answer, 9, 10)) for i, answer in enumerate((20, 21, 22))]
    other_doc = [ScoringRequest(3 + i, (1,), (30, 31, 32, 33, answer, 34)) for i, answer in enumerate((20, 21, 22))]
    groups = group_by_context(xnli_like + other_doc)
    assert sorted(g.prefix for g in groups) == [(1, 5, 6, 7, 8), (1, 30, 31, 32, 33)]
    for group in groups:
        assert group.scored_from == 1 and len(group.members) == 3
        assert all(group.tail(m) and group.prefix[1:] + group.tail(m) == m.continuation for m in group.members)
    # answers with nothing in common still share their context (the demo task, Belebele)
    choices = [ScoringRequest(i, (7, 8, 9), (40 + i, 50 + i)) for i in range(4)]
    [group] = group_by_context(choices)
    assert group.prefix == (7, 8, 9) and len(group.members) == 4
    # a group never has more members than a batch has rows, unless they all end with the prefix
    many = [ScoringRequest(i, (1, 2), (i + 3, 9)) for i in range(10)]
    assert [len(g.members) for g in group_by_context(many, rows_per_group=4)] == [4, 4, 2]
    one_token = [ScoringRequest(i, (1, 2), (i + 3,)) for i in range(10)]
    assert [len(g.members) for g in group_by_context(one_token, rows_per_group=4)] == [10]
    # one-token answers need no continuation pass: a batch holds `rows` of their prefixes
    letters = [ScoringRequest(4 * doc + i, (doc, 1, 2), (60 + i,)) for doc in range(6) for i in range(4)]
    assert [len(batch) for batch in batches_for(letters, 4)] == [4, 2]
    continued = [ScoringRequest(4 * doc + i, (doc, 1, 2), (60 + i, 7)) for doc in range(6) for i in range(4)]
    assert all(sum(len(g.members) for g in batch) <= 4 for batch in batches_for(continued, 4))


# ------------------------------------------------------------------------------------------ exactness
def _scored(model, tokenizer, requests, include, scorer, batch_size=8):
    """run_tasks with `scorer`, and every loglikelihood request's (doc, index) -> (ll, is_greedy), read
    from lm-eval's instances after its own evaluate() ran (a spy on the real function)."""
    import lm_eval.evaluator

    responses = {}
    real = lm_eval.evaluator.evaluate

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        for name, task in kwargs["task_dict"]["tasks"].items():
            for instance in task.instances:
                responses[(name, instance.doc_id, instance.idx)] = instance.resps[0]
        return out

    lm_eval.evaluator.evaluate = spy
    try:
        result = run_tasks(model, tokenizer, requests, include_path=include, batch_size=batch_size, scorer=scorer)
    finally:
        lm_eval.evaluator.evaluate = real
    return result, responses


def assert_same_as_lm_eval(model, tokenizer, requests, include, batch_size=8) -> float:
    ours, our_responses = _scored(model, tokenizer, requests, include, "shared_prefix", batch_size)
    theirs, their_responses = _scored(model, tokenizer, requests, include, "lm_eval", batch_size)
    assert our_responses.keys() == their_responses.keys() and our_responses
    worst = 0.0
    for key, (their_ll, their_greedy) in their_responses.items():
        our_ll, our_greedy = our_responses[key]
        assert math.isfinite(our_ll)
        worst = max(worst, abs(our_ll - their_ll))
        assert abs(our_ll - their_ll) <= tolerance(their_ll), (key, our_ll, their_ll)
        assert our_greedy == their_greedy, key
    for name, entry in theirs["tasks"].items():
        mine = ours["tasks"][name]
        assert mine["metrics"] == entry["metrics"], name
        assert mine["units"] == entry["units"], name  # acc and acc_norm of every document
    assert ours["scorer"] == "shared_prefix" and theirs["scorer"] == "lm_eval"
    return worst


@pytest.fixture(scope="module")
def shaped_include(tmp_path_factory):
    assets = ensure_demo_assets()
    return write_shaped_tasks(assets, tmp_path_factory.mktemp("shaped"), languages=("en", "zh"), docs=6)


def _load(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval(), AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("model_name", ["demo-llama", "demo-cohere"])
def test_demo_models_get_lm_evals_numbers(model_name, shaped_include):
    assets = ensure_demo_assets()
    include = ensure_demo_tasks(assets)
    model, tokenizer = _load(assets.model_dirs[model_name])
    assert split_head(model) is not None  # Cohere's logit_scale is found as the head's scale
    with environment(OFFLINE):
        demo = [TaskRequest(demo_name(lang), limit=6) for lang in ("en", "zh", "sw")]
        worst = assert_same_as_lm_eval(model, tokenizer, demo, include)
        shaped = [TaskRequest(shaped_name(shape, lang)) for shape in SHAPES for lang in ("en", "zh")]
        worst = max(worst, assert_same_as_lm_eval(model, tokenizer, shaped, shaped_include))
    print(f"\n{model_name}: largest |difference| {worst:.2e} nats")


def test_truncated_and_single_requests_match_the_whole_sequence():
    """Requests past max_length (lm-eval truncates from the left: the context each continuation sees
    differs), one-token and long continuations mixed, batch sizes 1 and 5, against one full forward
    per request computed here from the definition."""
    assets = ensure_demo_assets()
    model, _ = _load(assets.model_dirs["demo-llama"])
    rng = random.Random(0)
    vocab = model.config.vocab_size
    context = [rng.randrange(vocab) for _ in range(90)]
    raw = [(context, [rng.randrange(vocab) for _ in range(n)]) for n in (1, 1, 5, 17, 40)]
    raw += [([rng.randrange(vocab) for _ in range(n)], [rng.randrange(vocab) for _ in range(3)]) for n in (1, 30)]
    max_length = 64
    requests = [effective_request(i, c, x, max_length) for i, (c, x) in enumerate(raw)]
    expected = []
    with torch.no_grad():
        for c, x in raw:
            window = (c + x)[-(max_length + 1):][:-1]
            log_probs = torch.log_softmax(model(torch.tensor([window])).logits[0, -len(x):], dim=-1)
            target = torch.tensor(x)
            expected.append((float(log_probs.gather(1, target[:, None]).sum()),
                             bool((log_probs.argmax(-1) == target).all())))
    for rows in (1, 5):
        got = score_requests(model, requests, rows_per_batch=rows, pad_id=0)
        for (ll, greedy), (want_ll, want_greedy) in zip(got, expected, strict=True):
            assert abs(ll - want_ll) <= TOLERANCE and greedy == want_greedy


@pytest.mark.slow
def test_gemma3_gets_lm_evals_numbers_past_its_sliding_window(gemma3_270m, shaped_include, tmp_path):
    """Gemma 3 alternates sliding-window (512) and global attention layers: contexts of ~700 tokens,
    left-padded in one batch with shorter ones, must still give lm-eval's numbers."""
    model, tokenizer = gemma3_270m
    assert model.config.sliding_window == 512
    assets = ensure_demo_assets()
    long_include = write_shaped_tasks(assets, tmp_path / "long", languages=("de",), docs=3, shapes=("belebele",))
    # belebele passages of about 3,000 characters: over 512 tokens
    import json
    data = long_include / "data" / "belebele_de.jsonl"
    docs = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]
    for i, doc in enumerate(docs):
        doc["flores_passage"] = " ".join([doc["flores_passage"]] * (4 if i < 2 else 1))
    data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    lengths = [len(tokenizer(d["flores_passage"])["input_ids"]) for d in docs]
    assert max(lengths) > 600 and min(lengths) < 512, lengths
    with environment(OFFLINE):
        worst = assert_same_as_lm_eval(model, tokenizer, [TaskRequest(shaped_name("belebele", "de"))], long_include)
        shaped = [TaskRequest(shaped_name(shape, "en"), limit=4) for shape in ("xnli", "xstorycloze")]
        worst = max(worst, assert_same_as_lm_eval(model, tokenizer, shaped, shaped_include))
    print(f"\ngemma3-270m: largest |difference| {worst:.2e} nats")
