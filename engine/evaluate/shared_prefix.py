"""lm-eval's loglikelihood requests scored with shared prefixes: what requests share runs once.

lm-eval's HF backend (`HFLM._loglikelihood_tokens`) runs every (context, continuation) pair as its own
full sequence, so a 4-answer question over a long passage runs the passage 4 times, and it takes a
log-softmax over the whole vocabulary at every position of every sequence. Here the requests are the
ones lm-eval built and tokenized (same prompts, same context/continuation split, same left truncation
at `max_length`); only how they are computed changes:

1. Requests are grouped by the context the model actually sees (after lm-eval's truncation). Within a
   context, continuations that start alike are clustered, and their common start joins the shared
   prefix: XNLI's three answers are "premise, right? Yes/Also/No, hypothesis" after an empty context,
   so the premise is what they share. Tokens of the shared prefix that belong to the continuations are
   still scored, once, for all of them.
2. Groups are sorted by prefix length and packed into batches of at most `batch_size` continuation
   rows, across documents; prefixes are left-padded, with explicit positions and an attention mask
   (a batch with nothing after its prefixes, one-token answers, is right-padded and run without a
   mask, as lm-eval runs its rows).
3. One forward over the batch's prefixes fills a KV cache; only the positions that predict a scored
   token are turned into logits.
4. The cache's rows are repeated per continuation, and one forward over the rest of the continuations
   (all but their last token, right-padded) gives the remaining positions.
5. Per request, lm-eval's own arithmetic: a log-softmax in lm-eval's softmax dtype over the scored
   positions only, the continuation tokens' log-probabilities summed in order, and the greedy flag as
   "argmax equals the token at every position".

The forward is the model's own (its body, and its head a chunk of positions at a time when
`output_head.split_head` verifies the split, else the whole model), with a transformers cache, so any
architecture transformers runs with a cache is covered, sliding-window layers included, and a model
spread over GPUs takes its inputs on its first device as usual. lm-eval computes the metrics from these
numbers as always.
"""
from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from engine.evaluate.output_head import (
    SplitHead,
    cache_argument,
    forward_parameters,
    input_device,
    returned_cache,
    split_head,
    vocabulary_size,
)

# Tokenized (context, continuation) pairs kept per tokenizer; a study's task set is far below this.
PAIR_MEMO_LIMIT = 1_000_000


@dataclass(frozen=True)
class ScoringRequest:
    """One lm-eval request as the model sees it: `context` after lm-eval's left truncation."""

    index: int  # position in the caller's request list
    context: tuple[int, ...]
    continuation: tuple[int, ...]


@dataclass
class ContextGroup:
    """Requests that share `prefix`: their context, then `len(prefix) - scored_from` tokens their
    continuations all start with (scored once for all of them)."""

    prefix: tuple[int, ...]
    scored_from: int  # the context's length: prefix tokens from here on are continuation tokens
    members: list[ScoringRequest] = field(default_factory=list)

    @property
    def shared(self) -> int:
        """How many tokens of each member's continuation lie in the prefix."""
        return len(self.prefix) - self.scored_from

    def tail(self, request: ScoringRequest) -> tuple[int, ...]:
        """The member's continuation after the prefix (never empty)."""
        return request.continuation[self.shared:]


def effective_request(index: int, context: Sequence[int], continuation: Sequence[int],
                      max_length: int) -> ScoringRequest:
    """The request lm-eval's causal path scores: it feeds `(context + continuation)[-(max_length + 1):][:-1]`
    and reads the last len(continuation) positions, so what the continuation is conditioned on is that
    window minus the continuation."""
    if not context:
        raise ValueError(f"request {index}: empty context (lm-eval puts the prefix token there)")
    if not continuation:
        raise ValueError(f"request {index}: empty continuation")
    if len(continuation) > max_length:
        raise ValueError(f"request {index}: continuation of {len(continuation)} tokens exceeds max_length "
                         f"{max_length}")
    window = (list(context) + list(continuation))[-(max_length + 1):]
    return ScoringRequest(index, tuple(window[: len(window) - len(continuation)]), tuple(continuation))


