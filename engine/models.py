"""Loading a causal LM by hub id or local directory, the same way for both."""
from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSource:
    """`name_or_path` is a hub id (owner/name) or a local directory."""

    name_or_path: str
    revision: str | None = None
    dtype: str = "bfloat16"
    trust_remote_code: bool = False
    device: str = "cpu"


def load_model(source: ModelSource):
    """Returns (model, tokenizer), the model in eval mode on `source.device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        source.name_or_path, revision=source.revision, trust_remote_code=source.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        source.name_or_path,
        revision=source.revision,
        dtype=DTYPES[source.dtype],
        trust_remote_code=source.trust_remote_code,
    )
    model.to(source.device)
    model.eval()
    return model, tokenizer


def prefix_token_id(tokenizer) -> int:
    """The token that opens every evaluation window: BOS if the tokenizer has one, else EOS."""
    for candidate in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    raise ValueError("tokenizer has neither a BOS nor an EOS token to open evaluation windows with")
