"""Language-specific neurons by Tang et al.'s (2024) published procedure (identify.py of
RUCAIBox/Language-Specific-Neurons), step by step on hand-computed values; the threshold readings
(own, dense); and the neuron table across trials."""
from __future__ import annotations

import math
import random

import pytest
import torch

from engine.analyze.metrics import (
    activation_probability,
    assign_languages,
    filtered_lape,
    language_specific,
    lape,
    neuron_summary,
    probability_threshold,
    quantile,
    rank_count,
    top_rate_selection,
)

INF = math.inf


def h2(a: float) -> float:
    """Entropy (nats) of the two-language distribution (a, 1 - a)."""
    return -(a * math.log(a) + (1 - a) * math.log(1 - a))


# 2 languages (en, de) x 2 layers x 5 neurons; flat index = layer * 5 + neuron (n0..n9).
#            n0    n1    n2    n3    n4  |  n5    n6    n7    n8    n9
EN = [[0.90, 0.60, 0.00, 0.05, 0.80], [0.10, 0.30, 0.02, 0.50, 0.20]]
DE = [[0.00, 0.60, 0.00, 0.00, 0.20], [0.70, 0.10, 0.01, 0.50, 0.00]]
# The 20 probabilities sorted (position: value): 1-5: 0 (n0 de, n2 en, n2 de, n3 de, n9 de), 6: 0.01,
# 7: 0.02, 8: 0.05, 9-10: 0.1, 11-12: 0.2, 13: 0.3, 14-15: 0.5, 16-17: 0.6, 18: 0.7, 19: 0.8, 20: 0.9.


def example() -> torch.Tensor:
    return torch.tensor([EN, DE], dtype=torch.float64)


def test_published_procedure_step_by_step_by_hand():
    p = example()
    # Step 1, threshold (filter_rate = 0.6 here): k = round(20 x 0.6) = 12 -> the 12th smallest = 0.2.
    assert rank_count(20, 0.6) == 12
    threshold = probability_threshold(p, 0.6)
    assert threshold == 0.2
    # Step 2, LAPE of the normalised probabilities, +inf where no language EXCEEDS 0.2:
    #   n0 (0.9, 0) -> 0            n1 (0.6, 0.6) -> ln 2       n2 never active -> inf
    #   n3 (0.05, 0) -> 0 but weak -> inf                       n4 (0.8, 0.2) -> H(0.8) = 0.5004
    #   n5 (0.1, 0.7) -> H(0.125) = 0.3768                       n6 (0.3, 0.1) -> H(0.75) = 0.5623
    #   n7 (0.02, 0.01) weak -> inf  n8 (0.5, 0.5) -> ln 2       n9 (0.2, 0) -> 0, but 0.2 is not > 0.2 -> inf
    entropy = filtered_lape(p, threshold)
    expected = [[0.0, math.log(2), INF, INF, h2(0.8)], [h2(0.125), h2(0.75), INF, math.log(2), INF]]
    assert entropy.tolist() == [[pytest.approx(e) if e != INF else INF for e in row] for row in expected]
    # Step 3, quota over ALL 10 neurons (top_rate = 0.3): round(10 x 0.3) = 3 -> the three lowest LAPE:
    #   n0 (0), n5 (0.3768), n4 (0.5004); not n6 (0.5623).
    assert rank_count(10, 0.3) == 3
    selected = top_rate_selection(entropy, 0.3)
    assert selected.tolist() == [[True, False, False, False, True], [True, False, False, False, False]]
    # Step 4, per language, probability > activation_bar (= 0.2, activation_bar_ratio = filter_rate):
    #   n0: en 0.9 -> en.  n4: en 0.8 -> en; de 0.2 is not > 0.2.  n5: de 0.7 -> de; en 0.1 no.
    assigned = assign_languages(p, selected, threshold)
    assert assigned[0].tolist() == [[True, False, False, False, True], [False] * 5]  # en: n0, n4
    assert assigned[1].tolist() == [[False] * 5, [True, False, False, False, False]]  # de: n5
    assert torch.equal(language_specific(p, 0.3, threshold), assigned)
    # A lower bar (activation_bar_ratio 0.5: round(20 x 0.5) = 10th smallest = 0.1) gives n4 to de as well:
    # a neuron can belong to several languages. n5's en 0.1 is not > 0.1.
    bar = probability_threshold(p, 0.5)
    assert bar == 0.1
    both = language_specific(p, 0.3, threshold, activation_bar=bar)
    assert both[:, 0, 4].tolist() == [True, True] and both[:, 1, 0].tolist() == [False, True]
    summary = neuron_summary(lape(p), both)
    assert summary.specific_per_language == [2, 2] and summary.active_neurons == 9  # n2 has no LAPE


