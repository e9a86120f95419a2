"""Peak memory of SparseGPT's inverse-Hessian factor: `engine.prune.sparsegpt_math.inverse_hessian_factor`
against the plain way (the damped copy, an identity and their sum, the Cholesky factor, the inverse and
its factor all alive at once), side by side in one run, with the factors compared bit for bit.

    python benchmarks/hessian_factor_memory.py                    # sizes 2048 4096 6144, about a minute
    python benchmarks/hessian_factor_memory.py --sizes 1024 2048  # quick

Each (size, way) runs in a child process of its own. Peak memory is the growth of the resident set
around the call alone (VmHWM after minus VmRSS before, the peak reset with /proc/self/clear_refs),
with glibc serving large allocations by mmap so freed tensors leave the resident set at once. The
Hessian itself (built before) is not counted; the returned factor is. Llama-3-8B's largest Hessian,
down_proj's 14336 x 14336 float32, is 0.77 GiB, so the figure per matrix scales to real models.
"""
from __future__ import annotations

import argparse
import ctypes
import multiprocessing
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def plain_factor(hessian, dampening: float = 0.01):
    """The textbook sequence, every intermediate kept until the function returns."""
    import torch

    h = hessian.to(torch.float32).clone()
    diagonal = torch.diagonal(h)
    diagonal[diagonal == 0] = 1.0
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    lower = torch.linalg.cholesky(h + dampening * float(diagonal.mean()) * eye)
    inverse = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(inverse, upper=True)


def _status(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(size: int, way: str, queue) -> None:
    import torch

    ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: big blocks go back on free
    torch.manual_seed(size)
    x = torch.randn(size + 256, size)
    hessian = x.t() @ x
    del x
    with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
        handle.write("5")
    before = _status("VmRSS")
    if way == "engine":
        from engine.prune.sparsegpt_math import inverse_hessian_factor

        upper = inverse_hessian_factor(hessian, 0.01, 4)[0]
    else:
        upper = plain_factor(hessian)
    peak = _status("VmHWM") - before
    queue.put((peak, upper.numpy().tobytes()))


def run(size: int, way: str) -> tuple[int, bytes]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=measure, args=(size, way, queue))
    child.start()
    result = queue.get()
    child.join()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 6144])
    args = parser.parse_args(argv)
    print("| size | one matrix MiB | plain: peak MiB (matrices) | engine: peak MiB (matrices) | ratio | same factor |")
    print("|---:|---:|---:|---:|---:|---|")
    for size in args.sizes:
        matrix = size * size * 4
        plain, plain_bytes = run(size, "plain")
        ours, our_bytes = run(size, "engine")
        print(f"| {size} | {matrix / 2**20:.0f} | {plain / 2**20:.0f} ({plain / matrix:.1f}) | "
              f"{ours / 2**20:.0f} ({ours / matrix:.1f}) | {plain / ours:.2f}x | {plain_bytes == our_bytes} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
