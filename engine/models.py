"""Loading a causal LM by hub id or local directory, the same way for both."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.placement import ModelDoesNotFit, gpu_device_map

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSource:
    """`name_or_path` is a hub id (owner/name) or a local directory. On `device="cuda"` the model is
    loaded onto `gpus` GPUs (cuda:0..gpus-1 as the process sees them): whole on one, or split into runs
    of decoder blocks over several (engine.placement), after checking that its weights fit."""

    name_or_path: str
    revision: str | None = None
    dtype: str = "bfloat16"
    trust_remote_code: bool = False
    device: str = "cpu"
    gpus: int = 1


def load_model(source: ModelSource):
    """Returns (model, tokenizer), the model in eval mode on `source.device` (spread over `source.gpus`
    GPUs on CUDA). Raises engine.placement.ModelDoesNotFit before reading any weight when the model's
    weights cannot fit those GPUs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device_map = cuda_device_map(source) if torch.device(source.device).type == "cuda" else None
    tokenizer = AutoTokenizer.from_pretrained(
        source.name_or_path, revision=source.revision, trust_remote_code=source.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        source.name_or_path,
        revision=source.revision,
        dtype=DTYPES[source.dtype],
        trust_remote_code=source.trust_remote_code,
        **({"device_map": device_map} if device_map is not None else {}),
    )
    if device_map is None:
        model.to(source.device)
    model.eval()
    return model, tokenizer


def cuda_device_map(source: ModelSource) -> dict[str, int]:
    """The device map for loading onto the first `source.gpus` visible GPUs: {"": 0} for one GPU (no
    dispatch hooks), a block split for several. Reads only the model's config."""
    from transformers import AutoConfig

    wanted = max(1, source.gpus)
    visible = torch.cuda.device_count()
    if visible < wanted:
        raise ModelDoesNotFit(f"{source.name_or_path} is to be spread over {wanted} GPUs but this process sees "
                              f"{visible}: the actor must hold as many GPUs as the model's gpus")
    config = AutoConfig.from_pretrained(source.name_or_path, revision=source.revision,
                                        trust_remote_code=source.trust_remote_code)
    gpu_bytes = [torch.cuda.get_device_properties(i).total_memory for i in range(wanted)]
    device_map = gpu_device_map(config, DTYPES[source.dtype], gpu_bytes, source.trust_remote_code,
                                label=source.name_or_path)
    return {"": 0} if wanted == 1 else device_map


def prefix_token_id(tokenizer) -> int:
    """The token that opens every evaluation window: BOS if the tokenizer has one, else EOS."""
    for candidate in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    raise ValueError("tokenizer has neither a BOS nor an EOS token to open evaluation windows with")
