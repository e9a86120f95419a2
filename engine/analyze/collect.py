"""Compact per-language statistics, gathered by hooks while the evaluation text runs through the model
(no extra forward pass): for every MLP neuron, how many tokens activated it (activation > 0, Tang et al.
2024); for every decoder layer, the sum of its output hidden states; optionally every decoder layer's
output hidden states at a fixed subsample of tokens (`token_sample`, see `TokenSample`). Padding is excluded.

For an 8B Llama (32 layers, 14,336 neurons, hidden 4,096) and 7 languages this is 32 x 14,336 x 7 int32
counts (12.8 MB) and 32 x 4,096 x 7 float32 means (3.7 MB); the token sample adds 32 x 4,096 x 7 x 2 bytes
(1.75 MiB) per sampled token for a bfloat16 model (56 MiB at 32 tokens), twice that for a float32 one.
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.io import atomic_path
from engine.prune.layers import find_decoder_layers


@dataclass
class LanguageStatistics:
    active: torch.Tensor  # [layers, neurons] int64: tokens on which each neuron's activation was > 0
    hidden_sum: torch.Tensor  # [layers, hidden] float64: summed output hidden states
    tokens: int = 0


# The token sample keeps every TOKEN_STRIDE-th token of a language (counting its valid tokens in the order the
# model reads them, each row's first valid token, the window's BOS prefix, left out); a prime, so the sampled
# positions fall at varying places within windows of any power-of-two length.
TOKEN_STRIDE = 127


@dataclass
class TokenSample:
    """A language's sampled tokens: positions k = 0, s, 2s, ... (s = TOKEN_STRIDE) in the stream of its
    valid tokens, each row's first valid token (the window's BOS prefix: the same hidden state in every
    window) left out, until `size` are kept. Every trial of a model evaluates the same token ids in the
    same order, so the dense and the pruned samples line up token by token; `ids` and `positions` let
    the analysis check that they do."""

    size: int
    hidden: list[list[torch.Tensor]] = field(default_factory=list)  # per layer: chunks [n, hidden], on CPU
    ids: list[int] = field(default_factory=list)  # the sampled token ids
    positions: list[int] = field(default_factory=list)  # their index k in the stream
    seen: int = 0  # valid, non-prefix tokens read until the sample was full

    def stacked(self, layers: int, hidden: int, dtype: torch.dtype, size: int) -> torch.Tensor:
        """[layers, size, hidden], zero past the sampled tokens."""
        out = torch.zeros(layers, size, hidden, dtype=dtype)
        for layer, chunks in enumerate(self.hidden[:layers]):
            if chunks:
                values = torch.cat(chunks)
                out[layer, : values.shape[0]] = values.to(dtype)
        return out


@dataclass
class LayerError:
    """Per linear layer name: [||WX - W'X||^2, ||WX||^2] summed over the first tokens of a language."""

    sums: dict[str, list[float]] = field(default_factory=dict)
    tokens: int = 0


@dataclass
class StatisticsCollector:
    """`dense_weight(name)`, when given, returns a linear layer's dense weight (the trial's snapshot):
    then each linear layer's output error against it is measured on the first `error_tokens` tokens of
    each language. `neurons=False` skips the neuron counts and hidden means. `token_sample` > 0 keeps
    each decoder layer's output hidden states at that many sampled tokens per language (`TokenSample`)."""

    model: torch.nn.Module
    neurons: bool = True
    dense_weight: object = None
    error_tokens: int = 4096
    token_sample: int = 0
    languages: dict[str, LanguageStatistics] = field(default_factory=dict)
    errors: dict[str, LayerError] = field(default_factory=dict)
    samples: dict[str, TokenSample] = field(default_factory=dict)

    def __post_init__(self) -> None:
        prefix, self.layers = find_decoder_layers(self.model)
        self.activations = [_activation_module(layer, i) for i, layer in enumerate(self.layers)] if self.neurons else []
        self.linears = {f"{prefix}.{name}": module for name, module in self.layers.named_modules()
                        if isinstance(module, torch.nn.Linear)} if self.dense_weight is not None else {}

    @contextlib.contextmanager
    def collect(self, language: str):
        """Counts everything the model runs inside the block as `language`."""
        state: dict = {"valid": None, "sampled": None}
        stats = self.languages.get(language)
        sample = None
        if self.token_sample > 0 and self.neurons:
            sample = self.samples.setdefault(language, TokenSample(self.token_sample,
                                                                   [[] for _ in self.layers]))
        handles = []

        def remember_mask(_module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            mask = kwargs.get("attention_mask")
            state["valid"] = (mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool))
            state["sampled"] = None
            if sample is not None and len(sample.ids) < sample.size:
                valid = state["valid"]
                prefix = valid & (valid.long().cumsum(dim=1) == 1)  # each row's first valid token
                flat = (valid & ~prefix).reshape(-1).nonzero().squeeze(1).cpu()  # row-major: the text order
                index = sample.seen + torch.arange(flat.numel())
                keep = (index % TOKEN_STRIDE == 0).nonzero().squeeze(1)[: sample.size - len(sample.ids)]
                state["sampled"] = flat[keep]
                sample.ids += ids.reshape(-1).cpu()[flat[keep]].tolist()
                sample.positions += index[keep].tolist()
                sample.seen += flat.numel()

        def count_active(index):
            def hook(_module, _args, output):
                nonlocal stats
                valid = state["valid"]
                if stats is None:
                    stats = self._new(output.shape[-1])
                    self.languages[language] = stats
                stats.active[index] += ((output > 0) & valid.unsqueeze(-1)).sum(dim=(0, 1)).to("cpu", torch.int64)
            return hook

        def sum_hidden(index):
            def hook(_module, _args, output):
                hidden = output[0] if isinstance(output, tuple) else output
                valid = state["valid"]
                stats_now = self.languages.get(language)
                if stats_now is not None:
                    stats_now.hidden_sum[index] += hidden[valid].sum(dim=0).to("cpu", torch.float64)
                    if index == 0:
                        stats_now.tokens += int(valid.sum())
                sampled = state["sampled"]
                if sampled is not None and sampled.numel():
                    flat = hidden.reshape(-1, hidden.shape[-1])
                    sample.hidden[index].append(flat[sampled.to(flat.device)].detach().to("cpu"))
            return hook

        def measure_error(name):
            def hook(module, args, output):
                record = self.errors.setdefault(language, LayerError())
                budget = self.error_tokens - record.tokens
                if budget <= 0:
                    return
                valid = state["valid"]
                x = args[0][valid][:budget].float()
                dense = torch.nn.functional.linear(x, self.dense_weight(name).to(x.device, x.dtype),
                                                   None if module.bias is None else module.bias.float())
                pruned = output[valid][:budget].float()
                total = record.sums.setdefault(name, [0.0, 0.0])
                total[0] += float((dense - pruned).pow(2).sum())
                total[1] += float(dense.pow(2).sum())
                if name == self._last_linear:
                    record.tokens += x.shape[0]
            return hook

        # On the body, which both the whole model and the evaluation's split head (output_head.py) run.
        body = getattr(self.model, "base_model", None) or self.model
        handles.append(body.register_forward_pre_hook(remember_mask, with_kwargs=True))
        for i, (layer, activation) in enumerate(zip(self.layers, self.activations)):
            handles.append(activation.register_forward_hook(count_active(i)))
            handles.append(layer.register_forward_hook(sum_hidden(i)))
        self._last_linear = next(reversed(self.linears)) if self.linears else None
        for name, linear in self.linears.items():
            handles.append(linear.register_forward_hook(measure_error(name)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _new(self, neurons: int) -> LanguageStatistics:
        hidden = self.model.config.hidden_size
        return LanguageStatistics(active=torch.zeros(len(self.layers), neurons, dtype=torch.int64),
                                  hidden_sum=torch.zeros(len(self.layers), hidden, dtype=torch.float64))

    def save(self, path: Path, metadata: dict[str, str] | None = None) -> Path:
        return save_statistics(path, self.languages, self.errors, metadata, self.samples)


def _activation_module(layer: torch.nn.Module, index: int) -> torch.nn.Module:
    mlp = getattr(layer, "mlp", None) or getattr(layer, "feed_forward", None)
    activation = getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn", None) or getattr(mlp, "act", None)
    if not isinstance(activation, torch.nn.Module):
        raise ValueError(f"decoder layer {index} has no MLP activation module (mlp.act_fn) to count neurons on; "
                         "switch analyses.lape and analyses.subspace off for this model")
    return activation


def save_statistics(path: Path, languages: dict[str, LanguageStatistics], errors: dict[str, LayerError] | None = None,
                    metadata: dict[str, str] | None = None, samples: dict[str, TokenSample] | None = None) -> Path:
    """One safetensors file: active counts [languages, layers, neurons] int32, tokens [languages] int64,
    hidden means [languages, layers, hidden] float32; the language order in the metadata. With token
    samples for every language: token_sample [languages, layers, size, hidden] in the hidden states' own
    dtype (bfloat16 for a bfloat16 model: lossless), zero past token_sample_count [languages] int64, and
    token_sample_ids / token_sample_positions [languages, size] int64 (-1 past the count). Atomic."""

    from safetensors.torch import save_file

    errors = errors or {}
    order = sorted(set(languages) | set(errors))
    tensors = {}
    if languages and set(languages) == set(order):
        tensors = {
            "active": torch.stack([languages[l].active for l in order]).to(torch.int32),
            "tokens": torch.tensor([languages[l].tokens for l in order], dtype=torch.int64),
            "hidden_mean": torch.stack([languages[l].hidden_sum / max(1, languages[l].tokens) for l in order]).float(),
        }
        if samples and set(samples) >= set(order):
            tensors.update(_sample_tensors([samples[l] for l in order], tensors["hidden_mean"].shape[1:]))
    names = sorted({name for e in errors.values() for name in e.sums})
    if names:
        # [languages, linear layers, 2]: ||WX - W'X||^2 and ||WX||^2
        empty = LayerError()
        tensors["layer_error"] = torch.tensor([[errors.get(l, empty).sums.get(n, [math.nan, math.nan]) for n in names]
                                               for l in order], dtype=torch.float64)
    metadata = {**(metadata or {}), "linear_layers": json.dumps(names)}
    path = Path(path)
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata={**metadata, "languages": json.dumps(order)})
    return path


def _sample_tensors(samples: list[TokenSample], shape: torch.Size) -> dict[str, torch.Tensor]:
    layers, hidden = shape
    size = max(s.size for s in samples)
    chunk = next((c for s in samples for chunks in s.hidden for c in chunks), None)
    dtype = chunk.dtype if chunk is not None and chunk.is_floating_point() else torch.float32
    return {"token_sample": torch.stack([s.stacked(layers, hidden, dtype, size) for s in samples]),
            "token_sample_count": torch.tensor([len(s.ids) for s in samples], dtype=torch.int64),
            "token_sample_ids": torch.tensor([s.ids + [-1] * (size - len(s.ids)) for s in samples], dtype=torch.int64),
            "token_sample_positions": torch.tensor([s.positions + [-1] * (size - len(s.positions)) for s in samples],
                                                   dtype=torch.int64)}


def load_statistics(path: Path) -> tuple[list[str], dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        tensors["linear_layers"] = json.loads(metadata.get("linear_layers", "[]"))
        return json.loads(metadata["languages"]), tensors
