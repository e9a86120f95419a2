"""The layer-by-layer driver feeds every decoder block exactly what the model's own forward passes it.

At a sparsity that prunes nothing, the hidden state each block receives while it is being pruned (in the
statistics pass and in the pass that hands its output on) must equal `output_hidden_states` of a plain
forward, and the last block's output the model's own. Run on small random-weight models of every family
with per-layer-type arguments that the pinned transformers builds from a config, with calibration
sequences shorter and longer than the sliding window, and on the real Gemma 3 270M (slow).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    Cohere2Config,
    CohereConfig,
    Gemma2Config,
    Gemma3TextConfig,
    GptOssConfig,
    LlamaConfig,
    MinistralConfig,
    MistralConfig,
    Olmo3Config,
    Qwen3Config,
)

from engine.prune.block_inputs import (
    CalibrationBatch,
    ReplayMismatch,
    block_output_hidden,
    capture_block_inputs,
    check_replay,
)
from engine.prune.layers import find_decoder_layers
from engine.prune.pruners import make_pruner
from engine.prune.sequential import prune_sequentially
from engine.prune.sparsity import parse_sparsity

WINDOW = 8  # sliding window of the small models: calibration runs at 6 (inside it) and 24 tokens (past it)
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=8, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
              pad_token_id=0)
FAMILIES = {
    "llama": lambda: LlamaConfig(**COMMON),
    "cohere": lambda: CohereConfig(**COMMON),
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=WINDOW),
    # per-layer-type masks and rotary embeddings; the full-attention layers sit before the last block
    "cohere2": lambda: Cohere2Config(**COMMON, sliding_window=WINDOW),
    "qwen3-sliding": lambda: Qwen3Config(**COMMON, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=3),
    "gemma2": lambda: Gemma2Config(**COMMON, sliding_window=WINDOW),
    "gemma3": lambda: Gemma3TextConfig(**COMMON, sliding_window=WINDOW),
    "olmo3": lambda: Olmo3Config(**COMMON, sliding_window=WINDOW),
    "ministral": lambda: MinistralConfig(**COMMON, sliding_window=WINDOW,
                                         layer_types=["sliding_attention", "full_attention"] * 4),
    "gpt-oss": lambda: GptOssConfig(**COMMON, sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2),
}
NOTHING = parse_sparsity(1e-6)  # fewer than one weight per row: Wanda prunes nothing


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def driver_block_inputs(model, ids, attention_mask=None, batch_size=2):
    """Runs Wanda at a sparsity that prunes nothing and returns, per block, the hidden states it received
    in the statistics pass and in the hand-on pass (each concatenated over batches), and the last block's
    outputs in the hand-on pass."""
    _, blocks = find_decoder_layers(model)
    seen: list[list[torch.Tensor]] = [[] for _ in blocks]
    outputs: list[torch.Tensor] = []

    def record(index):
        def hook(_module, args, kwargs):
            seen[index].append((args[0] if args else kwargs["hidden_states"]).detach().clone())
        return hook

    handles = [block.register_forward_pre_hook(record(i), with_kwargs=True) for i, block in enumerate(blocks)]
    handles.append(blocks[-1].register_forward_hook(lambda _m, _a, out: outputs.append(block_output_hidden(out).clone())))
    try:
        report = prune_sequentially(model, make_pruner("wanda"), NOTHING, ids, attention_mask=attention_mask,
                                    batch_size=batch_size)
    finally:
        for handle in handles:
            handle.remove()
    assert all(r.sparsity == 0.0 for r in report.layers)
    batches = -(-ids.shape[0] // batch_size)
    statistics = [torch.cat(calls[-2 * batches:-batches]) for calls in seen]
    hand_on = [torch.cat(calls[-batches:]) for calls in seen]
    return statistics, hand_on, torch.cat(outputs[-batches:])


def own_forward(model, ids, attention_mask=None):
    """What every block receives in a plain forward (read by hooks), the last block's output, and
    `output_hidden_states` of the same forward."""
    _, blocks = find_decoder_layers(model)
    inputs: list[torch.Tensor] = []
    last: list[torch.Tensor] = []
    handles = [block.register_forward_pre_hook(
        lambda _m, args, kwargs: inputs.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
        for block in blocks]
    handles.append(blocks[-1].register_forward_hook(lambda _m, _a, out: last.append(block_output_hidden(out))))
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return inputs, last[0], out.hidden_states


def assert_fed_own_inputs(model, ids, attention_mask=None, tolerance=1e-5, batch_size=2):
    expected_inputs, expected_last, hidden_states = own_forward(model, ids, attention_mask)
    for index, expected in enumerate(expected_inputs):  # the hooks read what output_hidden_states reports
        assert torch.equal(expected, hidden_states[index]), index
    statistics, hand_on, last = driver_block_inputs(model, ids, attention_mask, batch_size)
    valid = (attention_mask.bool() if attention_mask is not None else torch.ones_like(ids, dtype=torch.bool))
    for index, expected in enumerate(expected_inputs):
        for name, got in (("statistics", statistics[index]), ("hand-on", hand_on[index])):
            assert relative(got[valid], expected[valid]) <= tolerance, (index, name, relative(got[valid], expected[valid]))
    assert relative(last[valid], expected_last[valid]) <= tolerance


def build(family: str, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(FAMILIES[family]()).eval()


@pytest.mark.parametrize("seq_len", [WINDOW - 2, 3 * WINDOW])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_blocks_are_fed_the_models_own_inputs(family, seq_len):
    model = build(family)
    ids = torch.randint(3, 128, (4, seq_len), generator=torch.Generator().manual_seed(1))
    assert_fed_own_inputs(model, ids)


@pytest.mark.parametrize("family", ["gemma3", "cohere2"])
def test_padded_calibration_batches_get_their_own_masks(family):
    model = build(family)
    ids = torch.randint(3, 128, (4, 3 * WINDOW), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    mask[3, 5:] = 0
    assert_fed_own_inputs(model, ids, attention_mask=mask)


def test_first_block_arguments_are_wrong_for_other_layer_types():
    """Why the driver records every block's own arguments: replaying the first block's (a sliding layer's
    mask and rotary embeddings) to a full-attention layer changes its output."""
    model = build("gemma3")
    _, blocks = find_decoder_layers(model)
    ids = torch.randint(3, 128, (2, 3 * WINDOW), generator=torch.Generator().manual_seed(3))
    captured = capture_block_inputs(model, blocks, [CalibrationBatch(ids)])
    full = model.config.layer_types.index("full_attention")
    hidden = captured.hidden[0]
    with torch.no_grad():
        for index in range(full):
            hidden = block_output_hidden(captured.calls[index][0].run(blocks[index], hidden))
        own = block_output_hidden(captured.calls[full][0].run(blocks[full], hidden))
        borrowed = block_output_hidden(captured.calls[0][0].run(blocks[full], hidden))
    assert relative(borrowed, own) > 1e-2


class _Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.proj = nn.Linear(width, width)

    def forward(self, hidden_states, scale):
        return hidden_states + self.proj(hidden_states) * scale


class _HandsOnBetweenBlocks(nn.Module):
    """A decoder whose forward changes the hidden state between blocks (as RWKV's rescaling does), so a
    block's input is not the previous block's output."""

    def __init__(self, width: int = 16, layers: int = 3):
        super().__init__()
        self.config = type("Config", (), {"num_hidden_layers": layers})()
        self.embed = nn.Embedding(32, width)
        self.layers = nn.ModuleList(_Block(width) for _ in range(layers))

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        hidden = self.embed(input_ids)
        for layer in self.layers:
            hidden = layer(hidden, scale=torch.ones(())) * 0.5
        return hidden


def test_a_model_whose_blocks_cannot_be_replayed_is_refused_before_any_weight_changes():
    torch.manual_seed(0)
    model = _HandsOnBetweenBlocks().eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ReplayMismatch, match="block 1 fed block by block differs from the model's own forward"):
        prune_sequentially(model, make_pruner("wanda"), parse_sparsity(0.5), ids)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_rwkv_is_refused():
    """RWKV rescales the hidden state between blocks, outside them: the driver cannot replay that and
    says so, instead of pruning on wrong statistics."""
    from transformers import RwkvConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(RwkvConfig(vocab_size=128, hidden_size=64, num_hidden_layers=8,
                                                        attention_hidden_size=64, intermediate_size=96,
                                                        rescale_every=2)).eval()
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ReplayMismatch, match="differs from the model's own forward"):
        prune_sequentially(model, make_pruner("wanda"), parse_sparsity(0.5), ids)


def test_check_replay_passes_on_an_exact_model():
    model = build("gemma3")
    _, blocks = find_decoder_layers(model)
    ids = torch.randint(3, 128, (1, 3 * WINDOW), generator=torch.Generator().manual_seed(4))
    assert check_replay(model, blocks, CalibrationBatch(ids)) <= 1e-6


# -- every causal-LM family the pinned transformers builds from a config -------------------------------

def _causal_lm_families() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=8, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=WINDOW,
            num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            n_routed_experts=4, shared_expert_intermediate_size=32, n_shared_experts=1, bos_token_id=1,
            eos_token_id=2, pad_token_id=0)


def tiny_model(model_type: str):
    """A small random-weight model of `model_type` from its config class's defaults shrunk by the common
    size fields, or None when the family cannot be built that way (or would be larger than 30M)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        config_class = CONFIG_MAPPING[model_type]
        defaults = config_class()
        sizes = {k: v for k, v in TINY.items() if hasattr(defaults, k)}
        layer_types = getattr(defaults, "layer_types", None)
        if layer_types:  # the family's own pattern of layer types, over the smaller depth
            sizes["layer_types"] = [layer_types[i % len(layer_types)] for i in range(TINY["num_hidden_layers"])]
        config = config_class(**sizes)
        with torch.device("meta"):
            if sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters()) > 30e6:
                return None
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        ids = torch.randint(3, 100, (2, 3 * WINDOW))
        with torch.no_grad():
            model(input_ids=ids, output_hidden_states=True, use_cache=False)
        find_decoder_layers(model)
    except Exception:  # noqa: BLE001 -- a family this generic recipe cannot build is skipped, not failed
        return None
    return model