def test_counts_use_pythons_round_and_ties_go_to_the_lower_index():
    assert rank_count(10, 0.25) == 2  # 2.5 rounds to even, as Python's round in identify.py
    assert rank_count(20, 0.95) == 19
    assert rank_count(10, 0.01) == 0  # no neuron selected, as topk(0)
    # k < 1 would fail kthvalue in identify.py; here it is kept at 1: the smallest probability
    assert probability_threshold(torch.tensor([[[0.3, 0.1]]]), 0.01) == pytest.approx(0.1)
    # four neurons with equal LAPE 0, quota round(4 x 0.5) = 2: the two lowest flat indices (layer-major)
    entropy = torch.tensor([[0.5, 0.0], [0.0, 0.0]])
    assert top_rate_selection(entropy, 0.5).tolist() == [[False, True], [True, False]]
    # +inf neurons fill the quota when too few are finite (topk with largest=False takes them too)
    entropy = torch.tensor([[INF, 0.2, INF, INF]])
    assert top_rate_selection(entropy, 0.5).tolist() == [[True, True, False, False]]


def intersect_rule(probability, lape_quantile, activation_quantile):
    """The rule this project used before: LAPE in the lowest `lape_quantile` (interpolated) of the active
    neurons AND a probability reaching the interpolated `activation_quantile` of all probabilities."""
    entropy = lape(probability)
    cut = quantile(entropy[~entropy.isnan()], lape_quantile)
    return (entropy <= cut) & (probability.max(dim=0).values >= quantile(probability, activation_quantile))


def test_the_old_intersect_rule_selects_fewer_neurons_than_the_published_one():
    p = example()
    # Old: active neurons' LAPE sorted [0 (n0), 0 (n3), 0 (n9), 0.3768, 0.5004, 0.5623, 0.6365 (n7), ln 2, ln 2];
    # its 0.3 quantile is at position 0.3 x 8 = 2.4 -> 0.4 x 0.3768 = 0.1507: n0, n3, n9. The probability
    # quantile 0.6 is at 0.6 x 19 = 11.4 -> 0.2 + 0.4 x 0.1 = 0.24: only n0 reaches it. The weak one-language
    # neurons n3 and n9 used up the LAPE quota before the activation filter: 1 neuron.
    old = intersect_rule(p, 0.3, 0.6)
    assert old.tolist() == [[True, False, False, False, False], [False] * 5]
    # Published: filter first (n3, n9 get +inf), then the quota of 3 over all neurons: n0, n4, n5.
    new = language_specific(p, 0.3, probability_threshold(p, 0.6)).any(dim=0)
    assert int(new.sum()) == 3 > int(old.sum()) and bool((old <= new).all())


