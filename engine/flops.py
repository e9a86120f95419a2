"""Matrix-product FLOPs of a trial's stages for a decoder-only transformer (2 x m x n x k per product;
elementwise work left out). Used by benchmarks/gpu_trial.py to say how far each stage is from the GPU's
compute bound, and by `sweep plan --estimate` to turn that benchmark's measured rates into time."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Dims:
    hidden: int
    intermediate: int
    layers: int
    q_width: int  # attention heads x head dim
    kv_width: int  # key-value heads x head dim
    vocab: int

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(out, in) of one block's linear layers: q, k, v, o, gate, up, down."""
        h, m = self.hidden, self.intermediate
        return [(self.q_width, h), (self.kv_width, h), (self.kv_width, h), (h, self.q_width), (m, h), (m, h), (h, m)]

    def hessian_widths(self) -> list[int]:
        """Inputs with a Hessian of their own (q/k/v share one, gate/up share one)."""
        return [self.hidden, self.q_width, self.hidden, self.intermediate]


def block_forward(d: Dims, tokens: int, seq_len: int) -> float:
    linear = sum(2 * o * i for o, i in d.linear_shapes()) * tokens
    attention = 2 * 2 * tokens * (seq_len / 2) * d.q_width  # QK^T and AV over the causal half
    return linear + attention


def pruning(d: Dims, method: str, tokens: int, seq_len: int) -> float:
    """Calibration plus pruning of every block: each block runs twice over the calibration tokens
    (statistics, then the outputs the next block sees); SparseGPT adds its Hessians (2 x tokens x in^2
    each) and its column updates (about 2 x out x in^2 per linear)."""
    if method == "magnitude":
        return 0.0
    per_block = 2 * block_forward(d, tokens, seq_len)
    if method == "sparsegpt":
        per_block += sum(2 * tokens * w * w for w in d.hessian_widths())
        per_block += sum(2 * o * i * i for o, i in d.linear_shapes())
    return d.layers * per_block


def evaluation(d: Dims, tokens: int, seq_len: int) -> float:
    """Perplexity: a forward pass over `tokens` in windows of `seq_len`, with the output head."""
    return d.layers * block_forward(d, tokens, seq_len) + 2 * tokens * d.hidden * d.vocab
