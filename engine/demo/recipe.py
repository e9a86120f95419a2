"""The demo models' recipe: plain dataclasses, free of torch imports, so checking the asset cache stays cheap."""
from __future__ import annotations

from dataclasses import dataclass

ARCHITECTURES = ("llama", "cohere")


@dataclass(frozen=True)
class ModelRecipe:
    name: str
    architecture: str  # "llama" or "cohere"
    # Sized for a 2-core AVX2 CPU without native bf16 (float32 training, ~6,000 tokens/s): a wider
    # model sees too few tokens in the time budget to pull clearly below the unigram baseline.
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2  # grouped-query attention, as in Llama-3 and Aya-23
    intermediate_size: int = 448
    max_position_embeddings: int = 512
    rope_theta: float = 500_000.0
    # Cohere only: its output logits are multiplied by this (Aya-23 uses 0.0625 at hidden 4096; a
    # hidden-128 model with tied embeddings would spend much of its short training growing its logits).
    logit_scale: float = 0.5

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.architecture!r}; expected one of {ARCHITECTURES}")


@dataclass(frozen=True)
class TrainRecipe:
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 450
    lr: float = 5e-3
    warmup_steps: int = 45
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    threads: int = 2
    precision: str = "auto"  # "auto": bf16 autocast where the CPU has native bf16, else float32

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_size * self.seq_len
