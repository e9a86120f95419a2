"""`sweep plan --estimate`: parameter counts from configs, and the memory warnings."""
from __future__ import annotations

import pytest

from sweep.estimate import ModelShape, estimate_memory, format_estimates

LLAMA3_8B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
             "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False}
LLAMA3_70B = {**LLAMA3_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
              "num_attention_heads": 64}


def test_parameter_counts_of_the_reference_models():
    # the published sizes of Meta-Llama-3-8B and -70B
    assert ModelShape.from_config(LLAMA3_8B).parameters == 8_030_261_248
    assert ModelShape.from_config(LLAMA3_70B).parameters == 70_553_706_496


@pytest.mark.slow
def test_parameter_counts_of_the_demo_models_match_the_loaded_models():
    import json

    from transformers import AutoModelForCausalLM

    from engine.demo import ensure_demo_assets

    assets = ensure_demo_assets(log=print)
    for name, folder in assets.model_dirs.items():
        config = json.loads((folder / "config.json").read_text())
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert ModelShape.from_config(config).parameters == sum(p.numel() for p in model.parameters()), name


def test_memory_warnings():
    shape = ModelShape.from_config(LLAMA3_70B)
    fits = estimate_memory("llama3-70b", shape, "bfloat16", 4, 128, 2048, 2048, 8, sparsegpt=True)
    assert 131 < fits.weights_gib < 132  # 70.55e9 x 2 bytes
    assert fits.pruning_gib == pytest.approx((2 * 128 * 2048 * 8192 * 2 + 3 * 28672**2 * 4) / 2**30)
    _, problems = format_estimates([fits], 80)
    assert problems == []
    squeezed = estimate_memory("llama3-70b", shape, "bfloat16", 1, 128, 2048, 2048, 8, sparsegpt=True)
    table, problems = format_estimates([squeezed], 80)
    assert "70,553,706,496" in table and "raise its gpus to 3" in problems[0]
