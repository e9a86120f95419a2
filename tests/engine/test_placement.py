"""Models larger than one GPU: block-wise device maps, the fit check, and layer-by-layer pruning of a
model whose blocks live on two devices.

The split-pruning tests use two CUDA GPUs when there are two, one GPU and the CPU when there is one,
and the CPU twice otherwise (then only the bookkeeping is exercised, not the moves)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, CohereConfig, LlamaConfig

from engine.evaluate.perplexity import perplexity
from engine.models import ModelSource, cuda_device_map
from engine.placement import GIB, ModelDoesNotFit, ModuleSize, gpu_device_map, module_sizes, split_contiguous
from engine.prune.layers import find_decoder_layers, move
from engine.prune.pruners import make_pruner
from engine.prune.sequential import devices_of, prune_sequentially
from engine.prune.sparsity import parse_sparsity

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
LLAMA3_70B = dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                  num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False)
SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def test_split_is_contiguous_and_balanced():
    sizes = [ModuleSize("embed", 10), *[ModuleSize(f"layers.{i}", 5) for i in range(8)],
             ModuleSize("norm", 1), ModuleSize("head", 10)]
    placement = split_contiguous(sizes, [100, 100], first=["embed"], last=["norm", "head"])
    # device 0: embed + 4 blocks = 30; device 1: 4 blocks + norm + head = 31 (5 blocks on 0 would give 35)
    assert [placement[f"layers.{i}"] for i in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert placement["embed"] == 0 and placement["norm"] == placement["head"] == 1


def test_split_over_four_devices_uses_each_in_order():
    sizes = [ModuleSize("embed", 4), *[ModuleSize(f"layers.{i}", 4) for i in range(12)], ModuleSize("head", 4)]
    placement = split_contiguous(sizes, [20] * 4, first=["embed"], last=["head"])
    runs = [placement[f"layers.{i}"] for i in range(12)]
    assert runs == sorted(runs) and set(runs) == {0, 1, 2, 3}
    loads = [sum(s.bytes for s in sizes if placement[s.name] == d) for d in range(4)]
    assert max(loads) == 16


def test_split_refuses_what_does_not_fit_with_numbers():
    sizes = [ModuleSize("embed", GIB), *[ModuleSize(f"layers.{i}", 2 * GIB) for i in range(4)], ModuleSize("head", GIB)]
    with pytest.raises(ModelDoesNotFit, match=r"needs 10.0 GiB .* can hold 8.0 GiB .*more gpus"):
        split_contiguous(sizes, [4 * GIB, 4 * GIB], first=["embed"], last=["head"], label="m")
    # enough in total, but blocks cannot be cut: 3 GiB capacities cannot take embed+block (3) and two blocks (4)
    with pytest.raises(ModelDoesNotFit, match="contiguous blocks over 4 GPU"):
        split_contiguous(sizes, [int(2.5 * GIB)] * 4, first=["embed"], last=["head"], label="m")


def test_llama3_maps_at_real_shapes_without_reading_weights():
    """The fit check runs on a weightless copy: Llama-3 70B (141 GB of bf16 weights) does not fit two
    80 GiB GPUs with activation headroom, and fits four; 8B fits one."""
    gpu = 80 * GIB
    one = gpu_device_map(LlamaConfig(**LLAMA3_8B), torch.bfloat16, [gpu])
    assert set(one.values()) == {0}
    with pytest.raises(ModelDoesNotFit, match="131.4 GiB"):
        gpu_device_map(LlamaConfig(**LLAMA3_70B), torch.bfloat16, [gpu] * 2, label="llama3-70b")
    four = gpu_device_map(LlamaConfig(**LLAMA3_70B), torch.bfloat16, [gpu] * 4)
    blocks = [four[f"model.layers.{i}"] for i in range(80)]
    assert blocks == sorted(blocks) and set(blocks) == {0, 1, 2, 3}
    assert four["model.embed_tokens"] == 0 and four["lm_head"] == four["model.norm"] == 3
    assert set(four) == {"model.embed_tokens", "model.rotary_emb", "model.norm", "lm_head",
                         *[f"model.layers.{i}" for i in range(80)]}


def test_tied_head_stays_with_the_embeddings():
    sizes, first, last = module_sizes(AutoModelForCausalLM.from_config(CohereConfig(**SMALL)))
    assert "lm_head" in first and "model.norm" in last
    assert {s.name: s.bytes for s in sizes}["lm_head"] == 0  # its weight is the embeddings', counted once
    placement = gpu_device_map(CohereConfig(**SMALL), torch.float32, [2**20] * 2)
    assert placement["lm_head"] == placement["model.embed_tokens"] == 0


def test_cuda_load_checks_the_gpus_it_sees(tmp_path):
    if torch.cuda.device_count() >= 2:
        pytest.skip("needs a machine with fewer than 2 GPUs")
    with pytest.raises(ModelDoesNotFit, match=f"over 2 GPUs but this process sees {torch.cuda.device_count()}"):
        cuda_device_map(ModelSource(str(tmp_path), device="cuda", gpus=2))


def two_devices() -> list[torch.device]:
    if torch.cuda.device_count() >= 2:
        return [torch.device("cuda", 0), torch.device("cuda", 1)]
    if torch.cuda.is_available():
        return [torch.device("cuda", 0), torch.device("cpu")]
    return [torch.device("cpu"), torch.device("cpu")]


def spread(model: nn.Module, devices: list[torch.device]) -> nn.Module:
    """Half the blocks on each device, inputs moved to each module's device on the way in, as a device
    map's dispatch hooks do; the embeddings on the first device, the final norm and head on the second."""
    _, blocks = find_decoder_layers(model)
    half = len(blocks) // 2
    placed = [(block, devices[0] if i < half else devices[1]) for i, block in enumerate(blocks)]
    placed += [(model.model.norm, devices[1]), (model.lm_head, devices[1])]
    model.model.embed_tokens.to(devices[0])
    model.model.rotary_emb.to(devices[0])
    for module, device in placed:
        module.to(device)
        module.register_forward_pre_hook(lambda m, args, kwargs, d=device: (move(args, d), move(kwargs, d)),
                                         with_kwargs=True)
    return model