def by_definition(p: list, top_rate: float, rate: float) -> set[tuple[int, int, int]]:
    """identify.py's steps in plain Python, from the published definition: (language, layer, neuron)."""
    languages, layers, neurons = len(p), len(p[0]), len(p[0][0])
    flat = sorted(x for lang in p for layer in lang for x in layer)
    threshold = flat[max(round(len(flat) * rate), 1) - 1]
    scored = []
    for i in range(layers):
        for j in range(neurons):
            column = [p[lang][i][j] for lang in range(languages)]
            total = sum(column)
            entropy = -sum(x / total * math.log(x / total) for x in column if x > 0) if total > 0 else 0.0
            if not any(x > threshold for x in column):
                entropy = INF
            scored.append((entropy, i * neurons + j))
    chosen = sorted(scored)[:round(layers * neurons * top_rate)]
    return {(lang, index // neurons, index % neurons) for _, index in chosen for lang in range(languages)
            if p[lang][index // neurons][index % neurons] > threshold}


@pytest.mark.parametrize("seed", range(5))
def test_matches_the_definition_on_random_statistics(seed):
    rng = random.Random(seed)
    # counts out of 50 tokens: ties and never-active neurons are common
    p = [[[rng.choice([0, 0, 1, 2, 5, 10, 20, 30, 45]) / 50 for _ in range(40)] for _ in range(3)] for _ in range(4)]
    tensor = torch.tensor(p, dtype=torch.float64)
    for top_rate, rate in ((0.05, 0.95), (0.1, 0.8), (0.3, 0.5)):
        got = language_specific(tensor, top_rate, probability_threshold(tensor, rate))
        assert {tuple(x) for x in got.nonzero().tolist()} == by_definition(p, top_rate, rate)
        selected = top_rate_selection(filtered_lape(tensor, probability_threshold(tensor, rate)), top_rate)
        assert int(selected.sum()) == round(3 * 40 * top_rate)  # exactly the rule's count


def test_own_and_dense_thresholds():
    dense = example()
    pruned = dense / 4  # the same pattern, every probability a quarter: LAPE is unchanged
    dense_threshold = probability_threshold(dense, 0.6)
    own_threshold = probability_threshold(pruned, 0.6)
    assert (dense_threshold, own_threshold) == (0.2, 0.05)
    # own: the same selection as the dense model's (n0, n4 for en; n5 for de)
    own = language_specific(pruned, 0.3, own_threshold)
    assert torch.equal(own, language_specific(dense, 0.3, dense_threshold))
    # dense: only n0 (en 0.225) exceeds 0.2; n4 (0.2) and n5 (0.175) get +inf. The quota of 3 is filled
    # with n0 and the +inf neurons of lowest index, n1 and n2, which exceed 0.2 nowhere: one neuron.
    selected = top_rate_selection(filtered_lape(pruned, dense_threshold), 0.3)
    assert selected.tolist() == [[True, True, True, False, False], [False] * 5]
    by_dense = language_specific(pruned, 0.3, dense_threshold)
    assert {tuple(x) for x in by_dense.nonzero().tolist()} == {(0, 0, 0)}


# -- through the neuron table -----------------------------------------------------------------------------

def trial(key: str, pruner: str = "wanda", calibration: str | None = "en"):
    from sweep.store.records import PlannedTrial

    dense = pruner == "dense"
    return PlannedTrial(model="m", pruner=pruner, sparsity="0" if dense else "0.5",
                        calibration=None if dense else calibration, seed=None if dense else 0, dense=dense,
                        key=key, name=f"m.{key}")


def statistics(tokens: int):
    """The example as counts: the probabilities x 100 active tokens out of `tokens` per language."""
    active = (example() * 100).round().to(torch.int64)
    return ["en", "de"], {"active": active, "tokens": torch.tensor([tokens, tokens])}


@pytest.mark.parametrize("threshold_from", ["own", "dense"])
def test_neuron_table_end_to_end(threshold_from):
    from sweep.results.analyses import AnalysisSettings, neuron_tables

    trials = [trial("dense", "dense"), trial("quarter"), trial("same", calibration="de")]
    # the dense model: the example; "quarter": the same counts out of 4x the tokens; "same": the dense statistics
    stats = {"dense": statistics(100), "quarter": statistics(400), "same": statistics(100)}
    quarter = stats["quarter"][1]
    assert torch.allclose(activation_probability(quarter["active"], quarter["tokens"]), example() / 4)
    settings = AnalysisSettings(lape_quantile=0.3, activation_quantile=0.6, threshold_from=threshold_from)
    neurons, hist = neuron_tables(trials, stats, settings)
    rows = neurons.select("key", "threshold_from", "threshold", "dense", "pruned", "survive", "vanish", "appear",
                          "specific_en", "specific_de").rows()
    own = ("quarter", "own", 0.05, 3, 3, 3, 0, 0, 2, 1)
    dense = ("quarter", "dense", 0.2, 3, 1, 1, 2, 0, 1, 0)
    assert rows == [("dense", "both", 0.2, 3, 3, 3, 0, 0, 2, 1),
                    *((own, dense) if threshold_from == "own" else (dense, own)),  # the study's setting first
                    ("same", "both", 0.2, 3, 3, 3, 0, 0, 2, 1)]
    assert neurons["active_neurons"].to_list() == [9] * 4
    assert hist.group_by("key").len().height == 3  # one histogram per trial, not per threshold reading


def test_neuron_table_refuses_an_unknown_threshold_reading():
    from sweep.results.analyses import AnalysisSettings, neuron_tables

    with pytest.raises(ValueError, match="threshold_from"):
        neuron_tables([], {}, AnalysisSettings(threshold_from="pruned"))


def test_existing_study_files_still_validate():
    from pydantic import ValidationError

    from sweep.study.schema import AnalysesSpec

    spec = AnalysesSpec.model_validate({"lape": {"enabled": True, "lape_quantile": 0.01, "activation_quantile": 0.95}})
    assert (spec.lape.lape_quantile, spec.lape.activation_quantile, spec.lape.threshold_from) == (0.01, 0.95, "own")
    assert AnalysesSpec.model_validate({"lape": {"threshold_from": "dense"}}).lape.threshold_from == "dense"
    with pytest.raises(ValidationError):
        AnalysesSpec.model_validate({"lape": {"threshold_from": "pruned"}})