@pytest.mark.slow
def test_every_buildable_family_is_fed_exactly_or_refused():
    """Over every causal-LM family the pinned transformers builds from a shrunk default config: the
    driver either feeds each block exactly what the model's forward does, or refuses with a clear error
    before pruning. Never silently different."""
    from engine.prune.layers import DecoderLayersNotFound

    exact, refused, skipped = [], {}, []
    for model_type in _causal_lm_families():
        model = tiny_model(model_type)
        if model is None:
            skipped.append(model_type)
            continue
        ids = torch.randint(3, 100, (2, 3 * WINDOW), generator=torch.Generator().manual_seed(1))
        try:
            expected_inputs, expected_last, _ = own_forward(model, ids)
            statistics, hand_on, last = driver_block_inputs(model, ids)
        except (ReplayMismatch, DecoderLayersNotFound, ValueError) as err:
            refused[model_type] = str(err)
            continue
        differences = [relative(got, want) for got, want in zip(hand_on, expected_inputs)]
        differences += [relative(got, want) for got, want in zip(statistics, expected_inputs)]
        differences.append(relative(last, expected_last))
        assert max(differences) <= 1e-5, (model_type, max(differences))
        exact.append(model_type)
    print(f"\n{len(exact)} families exact, {len(refused)} refused ({', '.join(sorted(refused))}), "
          f"{len(skipped)} not buildable from a shrunk config")
    assert len(exact) >= 110
    assert {"llama", "gemma2", "gemma3_text", "cohere2", "qwen3", "mistral", "gpt_oss", "olmo3"} <= set(exact)


# -- the real models ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_real_gemma3_blocks_are_fed_the_models_own_inputs(gemma3_270m):
    model, _ = gemma3_270m
    window = model.config.sliding_window
    for seq_len in (64, window + 88):  # inside and past its 512-token sliding window
        ids = torch.randint(10, 200_000, (2, seq_len), generator=torch.Generator().manual_seed(seq_len))
        assert_fed_own_inputs(model, ids, batch_size=1)
