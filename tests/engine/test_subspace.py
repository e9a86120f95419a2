"""The latent-subspace analysis: LSAR (both steps), the centroid and per-token SNR, the collector's token
sample and its statistics file (definitions in docs/analyses.md, "Latent subspaces")."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from engine.analyze import collect
from engine.analyze.collect import StatisticsCollector, load_statistics
from engine.analyze.metrics import lsar, subspace_snr, subspace_snrs, token_subspace_snrs
from engine.evaluate.perplexity import perplexity

# Three languages in four dimensions (one row per language):
#   m1 = (2, 1, 0, 0), m2 = (2, -1, 0, 0), m3 = (2, 0, 3, 0)
MEANS = torch.tensor([[2.0, 1.0, 0.0, 0.0], [2.0, -1.0, 0.0, 0.0], [2.0, 0.0, 3.0, 0.0]], dtype=torch.float64)
E = torch.eye(4, dtype=torch.float64)


def projector(basis: torch.Tensor) -> torch.Tensor:
    return basis @ basis.T


def test_lsar_step_one_by_hand():
    # mu = (2, 0, 1, 0); the centred means are c1 = (0, 1, -1, 0), c2 = (0, -1, -1, 0), c3 = (0, 0, 2, 0).
    # C C^T = diag(0, 2, 6, 0) (e2.e3 row product: -1 + 1 + 0 = 0), so the left singular vectors are
    # e3 (sigma sqrt 6) and e2 (sigma sqrt 2); Gamma = C^T M_s: on e3 (-1, -1, 2), on e2 (1, -1, 0).
    step1 = lsar(MEANS, rank=2, reestimate=False)
    assert torch.allclose(step1.mean, torch.tensor([2.0, 0.0, 1.0, 0.0], dtype=torch.float64))
    assert torch.allclose(step1.basis.abs(), torch.stack([E[2], E[1]], dim=1), atol=1e-12)
    assert torch.allclose(step1.coordinates.abs(), torch.tensor([[1.0, 1.0], [1.0, 1.0], [2.0, 0.0]],
                                                                dtype=torch.float64), atol=1e-12)
    # the decomposition is exact at r = L - 1, and step 1's mu is NOT orthogonal to M_s (mu . e3 = 1)
    assert torch.allclose(step1.mean[:, None] + step1.basis @ step1.coordinates.T, MEANS.T, atol=1e-12)
    assert float((step1.basis.T @ step1.mean).abs().max()) == pytest.approx(1.0)
    rank1 = lsar(MEANS, rank=1, reestimate=False)
    assert torch.allclose(projector(rank1.basis), projector(E[:, 2:3]), atol=1e-12)
    assert torch.allclose(rank1.coordinates.abs().squeeze(1), torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64))


def test_lsar_step_two_by_hand():
    # r = 1: M' = mu 1^T + e3 Gamma^T has columns (2,0,0,0), (2,0,0,0), (2,0,3,0). x = (M'^+)^T 1 lies in
    # col(M') = span(e1, e3) with x . M'_i = 1 for every column: x = (1/2, 0, 0, 0), so
    # mu' = x / ||x||^2 = (2, 0, 0, 0). M' - mu' 1^T has columns 0, 0, (0,0,3,0): M_s' = e3, Gamma' = (0, 0, 3).
    one = lsar(MEANS, rank=1)
    assert torch.allclose(one.mean, 2 * E[0], atol=1e-12)
    assert torch.allclose(projector(one.basis), projector(E[:, 2:3]), atol=1e-12)
    assert torch.allclose(one.basis @ one.coordinates.T, torch.tensor(
        [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 3.0], [0.0, 0.0, 0.0]], dtype=torch.float64), atol=1e-12)
    # r = 2: M' = M. x . m_i = 1: 2 x1 + x2 = 1, 2 x1 - x2 = 1, 2 x1 + 3 x3 = 1, so x = (1/2, 0, 0, 0) and
    # mu' = (2, 0, 0, 0) again. M' - mu' 1^T has columns (0,1,0,0), (0,-1,0,0), (0,0,3,0); its Gram matrix
    # is diag(0, 2, 9, 0): M_s' = [e3 (sigma 3), e2 (sigma sqrt 2)], Gamma' = [(0, 0, 3), (1, -1, 0)].
    two = lsar(MEANS, rank=2)
    assert torch.allclose(two.mean, 2 * E[0], atol=1e-12)
    assert torch.allclose(two.basis.abs(), torch.stack([E[2], E[1]], dim=1), atol=1e-12)
    assert torch.allclose(two.coordinates.abs(), torch.tensor([[0.0, 1.0], [0.0, 1.0], [3.0, 0.0]],
                                                              dtype=torch.float64), atol=1e-12)
    # what step 2 is for: mu' orthogonal to M_s', and M' = mu' 1^T + M_s' Gamma'^T exactly
    assert float((two.basis.T @ two.mean).abs().max()) < 1e-12
    assert torch.allclose(two.mean[:, None] + two.basis @ two.coordinates.T, MEANS.T, atol=1e-12)


def test_lsar_step_two_keeps_the_span_and_orthogonalises_mu_on_random_means():
    means = torch.randn(7, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 3
    for rank in (1, 3, 6):
        step1, both = lsar(means, rank, reestimate=False), lsar(means, rank)
        assert both.basis.shape == (32, rank)
        assert torch.allclose(both.basis.T @ both.basis, torch.eye(rank, dtype=torch.float64), atol=1e-10)
        assert torch.allclose(projector(step1.basis), projector(both.basis), atol=1e-10)
        assert float((both.basis.T @ both.mean).abs().max()) < 1e-10
        # mu' is the point of mu + span(M_s) nearest the origin
        assert torch.allclose(both.mean, step1.mean - projector(step1.basis) @ step1.mean, atol=1e-10)
    assert lsar(means, rank=50).basis.shape == (32, 6)  # capped at the rank of the centred means


def test_centroid_snr_by_hand():
    # the rank-1 LSAR subspace of MEANS is span(e3) (test above). Per language, P_s = e3 e3^T, P_a = I - P_s:
    #   l1: dense (2, 1, 0, 0), pruned (2, 1.1, 0.2, 0): agnostic 10 log10(5 / 0.01) = 26.99 dB;
    #       specific: no signal (||P_s m1|| = 0) against noise 0.04
    #   l2: pruned = dense: +inf in both
    #   l3: dense (2, 0, 3, 0), pruned (2.2, 0, 2.9, 0.1): specific 10 log10(9 / 0.01) = 29.54 dB,
    #       agnostic 10 log10(4 / (0.04 + 0.01)) = 19.03 dB
    pruned = torch.tensor([[2.0, 1.1, 0.2, 0.0], [2.0, -1.0, 0.0, 0.0], [2.2, 0.0, 2.9, 0.1]], dtype=torch.float64)
    rows = subspace_snrs(MEANS[:, None], pruned[:, None], rank=1)
    assert [(i, layer, rank) for i, layer, _, _, rank in rows] == [(0, 0, 1), (1, 0, 1), (2, 0, 1)]
    (_, _, s1, a1, _), (_, _, s2, a2, _), (_, _, s3, a3, _) = rows
    assert s1 < -200 and a1 == pytest.approx(10 * math.log10(500))
    assert s2 == a2 == math.inf
    assert s3 == pytest.approx(10 * math.log10(900)) and a3 == pytest.approx(10 * math.log10(80))


def test_token_snr_by_hand():
    # basis e3 (rank-1 LSAR of MEANS). Language 0, two tokens:
    #   h_d(1) = (1, 0, 2, 0), h_p(1) = (1, 0, 2.2, 0)       noise (0, 0, 0.2, 0)
    #   h_d(2) = (0, 1, 1, 0), h_p(2) = (0.1, 1, 0.9, 0)     noise (0.1, 0, -0.1, 0)
    # specific: (4 + 1) / (0.04 + 0.01) = 100 -> 20 dB; agnostic: (1 + 1) / 0.01 = 200 -> 23.01 dB.
    # Language 1 counts only its first token: specific 4 / 0.04 -> 20 dB, agnostic: no noise -> +inf.
    # Language 2 has no tokens: left out.
    dense = torch.zeros(3, 1, 2, 4, dtype=torch.float64)
    dense[0, 0] = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 1.0, 1.0, 0.0]])
    dense[1, 0] = dense[0, 0]
    pruned = dense.clone()
    pruned[0, 0] = torch.tensor([[1.0, 0.0, 2.2, 0.0], [0.1, 1.0, 0.9, 0.0]])
    pruned[1, 0] = pruned[0, 0]
    rows = token_subspace_snrs(MEANS[:, None], dense, pruned, counts=[2, 1, 0], rank=1)
    assert [(i, layer, rank) for i, layer, _, _, rank in rows] == [(0, 0, 1), (1, 0, 1)]
    assert rows[0][2] == pytest.approx(20.0) and rows[0][3] == pytest.approx(10 * math.log10(200))
    assert rows[1][2] == pytest.approx(20.0) and rows[1][3] == math.inf
    # a single token is a centroid: the two SNRs agree there
    basis = lsar(MEANS, 1).basis
    assert subspace_snr(dense[0, 0, 0], pruned[0, 0, 0], basis) == subspace_snr(dense[0, 0, :1], pruned[0, 0, :1], basis)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def pruned_copy(model):
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for layer in pruned.model.layers:
            weight = layer.mlp.down_proj.weight
            weight[weight.abs() < weight.abs().median()] = 0
    return pruned


def evaluate(model, ids, batch_size, token_sample):
    collector = StatisticsCollector(model, token_sample=token_sample)
    with collector.collect("en"):
        perplexity(model, ids, len(ids), window=8, prefix_id=1, batch_size=batch_size)
    return collector


def test_the_sample_is_the_same_tokens_in_every_trial(monkeypatch):
    monkeypatch.setattr(collect, "TOKEN_STRIDE", 3)
    model = tiny_llama()
    ids = torch.randint(2, 64, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    # windows of 8: the prefix 1 and 7 text tokens each; the prefixes left out, the stream is `ids` itself
    dense = evaluate(model, ids, batch_size=4, token_sample=5).samples["en"]
    other = evaluate(pruned_copy(model), ids, batch_size=1, token_sample=5).samples["en"]
    assert dense.positions == other.positions == [0, 3, 6, 9, 12]
    assert dense.ids == other.ids == [ids[k] for k in (0, 3, 6, 9, 12)]
    for layer in range(2):
        a, b = torch.cat(dense.hidden[layer]), torch.cat(other.hidden[layer])
        assert a.shape == b.shape == (5, 16) and not torch.allclose(a, b)
    # and they are layer 0's outputs at those tokens (hidden_states[1]; the last entry of hidden_states is
    # after the final norm): position k is window k // 7, place 1 + k % 7
    with torch.no_grad():
        for row, k in enumerate((0, 3, 6, 9, 12)):
            window = [1, *ids[7 * (k // 7): 7 * (k // 7) + 7]]
            out = model(input_ids=torch.tensor([window]), output_hidden_states=True)
            assert torch.allclose(torch.cat(dense.hidden[0])[row], out.hidden_states[1][0, 1 + k % 7], atol=1e-5)


def test_the_sample_skips_padding_and_each_rows_prefix(monkeypatch):
    monkeypatch.setattr(collect, "TOKEN_STRIDE", 3)
    model = tiny_llama()
    generator = torch.Generator().manual_seed(3)
    a, b = torch.randint(2, 64, (9,), generator=generator), torch.randint(2, 64, (5,), generator=generator)
    rows = [torch.cat([torch.tensor([1]), a]), torch.cat([torch.tensor([1]), b])]
    padded = torch.zeros(2, 10, dtype=torch.long)
    mask = torch.zeros(2, 10, dtype=torch.long)
    for i, row in enumerate(rows):
        padded[i, : len(row)], mask[i, : len(row)] = row, 1
    together, apart = StatisticsCollector(model, token_sample=4), StatisticsCollector(model, token_sample=4)
    with torch.no_grad():
        with together.collect("en"):
            model(input_ids=padded, attention_mask=mask)
        with apart.collect("en"):
            for row in rows:
                model(input_ids=row[None], attention_mask=torch.ones(1, len(row), dtype=torch.long))
    # the stream a1..a9 b1..b5 (no prefix, no padding); every third: a1, a4, a7, then b1 (k = 9)
    s, t = together.samples["en"], apart.samples["en"]
    assert s.positions == t.positions == [0, 3, 6, 9]
    assert s.ids == t.ids == [int(a[0]), int(a[3]), int(a[6]), int(b[0])]
    for layer in range(2):
        assert torch.allclose(torch.cat(s.hidden[layer]), torch.cat(t.hidden[layer]), atol=1e-5)


def test_statistics_round_trip_with_and_without_the_sample(tmp_path, monkeypatch):
    monkeypatch.setattr(collect, "TOKEN_STRIDE", 3)
    model = tiny_llama()
    ids = torch.randint(2, 64, (20,), generator=torch.Generator().manual_seed(4)).tolist()
    # 20 tokens, stride 3: k = 0, 3, ..., 18 gives 7 of the 10 asked; the rest is padding (-1 and zeros)
    with_sample = evaluate(model, ids, batch_size=2, token_sample=10)
    languages, tensors = load_statistics(with_sample.save(tmp_path / "with.safetensors"))
    assert languages == ["en"]
    assert tensors["token_sample"].shape == (1, 2, 10, 16) and tensors["token_sample"].dtype == torch.float32
    assert tensors["token_sample_count"].tolist() == [7]
    assert tensors["token_sample_positions"].tolist() == [[0, 3, 6, 9, 12, 15, 18, -1, -1, -1]]
    assert tensors["token_sample_ids"][0, :7].tolist() == ids[0::3] and tensors["token_sample_ids"][0, 7:].eq(-1).all()
    sample = with_sample.samples["en"]
    for layer in range(2):
        assert torch.equal(tensors["token_sample"][0, layer, :7], torch.cat(sample.hidden[layer]))
    assert not tensors["token_sample"][0, :, 7:].any()
    assert tensors["hidden_mean"].shape == (1, 2, 16) and "active" in tensors
    # no sample: the file is the older one, and loads the same way
    without = evaluate(model, ids, batch_size=2, token_sample=0)
    assert without.samples == {}
    _, old = load_statistics(without.save(tmp_path / "without.safetensors"))
    assert not any(name.startswith("token_sample") for name in old)
    assert torch.equal(old["hidden_mean"], tensors["hidden_mean"])
    # a bfloat16 model's sample stays bfloat16 (lossless)
    half = evaluate(tiny_llama().to(torch.bfloat16), ids, batch_size=2, token_sample=10)
    _, tensors16 = load_statistics(half.save(tmp_path / "bf16.safetensors"))
    assert tensors16["token_sample"].dtype == torch.bfloat16 and tensors16["hidden_mean"].dtype == torch.float32


def test_snr_table_has_both_variants_and_lists_trials_without_a_sample(tmp_path, monkeypatch):
    from sweep.results.analyses import AnalysisSettings, snr_table
    from sweep.store.records import PlannedTrial

    monkeypatch.setattr(collect, "TOKEN_STRIDE", 3)
    model, ids = tiny_llama(), torch.randint(2, 64, (30,), generator=torch.Generator().manual_seed(5)).tolist()
    pruned = pruned_copy(model)

    def statistics(m, name, token_sample):
        collector = StatisticsCollector(m, token_sample=token_sample)
        for language, text in (("de", ids), ("en", ids[::-1])):
            with collector.collect(language):
                perplexity(m, text, len(text), window=8, prefix_id=1, batch_size=2)
        return load_statistics(collector.save(tmp_path / f"{name}.safetensors"))

    def trial(key, dense):
        return PlannedTrial(model="tiny", pruner="dense" if dense else "wanda", sparsity="0" if dense else "0.5",
                            calibration=None if dense else "en", seed=0, dense=dense, key=key, name=key)

    stats = {"d": statistics(model, "d", 4), "p": statistics(pruned, "p", 4), "old": statistics(pruned, "old", 0)}
    table = snr_table([trial("d", True), trial("p", False), trial("old", False)], stats, AnalysisSettings(subspace_rank=1))
    assert set(table.columns) >= {"variant", "rank", "tokens", "snr_specific_db", "snr_agnostic_db", "target", "layer"}
    assert table["rank"].unique().to_list() == [1]
    counts = {(row["name"], row["variant"]): row for row in table.iter_rows(named=True)}
    assert {key for key in counts} == {("p", "centroid"), ("p", "token"), ("old", "centroid")}
    tokens = table.filter(table["variant"] == "token")
    assert tokens.height == 2 * 2 and tokens["tokens"].to_list() == [4] * 4  # 2 languages x 2 layers
    expected = token_subspace_snrs(stats["d"][1]["hidden_mean"], stats["d"][1]["token_sample"],
                                   stats["p"][1]["token_sample"], [4, 4], rank=1)
    assert tokens.select("snr_specific_db", "snr_agnostic_db").rows() == [(s, a) for _, _, s, a, _ in expected]
    # a sample of other tokens than the dense one's is not compared
    languages, mismatched = stats["p"]
    mismatched = {**mismatched, "token_sample_ids": mismatched["token_sample_ids"] + 1}
    table = snr_table([trial("d", True), trial("p", False)], {"d": stats["d"], "p": (languages, mismatched)},
                      AnalysisSettings())
    assert table["variant"].unique().to_list() == ["centroid"]


@pytest.mark.parametrize("subspace, expected", [({"enabled": True, "rank": None}, 32),
                                                ({"enabled": True, "rank": 2, "token_sample": 0}, 0),
                                                ({"enabled": False, "token_sample": 16}, 0),
                                                ({"enabled": True, "token_sample": 16}, 16)])
def test_the_study_option_reaches_the_trial_config_and_keeps_the_keys(tmp_path, hub_study, subspace, expected):
    from sweep.study.grid import expand
    from sweep.study.load import load_study
    from sweep.study.trials import trial_config
    from tests.conftest import write_study

    plain = expand(load_study(write_study(tmp_path, hub_study, name="plain.yaml"))).trials
    study = load_study(write_study(tmp_path, {**hub_study, "analyses": {"subspace": subspace}}))
    trials = expand(study).trials
    assert [t.key for t in trials] == [t.key for t in plain]  # an analysis option, not part of the keys
    for trial in trials[:2]:
        config = trial_config(study, trial)
        assert config.token_sample == expected and config.collect_statistics == subspace["enabled"]


def test_a_trial_keeps_the_sample_it_was_configured_with(tmp_path_factory):
    from engine.data.sources import TextSourceConfig
    from engine.demo import DemoRecipe, ensure_demo_assets
    from engine.models import ModelSource
    from engine.trial import (
        CalibrationConfig,
        EvaluationConfig,
        PerplexityConfig,
        PruningConfig,
        TrialConfig,
        load,
        run_trial,
    )

    assets = ensure_demo_assets(tmp_path_factory.mktemp("tiny") / "demo", DemoRecipe.tiny(), log=lambda _m: None)
    loaded = load(ModelSource(str(assets.model_dirs["demo-llama"]), dtype="float32"))
    corpus = TextSourceConfig(kind="local", path=assets.corpus_dir, split="evaluation")
    evaluation = EvaluationConfig(languages=("en", "sw"), perplexity=PerplexityConfig(corpus, window=64, max_tokens=512))
    calibration = CalibrationConfig(TextSourceConfig(kind="local", path=assets.corpus_dir, split="calibration"),
                                    (("sw", 1.0),), samples=8, seq_len=32, seed=0)
    stats = {}
    for name, pruning in (("dense", None), ("pruned", PruningConfig("wanda", "0.5"))):
        out = tmp_path_factory.mktemp(name)
        run_trial(TrialConfig(key=name, name=name, evaluation=evaluation, pruning=pruning,
                              calibration=calibration if pruning else None, artifacts_dir=out,
                              collect_statistics=True, token_sample=3), loaded)
        stats[name] = load_statistics(out / "statistics.safetensors")[1]
    dense, pruned = stats["dense"], stats["pruned"]
    # 512 tokens per language, stride 127: k = 0, 127, 254 (the windows' prefixes not counted)
    assert dense["token_sample_positions"].tolist() == [[0, 127, 254]] * 2
    assert torch.equal(dense["token_sample_ids"], pruned["token_sample_ids"])
    assert dense["token_sample"].shape[:3] == (2, dense["hidden_mean"].shape[1], 3)
    rows = token_subspace_snrs(dense["hidden_mean"], dense["token_sample"], pruned["token_sample"], [3, 3])
    assert rows and all(math.isfinite(s) and math.isfinite(a) for _, _, s, a, _ in rows)
