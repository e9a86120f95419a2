"""What a study's lm-eval tasks make the model compute per trial, counted from lm-eval's own requests.

The tasks are built exactly as `engine.evaluate.tasks.run_tasks` builds them (same task manager, shots,
limits and few-shot seed) and tokenized by lm-eval's `HFLM` with the model's tokenizer. Only the model
call is left out: `HFLM` runs here on a meta-device copy of the model (no weights), and the batches are
recorded instead of run, as the chosen scorer would batch them:
- `shared_prefix` (the default, engine/evaluate/shared_prefix.py): per batch of contexts, one pass over
  the left-padded contexts and one over the right-padded continuations;
- `lm_eval`: lm-eval's own `Collator`, the way `HFLM._loglikelihood_tokens` batches: descending length,
  one row for all requests that share a context and differ only in a one-token continuation (multiple
  choice with answers "A"/"B"/...), each row truncated to the model's length and padded to its batch's
  longest.
The result is the positions the GPU computes per trial, which `sweep.plan.estimate` turns into seconds
with the perplexity rate measured on the H100.

`generate_until` requests are counted as their context plus `max_gen_toks` positions (an upper bound:
generation may stop early), and flagged.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from engine.evaluate.scorers import DEFAULT_SCORER, SCORERS
from engine.evaluate.tasks import TaskRequest, flatten_tasks, manager_for


@dataclass
class TaskCost:
    """Per trial: requests by lm-eval request type, and the batches the model runs."""

    requests: dict[str, int] = field(default_factory=dict)
    batches: list[tuple[int, int]] = field(default_factory=list)  # (rows, padded length) of each model call
    generation_bound: bool = False
    scorer: str = DEFAULT_SCORER  # whose batches these are (engine.evaluate.shared_prefix.SCORERS)

    @property
    def sequences(self) -> int:
        return sum(rows for rows, _ in self.batches)

    @property
    def positions(self) -> int:
        """Rows x padded length over all batches: the tokens the model computes, padding included."""
        return sum(rows * length for rows, length in self.batches)

    @property
    def mean_length(self) -> float:
        return self.positions / self.sequences if self.sequences else 0.0

    def summary(self) -> str:
        kinds = ", ".join(f"{n:,} {kind}" for kind, n in sorted(self.requests.items()))
        bound = " (generation counted to max_gen_toks: an upper bound)" if self.generation_bound else ""
        return (f"{sum(self.requests.values()):,} requests ({kinds}) -> {self.sequences:,} model rows, "
                f"{self.positions:,} positions (mean {self.mean_length:,.0f}){bound}")


def loglikelihood_batches(requests: Sequence[tuple], batch_size: int, max_length: int,
                          share_one_token_continuations: bool = True) -> list[tuple[int, int]]:
    """(rows, padded length) of each model call `HFLM._loglikelihood_tokens` makes for `requests`, a list
    of ((context, continuation), context_ids, continuation_ids), in lm-eval 0.4's order and grouping."""
    from lm_eval.models.utils import Collator

    def by_length(request):
        tokens = request[1] + request[2]
        return -len(tokens), tuple(tokens)

    def shared_prefix(request):
        return request[-2] + request[-1][:-1]

    ordered = Collator(list(requests), sort_fn=by_length, group_by="contexts" if share_one_token_continuations else None,
                       group_fn=shared_prefix)
    out = []
    for chunk in ordered.get_batched(n=batch_size):
        lengths = [len((context + continuation)[-(max_length + 1):][:-1]) for _, context, continuation in chunk]
        out.append((len(lengths), max(lengths)))
    return out


def _recording_lm(model, tokenizer, batch_size: int, cost: TaskCost, scorer: str):
    """An `HFLM` whose model calls are recorded into `cost` rather than run: lm-eval's own batches, or
    the shared-prefix scorer's (which leaves rolling loglikelihoods to lm-eval's path)."""
    from lm_eval.models.huggingface import HFLM

    from engine.evaluate.shared_prefix import RollingFlag, model_calls

    class RecordingLM(RollingFlag, HFLM):
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
            rows = override_bs or self.batch_size
            if scorer == "shared_prefix" and not self._rolling and self.backend == "causal":
                cost.batches.extend(model_calls(requests, rows, self.max_length))
            else:
                share = self.backend == "causal" and bool(self.logits_cache)
                cost.batches.extend(loglikelihood_batches(requests, rows, self.max_length, share))
            return [(0.0, True)] * len(requests)

    return RecordingLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device="cpu")


def task_cost(config, tokenizer, requests: Sequence, include_path: Path | None, batch_size: int,
              scorer: str = DEFAULT_SCORER) -> TaskCost:
    """The per-trial cost of `requests` (engine.evaluate.tasks.TaskRequest) on a model with this
    transformers `config` and `tokenizer`, computed by `scorer` (engine.evaluate.shared_prefix.SCORERS). Reads each task's data (lm-eval's dataset loading: the local
    include path, the datasets cache, or the hub)."""
    import torch
    from lm_eval.defaults import DEFAULT_OTHER_SEED
    from transformers import AutoModelForCausalLM

    requests = [TaskRequest(r) if isinstance(r, str) else r for r in requests]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    cost = TaskCost(scorer=scorer)
    if scorer not in SCORERS:
        raise ValueError(f"scorer must be one of {', '.join(SCORERS)}, got {scorer!r}")
    lm = _recording_lm(model, tokenizer, batch_size, cost, scorer)
    manager, _ = manager_for([r.name for r in requests], Path(include_path) if include_path is not None else None)
    # As run_tasks: one simple_evaluate per (shots, limit), which hands each request type's instances of
    # all its tasks to the model in one call (so they are sorted and batched together).
    groups: dict[tuple, list[str]] = {}
    for request in requests:
        groups.setdefault((request.shots, request.limit), []).append(request.name)
    for (shots, limit), names in groups.items():
        by_type: dict[str, list] = {}
        for task in flatten_tasks(manager.load(list(names))["tasks"]):
            task.set_config(key="num_fewshot", value=shots)
            task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)
            n = None
            if limit is not None:
                n = int(math.ceil(len(task.eval_docs) * limit)) if limit < 1.0 else int(limit)
            task.build_all_requests(limit=n, rank=0, world_size=1)
            for instance in task.instances:
                by_type.setdefault(instance.request_type, []).append(instance)
        for kind, instances in by_type.items():
            cost.requests[kind] = cost.requests.get(kind, 0) + len(instances)
            if kind == "loglikelihood":
                lm.loglikelihood(instances, disable_tqdm=True)
            elif kind == "loglikelihood_rolling":
                lm.loglikelihood_rolling(instances, disable_tqdm=True)
            elif kind == "generate_until":
                cost.generation_bound = True
                for instance in instances:
                    context, arguments = instance.args[0], instance.args[1]
                    new_tokens = int((arguments or {}).get("max_gen_toks", lm.max_gen_toks))
                    cost.batches.append((1, min(len(lm.tok_encode(context)) + new_tokens, lm.max_length)))
            else:
                raise ValueError(f"{', '.join(names)}: lm-eval request type {kind!r} is not counted")
    return cost
