"""Where a model's weights go: one device, or whole decoder blocks spread over several GPUs.

A model larger than one GPU is split into contiguous runs of decoder blocks, one run per GPU, with
the embeddings on the first GPU and the final norm and output head on the last (or on the first when
the head is tied to the embeddings). Nothing is ever offloaded to CPU or disk: pruning changes
weights in place, and offloaded weights are reloaded from their files at every forward, so a model
that does not fit its GPUs is refused before any weight is read, with the numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
WEIGHT_SHARE = 0.8  # of each GPU's memory, for weights; the rest holds calibration activations,
                    # Hessians and evaluation logits (see sweep.plan.estimate for those sizes)


class ModelDoesNotFit(RuntimeError):
    """The model's weights cannot be placed on the GPUs its actor holds."""


@dataclass(frozen=True)
class ModuleSize:
    name: str  # module path, e.g. model.layers.3
    bytes: int


def split_contiguous(sizes: list[ModuleSize], capacities: list[int], first: list[str], last: list[str],
                     label: str = "the model") -> dict[str, int]:
    """Assigns each module in `sizes` (decoder blocks, in order) to a device index so that every
    device gets a contiguous run and the most loaded device carries as little as possible.
    `first` modules (embeddings) go to device 0 and `last` (final norm, head) to the last device; both
    count against those devices' capacities. Raises ModelDoesNotFit when the weights exceed what the
    devices can take."""
    by_name = {m.name: m.bytes for m in sizes}
    blocks = [m for m in sizes if m.name not in first and m.name not in last]
    n = len(capacities)
    if n == 0:
        raise ValueError("no devices to place the model on")
    total = sum(by_name.values())
    if total > sum(capacities):
        raise ModelDoesNotFit(
            f"{label} needs {_size(total)} for its weights; its {n} GPU(s) can hold "
            f"{_size(sum(capacities))} of weights ({WEIGHT_SHARE:.0%} of their memory, the rest is kept "
            "for activations): give the model more gpus (or an accelerator_type with larger GPUs) in the study file")
    fixed = [0] * n
    fixed[0] += sum(by_name[name] for name in first)
    fixed[-1] += sum(by_name[name] for name in last)

    # Smallest per-device load (blocks plus fixed modules) under which a greedy left-to-right fill fits.
    def fill(limit: int) -> list[int] | None:
        device, load, out = 0, fixed[0], []
        for block in blocks:
            while load + block.bytes > min(limit, capacities[device]):
                device += 1
                if device == n:
                    return None
                load = fixed[device]
            out.append(device)
            load += block.bytes
        return out if all(fixed[d] <= capacities[d] for d in range(n)) else None

    low, high = max([b.bytes for b in blocks] + fixed), max(capacities)
    best = fill(high)
    if best is None:
        raise ModelDoesNotFit(
            f"{label}: its weights ({_size(total)}) cannot be split into contiguous blocks over {n} GPU(s) of "
            f"{_size(min(capacities))} for weights each: give the model more gpus (or an accelerator_type with larger GPUs) in the study file")
    while low < high:  # bisect the largest load a device may carry
        middle = (low + high) // 2
        trial = fill(middle)
        if trial is None:
            low = middle + 1
        else:
            best, high = trial, middle
    placement = {block.name: device for block, device in zip(blocks, best)}
    placement.update({name: 0 for name in first})
    placement.update({name: n - 1 for name in last})
    return placement


def _size(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def module_sizes(model) -> tuple[list[ModuleSize], list[str], list[str]]:
    """The model cut into its decoder blocks and the modules beside them: (sizes in forward order,
    modules for the first device, modules for the last). The input embeddings, modules with no weights
    (rotary embeddings) and modules whose weights are tied to the embeddings go first; the rest (final
    norm, output head) last. Works on a model built on the meta device (no weights read)."""
    from engine.prune.layers import find_decoder_layers

    prefix, blocks = find_decoder_layers(model)
    block_names = [f"{prefix}.{i}" for i in range(len(blocks))]
    beside, module, walked = [], model, []
    for part in prefix.split("."):  # every sibling along the path down to the blocks is one unit
        beside += [".".join([*walked, child]) for child, _ in module.named_children() if child != part]
        module, walked = getattr(module, part), [*walked, part]

    embedding = model.get_input_embeddings()
    first_weights = {id(p) for p in embedding.parameters()}
    sizes = {name: 0 for name in [*beside, *block_names]}
    first, last = [], []
    for name in beside:
        child = model.get_submodule(name)
        own = [p for p in child.parameters() if child is embedding or id(p) not in first_weights]
        sizes[name] = sum(p.numel() * p.element_size() for p in own)
        if child is embedding or not own:
            first.append(name)  # the embeddings, weightless modules, heads tied to the embeddings
        else:
            last.append(name)
    for name in block_names:
        block = model.get_submodule(name)
        sizes[name] = sum(t.numel() * t.element_size() for t in [*block.parameters(), *block.buffers()])
    ordered = [ModuleSize(name, sizes[name]) for name in [*first, *block_names, *last]]
    return ordered, first, last


def gpu_device_map(config, dtype, gpu_bytes: list[int], trust_remote_code: bool = False,
                   label: str = "the model") -> dict[str, int]:
    """A device map for `from_pretrained` spreading the model over GPUs 0..n-1 with `gpu_bytes` of
    memory each, computed on a weightless (meta) copy built from `config`. Raises ModelDoesNotFit."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    sizes, first, last = module_sizes(skeleton)
    capacities = [int(b * WEIGHT_SHARE) for b in gpu_bytes]
    return split_contiguous(sizes, capacities, first, last, label)
