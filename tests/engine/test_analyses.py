"""The analyses' metrics against hand-computed values, and the statistics collector on a small model."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.analyze.metrics import (
    activation_probability,
    iou,
    language_specific,
    language_subspace,
    lape,
    lape_histogram,
    neuron_changes,
    neuron_summary,
    packed_iou,
    quantile,
    subspace_snr,
    subspace_snrs,
)


def packed(bits):
    return np.packbits(np.array(bits, dtype=bool))


def test_mask_iou_identical_disjoint_partial_and_empty():
    a = packed([1, 1, 0, 0, 1, 0, 0, 0, 1])
    assert iou(*packed_iou(a, a)) == 1.0
    assert iou(*packed_iou(packed([1, 1, 0, 0]), packed([0, 0, 1, 1]))) == 0.0
    assert packed_iou(packed([1, 1, 1, 0]), packed([0, 1, 1, 1])) == (2, 4)  # IoU 0.5
    assert iou(*packed_iou(packed([0, 0, 0]), packed([0, 0, 0]))) == 1.0


def test_lape_of_one_language_uniform_and_silent_neurons():
    # 3 languages x 1 layer x 4 neurons
    probability = torch.tensor([[[0.9, 0.3, 0.0, 0.5]], [[0.0, 0.3, 0.0, 0.25]], [[0.0, 0.3, 0.0, 0.25]]])
    entropy = lape(probability)[0]
    assert entropy[0] == 0.0  # active in one language only: the minimum
    assert entropy[1] == pytest.approx(math.log(3))  # equally active everywhere: the maximum
    assert math.isnan(entropy[2])  # never active: no LAPE
    assert entropy[3] == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))


def test_activation_probability_and_language_specific_neurons():
    active = torch.tensor([[[90, 30, 2, 50]], [[0, 30, 2, 0]]])
    tokens = torch.tensor([100, 100])
    p = activation_probability(active, tokens)
    assert p[0, 0].tolist() == pytest.approx([0.9, 0.3, 0.02, 0.5])
    # Tang et al.'s rule (hand-worked in tests/engine/test_lape.py): neurons 0 and 3 are one-language (LAPE 0)
    # and exceed 0.4; the quota round(4 x 0.5) = 2 takes them; both belong to language 0 only
    specific = language_specific(p, top_rate=0.5, threshold=0.4)
    assert specific[0, 0].tolist() == [True, False, False, True] and not specific[1].any()
    specific = specific.any(dim=0)
    changes = neuron_changes(specific, torch.tensor([[True, True, False, False]]))
    assert changes == {"dense": 2, "pruned": 2, "survive": 1, "vanish": 1, "appear": 1}


def test_language_subspace_spans_the_centred_means():
    means = torch.tensor([[1.0, 5.0, 0.0], [3.0, 5.0, 0.0], [2.0, 5.0, 0.0]])  # differ along e1 only
    basis = language_subspace(means)
    assert basis.shape == (3, 1)  # rank 1: the centred means span one direction
    assert abs(float(basis[0, 0])) == pytest.approx(1.0)
    random = torch.randn(7, 16, generator=torch.Generator().manual_seed(0))
    basis = language_subspace(random)
    assert basis.shape == (16, 6) and torch.allclose(basis.T @ basis, torch.eye(6, dtype=basis.dtype), atol=1e-10)


def test_snr_in_both_subspaces():
    basis = torch.tensor([[1.0], [0.0], [0.0]])  # specific: e1; agnostic: e2, e3
    dense = torch.tensor([2.0, 3.0, 4.0])
    same = subspace_snr(dense, dense.clone(), basis)
    assert same == (math.inf, math.inf)  # a pruned model equal to the dense one: unbounded, not an error
    specific, agnostic = subspace_snr(dense, torch.tensor([2.2, 3.0, 4.0]), basis)
    assert specific == pytest.approx(10 * math.log10(4.0 / 0.04)) and agnostic == math.inf
    specific, agnostic = subspace_snr(dense, torch.tensor([2.0, 3.5, 4.0]), basis)
    assert specific == math.inf and agnostic == pytest.approx(10 * math.log10(25.0 / 0.25))


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def test_quantile_is_torchs_below_its_limit_and_exact_above():
    torch.manual_seed(0)
    small = torch.rand(10_001)
    # above torch.quantile's 2**24 elements: the same definition (numpy's default, linear), not a subsample
    large = torch.rand(2**24 + 7, dtype=torch.float64)
    for q in (0.0, 0.01, 0.5, 0.95, 1.0):
        assert quantile(small, q) == float(torch.quantile(small.double(), q))
        assert quantile(large, q) == pytest.approx(float(np.quantile(large.numpy(), q)), abs=1e-15)
    with pytest.raises(ValueError, match="no values"):
        quantile(torch.tensor([]), 0.5)


def test_neuron_summary_and_lape_histogram_by_hand():
    # 2 languages x 1 layer x 3 neurons: neuron 0 only in language 0, neuron 1 in both, neuron 2 never
    probability = torch.tensor([[[0.8, 0.5, 0.0]], [[0.0, 0.5, 0.0]]], dtype=torch.float64)
    entropy = lape(probability)
    assigned = torch.tensor([[[True, False, False]], [[False, False, False]]])  # neuron 0, to language 0
    summary = neuron_summary(entropy, assigned)
    assert summary.active_neurons == 2 and summary.mean_lape == pytest.approx(math.log(2) / 2)
    assert summary.specific_per_language == [1, 0]
    bins = lape_histogram(entropy, languages=2, bins=2)
    assert [(low, high) for low, high, _ in bins] == [(0.0, pytest.approx(math.log(2) / 2)),
                                                       (pytest.approx(math.log(2) / 2), pytest.approx(math.log(2)))]
    assert [n for _, _, n in bins] == [1, 1]


def test_subspace_snrs_cover_every_language_and_layer_with_the_dense_basis():
    torch.manual_seed(1)
    dense = torch.randn(3, 2, 8, dtype=torch.float64)
    pruned = dense + 0.1 * torch.randn_like(dense)
    rows = subspace_snrs(dense, pruned)
    assert [(i, layer) for i, layer, *_ in rows] == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]
    for i, layer, specific, agnostic, rank in rows:
        basis = language_subspace(dense[:, layer])
        assert rank == 2 == basis.shape[1]
        assert (specific, agnostic) == subspace_snr(dense[i, layer], pruned[i, layer], basis)


def test_collector_counts_real_tokens_and_ignores_padding(tmp_path):
    from engine.analyze.collect import StatisticsCollector, load_statistics

    model = tiny_llama()
    ids = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(1))
    padded = torch.cat([ids, torch.zeros(1, 6, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 10, dtype=torch.long), torch.zeros(1, 6, dtype=torch.long)], dim=1)
    plain, with_padding = StatisticsCollector(model), StatisticsCollector(model)
    with torch.no_grad():
        with plain.collect("en"):
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
        with with_padding.collect("en"):
            model(input_ids=padded, attention_mask=mask)
    a, b = plain.languages["en"], with_padding.languages["en"]
    assert a.tokens == b.tokens == 10
    assert torch.equal(a.active, b.active) and int(a.active.max()) <= 10 and a.active.shape == (2, 24)
    assert torch.allclose(a.hidden_sum, b.hidden_sum, atol=1e-4)
    # layer 0's output is hidden_states[1]; its mean over the 10 tokens
    assert torch.allclose(a.hidden_sum[0] / 10, out.hidden_states[1][0].double().mean(dim=0), atol=1e-5)
    path = plain.save(tmp_path / "statistics.safetensors")
    languages, tensors = load_statistics(path)
    assert languages == ["en"] and tensors["active"].shape == (1, 2, 24) and tensors["tokens"].tolist() == [10]
    assert torch.allclose(tensors["hidden_mean"][0, 0].double(), a.hidden_sum[0] / 10, atol=1e-5)


def test_sampled_masks_estimate_the_full_iou():
    from engine.analyze.mask_sample import sample_mask

    generator = torch.Generator().manual_seed(0)
    a = torch.rand(2048, 1024, generator=generator) < 0.5
    b = a.clone()
    flip = torch.rand(2048, 1024, generator=generator) < 0.3
    b[flip] = ~b[flip]
    exact = float((a & b).sum() / (a | b).sum())
    sa, sb = sample_mask(a, "layers.0.mlp.up_proj", 2**16), sample_mask(b, "layers.0.mlp.up_proj", 2**16)
    estimate = float((sa & sb).sum() / (sa | sb).sum())
    assert abs(estimate - exact) < 0.01  # standard error about 0.002 at 2^16 positions
    assert torch.equal(sample_mask(a, "layers.0.mlp.up_proj", 2**16), sa)  # the same positions every time
    assert not torch.equal(sample_mask(a, "layers.1.mlp.up_proj", 2**16), sa)  # other matrices, other positions
    small = torch.rand(10, 10, generator=generator) < 0.5
    assert torch.equal(sample_mask(small, "x", 2**16), small.reshape(-1))  # small matrices are kept whole


def test_layer_error_is_zero_for_the_dense_weights_and_positive_when_pruned(tmp_path):
    from engine.analyze.collect import StatisticsCollector
    from engine.snapshot import DenseSnapshot

    model = tiny_llama()
    snapshot = DenseSnapshot(model)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    same = StatisticsCollector(model, neurons=False, dense_weight=snapshot.weight, error_tokens=16)
    with torch.no_grad(), same.collect("en"):
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    record = same.errors["en"]
    assert record.tokens == 16  # capped at error_tokens of the 24 real tokens
    assert all(error == 0.0 and reference > 0 for error, reference in record.sums.values())
    with torch.no_grad():
        weight = model.model.layers[1].mlp.down_proj.weight
        weight[:, : weight.shape[1] // 2] = 0
    pruned = StatisticsCollector(model, neurons=False, dense_weight=snapshot.weight, error_tokens=16)
    with torch.no_grad(), pruned.collect("en"):
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    sums = pruned.errors["en"].sums
    assert sums["model.layers.1.mlp.down_proj"][0] > 0
    assert sums["model.layers.0.mlp.down_proj"][0] == 0.0  # upstream of the change: untouched
    snapshot.restore()
