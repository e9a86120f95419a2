"""`sweep plan --estimate --tasks`: the lm-eval tasks' work per trial, counted without running the model,
against the batches lm-eval really runs on the demo model."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from engine import flops
from engine.demo import ensure_demo_assets
from engine.demo.tasks import ensure_demo_tasks, task_name
from engine.evaluate.task_cost import TaskCost, loglikelihood_batches, task_cost
from sweep.plan.estimate import ModelShape, trial_seconds
from tests.conftest import OFFLINE, environment

LETTER_TASK = "letters_en"  # multiple choice answered by one token: lm-eval computes each question once


def request(context: list[int], continuation: list[int]) -> tuple:
    return (("c", "x"), context, continuation)


def test_one_token_answers_to_one_question_share_a_row():
    question = [5, 6, 7, 8]
    letters = [request(question, [letter]) for letter in (30, 31, 32, 33)]
    other = [request([9, 9], [40, 41, 42]), request([9, 9], [40, 43])]
    batches = loglikelihood_batches(letters + other, batch_size=2, max_length=100)
    # longest first: [9, 9, 40, 41] and the question's row [5, 6, 7, 8] (the 4 letters share it; the last
    # token is never fed), then [9, 9, 40]
    assert batches == [(2, 4), (1, 3)]
    unshared = loglikelihood_batches(letters, batch_size=8, max_length=100, share_one_token_continuations=False)
    assert unshared == [(4, 4)]


def test_rows_are_cut_to_the_model_length_and_padded_to_their_batch():
    requests = [request(list(range(50)), [1, 2]), request([3], [4, 5]), request([6, 7, 8], [9])]
    assert loglikelihood_batches(requests, batch_size=2, max_length=10) == [(2, 10), (1, 2)]


def test_task_time_is_the_forward_work_at_the_perplexity_rate():
    shape = ModelShape.from_config({"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
                                    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                                    "num_key_value_heads": 8, "tie_word_embeddings": False})
    cost = TaskCost(requests={"loglikelihood": 80}, batches=[(8, 512)] * 10)
    base = trial_seconds(shape, None, 0, 2048, 0, 2048, 989.0)
    with_tasks = trial_seconds(shape, None, 0, 2048, 0, 2048, 989.0, tasks=cost)
    assert with_tasks - base == pytest.approx(flops.evaluation(shape.dims, 40960, 512) / 454.4e12)


@pytest.fixture(scope="module")
def include(tmp_path_factory):
    """The demo's continuation tasks, a one-token multiple-choice task and a perplexity task, in one folder."""
    assets = ensure_demo_assets()
    folder = tmp_path_factory.mktemp("tasks")
    demo = ensure_demo_tasks(assets)
    for lang in ("de", "en"):
        (folder / f"{task_name(lang)}.yaml").write_text((demo / f"{task_name(lang)}.yaml").read_text())
    paragraphs = [json.loads(line)["text"] for line in assets.split_path("en", "tasks").read_text().splitlines()][:9]
    letters = folder / "letters.jsonl"
    letters.write_text("".join(json.dumps({"text": p[:300], "answer": i % 4}) + "\n" for i, p in enumerate(paragraphs)))
    (folder / f"{LETTER_TASK}.yaml").write_text(yaml.safe_dump({
        "task": LETTER_TASK, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(letters)}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{text}}\nWhich letter? Answer:",
        "doc_to_choice": ["A", "B", "C", "D"], "doc_to_target": "answer", "metric_list": [{"metric": "acc"}],
        "metadata": {"version": 1}}))
    (folder / "rolling_sw.yaml").write_text(yaml.safe_dump({
        "task": "rolling_sw", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(assets.split_path("sw", "evaluation"))}},
        "test_split": "test", "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "text",
        "metric_list": [{"metric": "bits_per_byte"}], "metadata": {"version": 1}}))
    return folder


@pytest.mark.parametrize("model", ["demo-llama", "demo-cohere"])
def test_counted_batches_are_the_batches_each_scorer_runs(include, model):
    from transformers import AutoConfig

    from engine.evaluate.output_head import split_head
    from engine.evaluate.tasks import TaskRequest, run_tasks
    from engine.models import ModelSource
    from engine.trial import load

    path = str(ensure_demo_assets().model_dirs[model])
    requests = [TaskRequest(task_name("de"), 0, 6), TaskRequest(task_name("en"), 0, 6),
                TaskRequest(LETTER_TASK, 0, None), TaskRequest("rolling_sw", 0, 2)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    counted, seen = {}, {}
    try:
        with environment(OFFLINE):
            loaded = load(ModelSource(path, dtype="float32"))
            config = AutoConfig.from_pretrained(path)
            split_head(loaded.model)  # its one-off probe of the model is not a scoring call
            letters_only = task_cost(config, loaded.tokenizer, [TaskRequest(LETTER_TASK)], include, batch_size=4,
                                     scorer="lm_eval")
            for scorer in ("lm_eval", "shared_prefix"):
                counted[scorer] = task_cost(config, loaded.tokenizer, requests, include, batch_size=4, scorer=scorer)
                calls = seen[scorer] = []

                def record(module, args, kwargs, calls=calls):
                    ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]
                    calls.append(tuple(ids.shape))

                # The body runs in every call of either scorer (the whole model calls it too).
                hook = loaded.model.base_model.register_forward_pre_hook(record, with_kwargs=True)
                try:
                    run_tasks(loaded.model, loaded.tokenizer, requests, include_path=include, batch_size=4,
                              scorer=scorer)
                finally:
                    hook.remove()
    finally:
        torch.set_num_threads(threads)
    for scorer in ("lm_eval", "shared_prefix"):
        assert counted[scorer].requests["loglikelihood"] == 6 * 4 * 2 + 9 * 4
        assert counted[scorer].requests["loglikelihood_rolling"] == 2
        assert sorted(counted[scorer].batches) == sorted(seen[scorer]), scorer
    # the 9 letter questions are fed once each, not once per letter
    assert letters_only.requests == {"loglikelihood": 36} and letters_only.sequences == 9
    # sharing contexts computes fewer positions than lm-eval's one sequence per answer
    assert counted["shared_prefix"].positions < 0.8 * counted["lm_eval"].positions


def test_plan_estimate_counts_the_demo_tasks(capsys):
    from sweep.cli.main import main
    from tests.conftest import STUDIES

    ensure_demo_tasks(ensure_demo_assets())
    study = str(STUDIES / "demo.yaml")
    assert main(["plan", study, "--tasks"]) == 2
    assert "--tasks" in capsys.readouterr().err
    with environment(OFFLINE):
        assert main(["plan", study, "--estimate", "--tasks", "--summary"]) == 0
    out = capsys.readouterr().out
    # 7 continuation tasks x 20 documents x 4 multi-token endings, for both models: with shared prefixes
    # each document's context is one row and each ending one more
    assert out.count("tasks per trial (shared_prefix scorer): 560 requests (560 loglikelihood) -> 700 model rows") == 2
    assert "lm-eval tasks (--tasks counts them)" not in out