def _common_start(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _clusters(context: tuple[int, ...], members: list[ScoringRequest]) -> list[ContextGroup]:
    """Members of one context split into clusters whose continuations share a start, greedily in sorted
    order. A member joins the open cluster when that computes no more positions than starting a new one:
    members x (start lost) <= start + context (what a new cluster would run again). Each
    member keeps at least its last token out of the prefix, so it has a position of its own."""
    out: list[ContextGroup] = []
    start: tuple[int, ...] = ()
    for request in sorted(members, key=lambda r: r.continuation):
        own = request.continuation[:-1]
        if out:
            common = _common_start(start, own)
            n = len(out[-1].members)
            # Body positions: joining costs n x (start lost); a new cluster costs the context and
            # the start again (its own continuation's are counted either way).
            if n * (len(start) - common) <= len(start) + len(context):
                start = start[:common]
                out[-1].members.append(request)
                continue
        start = own
        out.append(ContextGroup((), len(context), [request]))
    for cluster in out:
        shared = min(_common_start(cluster.members[0].continuation[:-1], m.continuation[:-1]) for m in cluster.members)
        cluster.prefix = context + cluster.members[0].continuation[:shared]
    return out


def group_by_context(requests: Sequence[ScoringRequest], rows_per_group: int | None = None) -> list[ContextGroup]:
    """Requests grouped by context, then clustered by how their continuations start (`_clusters`); a
    cluster of more than `rows_per_group` members that need a continuation pass is cut into pieces of that
    many (each runs its prefix)."""
    by_context: dict[tuple[int, ...], list[ScoringRequest]] = {}
    for request in requests:
        by_context.setdefault(request.context, []).append(request)
    groups = []
    for context, members in by_context.items():
        for cluster in _clusters(context, members):
            # Members that end with the prefix take no row of their own; the others take one each.
            needs_rows = any(len(cluster.tail(m)) > 1 for m in cluster.members)
            step = (rows_per_group if needs_rows else None) or len(cluster.members)
            for begin in range(0, len(cluster.members), step):
                groups.append(ContextGroup(cluster.prefix, cluster.scored_from, cluster.members[begin:begin + step]))
    return groups


def plan_batches(groups: Sequence[ContextGroup], rows_per_batch: int) -> list[list[ContextGroup]]:
    """Groups, longest prefix first (so a batch's prefixes need little padding, and memory runs out at
    once if it will), packed into batches across documents. Groups whose members all end with the
    prefix (one-token answers: Belebele's " A"/" B"/...) need no continuation pass and are batched
    apart, `rows_per_batch` prefixes at a time; the others take `rows_per_batch` continuation rows."""
    if rows_per_batch < 1:
        raise ValueError(f"rows_per_batch must be >= 1, got {rows_per_batch}")
    batches: list[list[ContextGroup]] = []
    prefix_only = [g for g in groups if all(len(g.tail(m)) == 1 for m in g.members)]
    continued = [g for g in groups if any(len(g.tail(m)) > 1 for m in g.members)]
    for kind, rows_of in ((prefix_only, lambda g: 1), (continued, lambda g: len(g.members))):
        rows = 0
        first = len(batches)
        for group in sorted(kind, key=lambda g: (-len(g.prefix), g.prefix)):
            n = rows_of(group)
            if len(batches) > first and rows + n <= rows_per_batch:
                batches[-1].append(group)
                rows += n
            else:
                batches.append([group])
                rows = n
    return batches


def batches_for(requests: Sequence[ScoringRequest], rows_per_batch: int) -> list[list[ContextGroup]]:
    return plan_batches(group_by_context(requests, rows_per_batch), rows_per_batch)


def model_calls(requests: Sequence[tuple], rows_per_batch: int, max_length: int) -> list[tuple[int, int]]:
    """(rows, length) of each model call `score_requests` makes for lm-eval's tokenized requests
    ((context, continuation), context_ids, continuation_ids): a prefix pass per batch, then a
    continuation pass when any member has more than one token after the prefix."""
    scoring = [effective_request(i, ctx, cont, max_length) for i, (_, ctx, cont) in enumerate(requests)]
    calls = []
    for batch in batches_for(scoring, rows_per_batch):
        calls.append((len(batch), max(len(g.prefix) for g in batch)))
        rest = max(len(g.tail(r)) for g in batch for r in g.members) - 1
        if rest > 0:
            calls.append((sum(len(g.members) for g in batch), rest))
    return calls


@torch.no_grad()
def score_batch(model, groups: Sequence[ContextGroup], *, pad_id: int, softmax_dtype: torch.dtype | None = None,
                autocast_dtype: torch.dtype | None = None) -> dict[int, tuple[float, bool]]:
    """(log-likelihood, is_greedy) of every member of `groups`, by request index. See the module docstring."""
    split = split_head(model)
    runner = split.body if split is not None else model
    device = input_device(model)
    cache_arg = cache_argument(runner)

    def run(use_cache: bool = True, **inputs):
        """Per-position vectors (hidden states when the head is split off, else logits) and the cache."""
        with torch.autocast(device_type=device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = runner(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()},
                         use_cache=use_cache)
        return (out.last_hidden_state if split is not None else out.logits), returned_cache(out)

    members = [(row, request) for row, group in enumerate(groups) for request in group.members]
    rest = max(len(groups[row].tail(request)) for row, request in members) - 1
    width = max(len(g.prefix) for g in groups)
    n_groups = len(groups)
    # The positions that predict scored tokens (the shared continuation tokens, then each member's first
    # tail token) are each prefix's last `shared + 1`.
    keep = max(g.shared for g in groups) + 1
    prefix_ids = torch.full((n_groups, width), pad_id, dtype=torch.long)
    if rest == 0:
        # Nothing follows the prefixes (one-token answers): right-padded and run as lm-eval runs its rows,
        # without a mask or a cache (causal attention never looks at the padding after a row's tokens).
        for row, group in enumerate(groups):
            prefix_ids[row, : len(group.prefix)] = torch.tensor(group.prefix, dtype=torch.long)
        whole, _ = run(use_cache=False, input_ids=prefix_ids)
        vectors = torch.zeros((n_groups, keep, whole.shape[-1]), dtype=whole.dtype, device=whole.device)
        for row, group in enumerate(groups):
            length = len(group.prefix)
            vectors[row, keep - 1 - group.shared:] = whole[row, length - 1 - group.shared: length]
        del whole
        cache = None
    else:
        # Left-padded, so that every row's continuation follows its prefix in the cache.
        prefix_mask = torch.zeros((n_groups, width), dtype=torch.long)
        prefix_positions = torch.zeros((n_groups, width), dtype=torch.long)
        for row, group in enumerate(groups):
            length = len(group.prefix)
            prefix_ids[row, width - length:] = torch.tensor(group.prefix, dtype=torch.long)
            prefix_mask[row, width - length:] = 1
            prefix_positions[row, width - length:] = torch.arange(length)
        extra = {"logits_to_keep": keep} if split is None and "logits_to_keep" in forward_parameters(model) else {}
        vectors, cache = run(input_ids=prefix_ids, attention_mask=prefix_mask, position_ids=prefix_positions,
                             **extra)
        vectors = vectors[:, -keep:]  # [groups, keep, dim]

    later = None
    if rest > 0:
        group_of_row = torch.tensor([row for row, _ in members], dtype=torch.long)
        cache.reorder_cache(group_of_row)  # each row gets its own copy of its prefix's keys and values
        n_rows = len(members)
        ids = torch.full((n_rows, rest), pad_id, dtype=torch.long)
        mask = torch.zeros((n_rows, rest), dtype=torch.long)
        positions = torch.zeros((n_rows, rest), dtype=torch.long)
        for row, (group_row, request) in enumerate(members):
            tokens = groups[group_row].tail(request)[:-1]
            if tokens:
                ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
                mask[row, : len(tokens)] = 1
            start = len(groups[group_row].prefix)
            positions[row] = torch.arange(start, start + rest)
        later, _ = run(input_ids=ids, attention_mask=torch.cat([prefix_mask[group_of_row], mask], dim=1),
                       position_ids=positions, **{cache_arg: cache})  # [rows, rest, dim]
    del cache

    # The scored positions, each once: per group its shared continuation tokens, then per member the
    # tail (its first token from the prefix's last position, the others from the continuation pass).
    pieces, targets = [], []
    shared_at: list[int] = []
    for row, group in enumerate(groups):
        shared_at.append(len(targets))
        if group.shared:
            pieces.append(vectors[row, keep - 1 - group.shared: keep - 1])
            targets.extend(group.prefix[group.scored_from:])
    tail_at: list[int] = []
    for row, (group_row, request) in enumerate(members):
        tail = groups[group_row].tail(request)
        tail_at.append(len(targets))
        pieces.append(vectors[group_row, keep - 1:])
        if len(tail) > 1:
            pieces.append(later[row, : len(tail) - 1].to(vectors.device))
        targets.extend(tail)
    token_log_probs, greedy = _score_positions(torch.cat(pieces, dim=0), targets, split, softmax_dtype)
    results: dict[int, tuple[float, bool]] = {}
    for start, (group_row, request) in zip(tail_at, members, strict=True):
        group = groups[group_row]
        shared = slice(shared_at[group_row], shared_at[group_row] + group.shared)
        own = slice(start, start + len(group.tail(request)))
        values = torch.cat([token_log_probs[shared], token_log_probs[own]])
        # Summed in the log-softmax's dtype, in token order, one request at a time, as lm-eval sums them.
        results[request.index] = (float(values.sum()), bool(greedy[shared].all() and greedy[own].all()))
    return results


# Without a split head, log-softmax over at most this many logits at once (512 MiB of float32).
SOFTMAX_CHUNK_ELEMENTS = 1 << 27


def _score_positions(vectors: torch.Tensor, targets: list[int], split: SplitHead | None,
                     softmax_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each position's log-probability of its target token and whether the target is the argmax, with
    lm-eval's operations (log_softmax in `softmax_dtype`, argmax over the log-probabilities). `vectors`
    are hidden states when the head is split off (the head then runs a chunk at a time), else logits."""
    target = torch.tensor(targets, dtype=torch.long)
    if split is not None:
        per_chunk = split.positions_per_chunk(vocabulary_size(split), vectors.device)
    else:
        per_chunk = max(1, SOFTMAX_CHUNK_ELEMENTS // vectors.shape[-1])
    picked, greedy = [], []
    for begin in range(0, vectors.shape[0], per_chunk):
        chunk = vectors[begin:begin + per_chunk]
        logits = split.logits(chunk) if split is not None else chunk
        log_probs = torch.nn.functional.log_softmax(logits, dim=-1, dtype=softmax_dtype)
        chunk_target = target[begin:begin + per_chunk].to(log_probs.device)
        chosen = log_probs.gather(1, chunk_target.unsqueeze(1)).squeeze(1)
        picked.append(chosen.cpu())
        greedy.append(_is_argmax(log_probs, chunk_target, chosen).cpu())
    return torch.cat(picked), torch.cat(greedy)


def _is_argmax(log_probs: torch.Tensor, target: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """`log_probs.argmax(-1) == target`, computed with a max reduction (an order of magnitude faster than
    argmax on a CPU): the target is argmax iff it reaches the row's maximum and no earlier index does
    (argmax returns the first maximal index)."""
    top = log_probs.amax(dim=-1)
    greedy = chosen == top
    rows = greedy.nonzero().squeeze(1)
    if rows.numel():
        earlier = torch.arange(log_probs.shape[-1], device=log_probs.device).unsqueeze(0) < target[rows].unsqueeze(1)
        tied_earlier = ((log_probs[rows] == top[rows].unsqueeze(1)) & earlier).any(dim=1)
        greedy[rows] = ~tied_earlier
    return greedy


def score_requests(model, requests: Sequence[ScoringRequest], *, rows_per_batch: int, pad_id: int,
                   softmax_dtype: torch.dtype | None = None, autocast_dtype: torch.dtype | None = None,
                   progress=None) -> list[tuple[float, bool]]:
    """Scores `requests` (indices 0..n-1) and returns their (log-likelihood, is_greedy) in index order."""
    results: dict[int, tuple[float, bool]] = {}
    for batch in batches_for(requests, rows_per_batch):
        results.update(score_batch(model, batch, pad_id=pad_id, softmax_dtype=softmax_dtype,
                                   autocast_dtype=autocast_dtype))
        if progress is not None:
            progress(sum(len(g.members) for g in batch))
    return [results[i] for i in range(len(requests))]


# Per tokenizer (weakly held, so a model switch frees it): (context, continuation) -> lm-eval's encoding.
_PAIR_MEMOS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def pair_memo(tokenizer) -> dict:
    memo = _PAIR_MEMOS.get(tokenizer)
    if memo is None or len(memo) > PAIR_MEMO_LIMIT:
        memo = {}
        _PAIR_MEMOS[tokenizer] = memo
    return memo


class RollingFlag:
    """Mixed into an HFLM: `_rolling` is True while `loglikelihood_rolling` runs. Rolling windows share no
    context, so their requests stay on lm-eval's own path."""

    _rolling = False

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        self._rolling = True
        try:
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
        finally:
            self._rolling = False


def shared_prefix_lm(**hflm_kwargs):
    """An lm-eval HFLM whose loglikelihood requests are scored with shared prefixes (module docstring) and
    whose tokenized requests are memoised per tokenizer across calls; everything else is HFLM's."""
    from lm_eval.models.huggingface import HFLM

    class SharedPrefixLM(RollingFlag, HFLM):
        def _encode_pair(self, context: str, continuation: str):
            memo = pair_memo(self.tokenizer)
            key = (context, continuation)
            encoded = memo.get(key)
            if encoded is None:
                encoded = super()._encode_pair(context, continuation)
                memo[key] = encoded
            return encoded

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
            if self._rolling or self.backend != "causal" or (self.batch_size == "auto" and override_bs is None):
                return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
            rows = int(override_bs if override_bs is not None else self.batch_size)
            scoring = [effective_request(i, ctx, cont, self.max_length) for i, (_, ctx, cont) in enumerate(requests)]
            bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                       desc="Running loglikelihood requests (shared prefixes)")
            pad = self.tokenizer.pad_token_id
            answers = score_requests(self.model, scoring, rows_per_batch=rows,
                                     pad_id=pad if pad is not None else 0, softmax_dtype=self.softmax_dtype,
                                     autocast_dtype=self.mixed_precision_dtype, progress=bar.update)
            bar.close()
            for (request_str, _, _), answer in zip(requests, answers, strict=True):
                if request_str is not None:
                    self.cache_hook.add_partial("loglikelihood", request_str, answer)
            return answers

    return SharedPrefixLM(**hflm_kwargs)