def build(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(LlamaConfig(**SMALL)).eval()


@pytest.mark.parametrize("method,sparsity", [("wanda", "0.5"), ("sparsegpt", "2:4")])
def test_model_on_two_devices_prunes_block_by_block_like_one(method, sparsity):
    devices = two_devices()
    calibration = torch.randint(3, 96, (6, 32), generator=torch.Generator().manual_seed(1))
    whole = build().to(devices[0])
    split = spread(build(), devices)
    _, blocks = find_decoder_layers(split)
    before = [devices_of(b) for b in blocks]
    pruner = make_pruner(method, {})
    one = prune_sequentially(whole, pruner, parse_sparsity(sparsity), calibration, keep_masks=True)
    two = prune_sequentially(split, pruner, parse_sparsity(sparsity), calibration, keep_masks=True,
                             device=devices[0])  # `device` is ignored for a spread model: blocks stay put
    assert [devices_of(b) for b in blocks] == before
    assert [r.name for r in one.layers] == [r.name for r in two.layers]
    for name, mask in one.masks.items():
        agreement = (mask == two.masks[name]).float().mean().item()
        # same device kinds: bit for bit; a CUDA half against a CPU half may differ on near-ties only
        assert agreement == 1.0 if devices[0].type == devices[1].type else agreement > 0.99, name
    ids = torch.randint(3, 96, (300,), generator=torch.Generator().manual_seed(2)).tolist()
    ppl_one = perplexity(whole, ids, 300, window=64, prefix_id=1).token_perplexity
    ppl_two = perplexity(split, ids, 300, window=64, prefix_id=1).token_perplexity
    assert ppl_two == pytest.approx(ppl_one, rel=1e-3)


def test_offloaded_weights_are_refused():
    model = build()
    _, blocks = find_decoder_layers(model)
    blocks[1].to("meta")
    with pytest.raises(ValueError, match="offloaded"):
        prune_sequentially(model, make_pruner("magnitude", {}), parse_sparsity("0.5"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_load_onto_gpu_through_the_device_map(tmp_path):
    from engine.models import load_model

    build().save_pretrained(tmp_path / "m")
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
                            unk_token="<unk>").save_pretrained(tmp_path / "m")
    model, _ = load_model(ModelSource(str(tmp_path / "m"), dtype="float32", device="cuda", gpus=1))
    assert {p.device.type for p in model.parameters()} == {"cuda"}


def test_sweep_run_refuses_a_model_too_large_for_its_accelerator_before_starting(tmp_path, capsys):
    """Llama-3 70B (config only) on 2 H100s: `sweep run` exits 2 naming models[0].gpus, before any Ray
    or study directory; on 4 it passes the check; without accelerator_type it is left to the worker."""
    import json

    import yaml

    from sweep.cli.main import main
    from sweep.plan.fit import check_model_fit
    from sweep.study.load import load_study

    folder = tmp_path / "llama3-70b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**LLAMA3_70B, "model_type": "llama",
                                                    "architectures": ["LlamaForCausalLM"]}))
    text = tmp_path / "text" / "en"
    text.mkdir(parents=True)
    (text / "a.txt").write_text("words " * 100)
    study = {"name": "big", "models": [{"name": "l70", "path": str(folder), "gpus": 2, "accelerator_type": "H100"}],
             "calibration": {"source": {"kind": "hub", "dataset": "allenai/c4", "config": "{mc4}", "revision": "r"},
                             "languages": ["en"], "samples": 8, "seq_len": 128},
             "pruners": [{"method": "wanda", "sparsity": 0.5}],
             "evaluation": {"languages": ["en"], "perplexity": {"source": {"kind": "local", "path": str(tmp_path / "text")}}},
             "execution": {"output_dir": str(tmp_path / "runs" / "{study}")}}
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(study))
    assert main(["run", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "models[0].gpus: l70 on 2 x H100 (79.6 GiB) needs 131.4 GiB for its weights" in err
    assert not (tmp_path / "runs").exists()
    study["models"][0]["gpus"] = 4
    path.write_text(yaml.safe_dump(study))
    assert check_model_fit(load_study(path)) == ([], [])
    del study["models"][0]["accelerator_type"]
    path.write_text(yaml.safe_dump(study))
    assert check_model_fit(load_study(path)) == ([], [])
