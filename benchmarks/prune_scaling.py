"""Time and peak memory to prune one decoder layer, Wanda and SparseGPT, with shared input statistics
(q/k/v and gate/up share one) against the plain way (every linear layer accumulates its own), and how
both scale with the hidden size and with the number of calibration tokens; side by side in one run.

    python benchmarks/prune_scaling.py                          # about 6 minutes on 2 CPU cores
    python benchmarks/prune_scaling.py --hidden 256 512 --tokens 1024 2048 --figure /tmp/p.png   # quick

One Llama-3-shaped decoder layer (benchmarks/prune_layer.py's builder: MLP 3.5 x hidden, grouped-query
attention with up to 8 KV heads of 128), float32, random weights and tokens, 50% unstructured, windows
of --seq-len tokens, batch 8, through `engine.prune.sequential.prune_sequentially(share_statistics=...)`.

Every point runs in a child process of its own (forked before any torch work in the parent), so one
point's memory cannot hide in another's allocator. Measured in the child around `prune_sequentially`
alone (the model and calibration ids are built before):
- time: wall-clock seconds of the call (capturing the first block's inputs, statistics, pruning, the
  block's second forward pass);
- peak memory: growth of the resident set, VmHWM after the call minus VmRSS before it, with the peak
  reset just before the call (`echo 5 > /proc/self/clear_refs`). glibc is told to serve every
  allocation of 64 KiB or more by mmap (mallopt M_MMAP_THRESHOLD), so freed tensors go back to the
  system at once and the resident set follows what torch holds rather than what malloc keeps cached;
- statistics: the largest block's norms and Hessians held at once (PruneReport.peak_statistics_bytes).
Before each point the parent waits for the CPUs to be idle (benchmarks/quiet.py; --quiet-budget) and
records how busy they were. Points under --repeat-below seconds are the best of --repeats children.
The fitted slopes are least squares of log(seconds) on log(hidden) and on log(tokens).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import multiprocessing
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prune_layer import one_layer_model  # noqa: E402
from quiet import QuietGate  # noqa: E402

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
METHODS = ("wanda", "sparsegpt")


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _measure(point: dict, conn) -> None:
    """Child process: build the layer and ids, then time and measure one prune_sequentially call."""
    try:
        from engine.prune.pruners import make_pruner
        from engine.prune.sequential import prune_sequentially
        from engine.prune.sparsity import parse_sparsity

        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 64 * 1024)
        pruner, sparsity = make_pruner(point["method"]), parse_sparsity(point["sparsity"])
        # Warm-up on a 128-wide layer: the thread pool, lazy imports and first-call costs stay out of the
        # measurement (they are a constant that would flatten the small points' slopes).
        warm = one_layer_model(128, point["seq_len"], torch.float32)
        prune_sequentially(warm, pruner, sparsity, torch.randint(0, 256, (1, point["seq_len"])), device="cpu")
        del warm
        model = one_layer_model(point["hidden"], point["seq_len"], torch.float32)
        ids = torch.randint(0, 256, (max(1, point["tokens"] // point["seq_len"]), point["seq_len"]),
                            generator=torch.Generator().manual_seed(1))
        gc.collect()
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")  # resets VmHWM to the current resident set
        before = _status_kib("VmRSS")
        cpu_started = time.process_time()
        started = time.perf_counter()
        report = prune_sequentially(model, pruner, sparsity, ids, device="cpu", batch_size=8,
                                    share_statistics=point["shared"])
        seconds = time.perf_counter() - started
        cpu_seconds = time.process_time() - cpu_started
        peak = _status_kib("VmHWM")
        conn.send({**point, "tokens": ids.numel(), "seconds": seconds, "cpu_seconds": cpu_seconds,
                   "rss_before_mib": before / 1024,
                   "peak_growth_mib": (peak - before) / 1024, "statistics": report.statistics_computed,
                   "statistics_mib": report.peak_statistics_bytes / 2**20,
                   "dampening_retries": max((r.info.get("dampening_retries", 0) for r in report.layers), default=0)})
    except BaseException as err:  # noqa: B036 (reported to the parent, which fails loudly)
        conn.send({"error": f"{type(err).__name__}: {err}"})
    finally:
        conn.close()


def measure(point: dict) -> dict:
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_measure, args=(point, send))
    child.start()
    send.close()
    try:
        result = receive.recv()
    except EOFError:
        result = {"error": "the child died without an answer"}
    child.join()
    if "error" in result:
        raise SystemExit(f"{point}: {result['error']} (exit code {child.exitcode})")
    return result


def slope(xs: list[float], ys: list[float]) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def label(method: str, shared: bool) -> str:
    return f"{'Wanda' if method == 'wanda' else 'SparseGPT'}, {'shared' if shared else 'plain'}"


def plot(rows: list[dict], sweeps: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"wanda": "#1f77b4", "sparsegpt": "#d62728"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), dpi=110)
    for ax, (sweep, axis) in zip(axes, (("hidden", "hidden"), ("tokens", "tokens"))):
        for method in METHODS:
            for shared in (False, True):
                points = sorted((r[axis], r["seconds"]) for r in rows
                                if r["sweep"] == sweep and r["method"] == method and r["shared"] == shared)
                if len(points) < 2:
                    continue
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if shared else "s", linestyle="-" if shared else "--",
                        color=colours[method], alpha=1.0 if shared else 0.7,
                        label=f"{label(method, shared)} (slope {slope(xs, ys):.2f})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ticks = sorted({r[axis] for r in rows if r["sweep"] == sweep})
        ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        fixed = sweeps[sweep]
        if sweep == "hidden":
            ax.set_xlabel("hidden size")
            ax.set_title(f"one layer, {fixed:,} calibration tokens", fontsize=9)
        else:
            ax.set_xlabel("calibration tokens")
            ax.set_title(f"one layer, hidden {fixed}", fontsize=9)
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(2.0, 5.0)))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.set_ylabel("seconds to prune the layer")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Pruning one Llama-shaped decoder layer on 2 CPU cores (float32, 50% unstructured)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--hidden-tokens", type=int, default=2048, help="calibration tokens of the hidden sweep")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--tokens-hidden", type=int, default=512, help="hidden size of the token sweep")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--sparsity", default="0.5")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many children per point ...")
    parser.add_argument("--repeat-below", type=float, default=5.0,
                        help="... for points whose first run took less than this many seconds (one run above)")
    parser.add_argument("--quiet-budget", type=float, default=120.0,
                        help="seconds in all to wait for idle CPUs before points (up to 30 s each; 0: never wait)")
    parser.add_argument("--figure", default="reports/figures/prune_scaling.png")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--replot", metavar="JSON", help="only redraw --figure from a --json file of an earlier run")
    args = parser.parse_args()
    if args.replot:
        saved = json.loads(Path(args.replot).read_text(encoding="utf-8"))
        sweeps = {"hidden": saved["args"]["hidden_tokens"], "tokens": saved["args"]["tokens_hidden"]}
        plot(saved["rows"], sweeps, Path(args.figure))
        print(f"figure: {args.figure}")
        return
    if min(args.hidden + [args.tokens_hidden]) < 128:
        raise SystemExit("hidden sizes must be at least 128 (heads of 128)")
    print(f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} "
          f"threads), {datetime.now(UTC):%Y-%m-%d}; float32, sparsity {args.sparsity}, "
          f"seq_len {args.seq_len}, best of {args.repeats} below {args.repeat_below:g} s")
    print(f"# load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    sweeps = {"hidden": args.hidden_tokens, "tokens": args.tokens_hidden}
    plan = [("hidden", h, args.hidden_tokens) for h in args.hidden] + [("tokens", args.tokens_hidden, t) for t in args.tokens]
    rows = []
    gate = QuietGate(args.quiet_budget)
    started = time.perf_counter()
    print(f"{'sweep':>6} {'hidden':>6} {'tokens':>6} {'method':>9} {'plain s':>8} {'shared s':>8} {'speed-up':>8} "
          f"{'CPU s plain/shared':>18} "
          f"{'plain peak MiB':>14} {'shared peak MiB':>15} {'stats MiB plain -> shared':>26}", flush=True)
    for sweep, hidden, tokens in plan:
        for method in args.methods:
            best = {}
            for attempt in range(args.repeats):
                if attempt and max(r["seconds"] for r in best.values()) >= args.repeat_below:
                    break
                for shared in (False, True):  # alternate, so drift in the machine's load hits both alike
                    point = {"sweep": sweep, "hidden": hidden, "tokens": tokens, "seq_len": args.seq_len,
                             "method": method, "sparsity": args.sparsity, "shared": shared}
                    busy = gate.wait()
                    result = {**measure(point), "others_busy_before": busy}
                    runs = best[shared]["runs"] + 1 if shared in best else 1
                    if shared not in best or result["seconds"] < best[shared]["seconds"]:
                        best[shared] = result
                    best[shared]["runs"] = runs
            rows.extend(best[s] for s in (False, True))
            plain, shared = best[False], best[True]
            print(f"{sweep:>6} {hidden:>6} {shared['tokens']:>6} {method:>9} {plain['seconds']:>8.2f} "
                  f"{shared['seconds']:>8.2f} {plain['seconds'] / shared['seconds']:>7.2f}x "
                  f"{plain['cpu_seconds']:>9.2f}/{shared['cpu_seconds']:<8.2f} "
                  f"{plain['peak_growth_mib']:>14.1f} {shared['peak_growth_mib']:>15.1f} "
                  f"{plain['statistics_mib']:>12.1f} -> {shared['statistics_mib']:.1f}", flush=True)
    print(f"# measured in {time.perf_counter() - started:.0f} s ({gate.waited:.0f} s of it waiting for idle CPUs); "
          f"most busy before a point: {max(r['others_busy_before'] for r in rows):.0%}; load average at end: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    print("\nlog-log slopes (seconds ~ hidden^a at fixed tokens, ~ tokens^b at fixed hidden; peak growth likewise):")
    fits = []
    for method in args.methods:
        for shared in (False, True):
            fit = {"method": method, "shared": shared}
            for sweep, axis in (("hidden", "hidden"), ("tokens", "tokens")):
                chosen = sorted((r for r in rows if r["sweep"] == sweep and r["method"] == method and r["shared"] == shared),
                                key=lambda r: r[axis])
                if len(chosen) >= 2:
                    xs = [r[axis] for r in chosen]
                    fit[f"time_{sweep}"] = slope(xs, [r["seconds"] for r in chosen])
                    fit[f"cpu_time_{sweep}"] = slope(xs, [r["cpu_seconds"] for r in chosen])
                    fit[f"memory_{sweep}"] = slope(xs, [max(r["peak_growth_mib"], 1e-3) for r in chosen])
            fits.append(fit)
            print(f"  {label(method, shared):<18} time: a = {fit.get('time_hidden', math.nan):.2f}, "
                  f"b = {fit.get('time_tokens', math.nan):.2f}   peak memory: a = {fit.get('memory_hidden', math.nan):.2f}, "
                  f"b = {fit.get('memory_tokens', math.nan):.2f}   CPU time: a = {fit.get('cpu_time_hidden', math.nan):.2f}, "
                  f"b = {fit.get('cpu_time_tokens', math.nan):.2f}")
    if args.figure:
        plot(rows, sweeps, Path(args.figure))
        print(f"figure: {args.figure}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "torch": torch.__version__, "rows": rows,
                                               "slopes": fits}, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
