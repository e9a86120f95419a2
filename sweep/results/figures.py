"""Heat maps of calibration x target matrices (matplotlib, drawn off screen)."""
from __future__ import annotations

import io
import math

import polars as pl


def heatmap_png(matrix: pl.DataFrame, title: str, lower_is_better: bool,
                interval: tuple[pl.DataFrame, pl.DataFrame] | None = None) -> bytes:
    """Rows: calibration languages; columns: target languages; each cell shows its value and is coloured
    by how far it is from the best cell of its column. The diagonal (calibrating in the target language)
    is outlined; the best cell of each column is starred; missing cells are hatched grey. With
    `interval` (matrices of the same shape: each cell's interval bounds), each cell also shows the
    interval's half-width, so that a reader sees which differences are within noise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Rectangle

    rows = [str(c) if c else "(none)" for c in matrix["calibration"].to_list()]
    columns = matrix.columns[1:]
    values = np.array([[math.nan if v is None else float(v) for v in matrix[c].to_list()] for c in columns]).T
    values = values.reshape(len(rows), len(columns))
    half = np.full_like(values, np.nan)
    if interval is not None:
        low, high = ([[math.nan if v is None else float(v) for v in m[c].to_list()] for c in columns] for m in interval)
        half = (np.array(high).T - np.array(low).T).reshape(values.shape) / 2
    # Colour by the gap to the best calibration of each column: languages differ in how predictable they
    # are, so raw values would colour by target language rather than by calibration.
    gaps = np.full_like(values, np.nan)
    for j in range(values.shape[1]):
        column = values[:, j]
        if np.isfinite(column).any():
            best = np.nanmin(column) if lower_is_better else np.nanmax(column)
            gaps[:, j] = 100 * np.abs(column - best) / abs(best) if best else np.abs(column - best)
    fig, ax = plt.subplots(figsize=(1.6 + 0.8 * max(3, len(columns)), 1.2 + 0.5 * max(3, len(rows))), dpi=110)
    cmap = matplotlib.colormaps["viridis_r"].with_extremes(bad="#dddddd")
    finite = gaps[np.isfinite(gaps)]
    top = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    image = ax.imshow(np.ma.masked_invalid(gaps), cmap=cmap, aspect="auto", vmin=0, vmax=top)
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("target language")
    ax.set_ylabel("calibration language")
    ax.set_title(title, fontsize=9)
    for j, column in enumerate(columns):
        for i in range(len(rows)):
            value = values[i, j]
            if not math.isfinite(value):
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", edgecolor="#999999", lw=0))
                ax.text(j, i, "missing", ha="center", va="center", fontsize=6, color="#555555")
                continue
            light = gaps[i, j] < top / 2  # the yellow end of viridis_r
            text = f"{value:.3f}" + ("*" if gaps[i, j] == 0 else "")
            if math.isfinite(half[i, j]):
                text += f"\n±{half[i, j]:.3f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=6 if interval is not None else 7,
                    color="black" if light else "white")
            if rows[i] == column:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="#d62728", lw=2.2))
    fig.colorbar(image, ax=ax, shrink=0.8, label=f"% {'above' if lower_is_better else 'below'} the column's best")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def iou_png(overlap: pl.DataFrame, languages: list[str], title: str) -> bytes:
    """Left: mean IoU (over layers and seeds) between the masks of each pair of calibration languages.
    Right: IoU per layer (columns) for every pair (rows), pairs with English first."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    present = [l for l in languages if l in set(overlap["calibration_a"]) | set(overlap["calibration_b"])]
    matrix = np.full((len(present), len(present)), np.nan)
    means = overlap.group_by("calibration_a", "calibration_b").agg(pl.col("iou").mean())
    for a, b, value in means.iter_rows():
        i, j = present.index(a), present.index(b)
        matrix[i, j] = matrix[j, i] = value
    np.fill_diagonal(matrix, 1.0)
    per_layer = overlap.group_by("calibration_a", "calibration_b", "layer").agg(pl.col("iou").mean())
    pairs = sorted({(a, b) for a, b in per_layer.select("calibration_a", "calibration_b").iter_rows()},
                   key=lambda p: ("en" not in p, present.index(p[0]), present.index(p[1])))
    layers = sorted(set(per_layer["layer"]))
    grid = np.full((len(pairs), len(layers)), np.nan)
    for a, b, layer, value in per_layer.iter_rows():
        grid[pairs.index((a, b)), layers.index(layer)] = value
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, max(4.2, 0.22 * len(pairs) + 1.5)), dpi=100,
                                      gridspec_kw={"width_ratios": [1, 1.3]})
    low = float(np.nanmin(grid)) if np.isfinite(grid).any() else 0.0
    image = left.imshow(matrix, cmap="viridis", vmin=low, vmax=1.0)
    left.set_xticks(range(len(present)), present)
    left.set_yticks(range(len(present)), present)
    for i in range(len(present)):
        for j in range(len(present)):
            left.text(j, i, f"{matrix[i, j]:.3f}", ha="center", va="center", fontsize=7,
                      color="black" if i == j else "white")
    left.set_title("mask IoU, all layers", fontsize=9)
    right.imshow(grid, cmap="viridis", vmin=low, vmax=1.0, aspect="auto")
    right.set_yticks(range(len(pairs)), [f"{a}-{b}" for a, b in pairs], fontsize=7)
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.set_xlabel("layer")
    right.set_title("mask IoU per layer, per pair of calibration languages", fontsize=9)
    fig.colorbar(image, ax=[left, right], shrink=0.8, label="IoU of pruned positions")
    fig.suptitle(title, fontsize=10)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def lape_png(hist: pl.DataFrame, title: str) -> bytes:
    """LAPE histograms: the dense model against the pruned models of one pruner and sparsity (pooled
    over calibration languages)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=100)
    for label, frame in (("dense", hist.filter(pl.col("pruner") == "dense")),
                         ("pruned", hist.filter(pl.col("pruner") != "dense"))):
        if frame.is_empty():
            continue
        bins = frame.group_by("bin_low", "bin_high").agg(pl.col("neurons").mean()).sort("bin_low")
        total = float(bins["neurons"].sum()) or 1.0
        ax.step(bins["bin_low"], bins["neurons"] / total, where="post", label=label)
    ax.set_xlabel("LAPE (nats)")
    ax.set_ylabel("share of active neurons")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    return _png(fig)


def snr_png(snr: pl.DataFrame, title: str) -> bytes:
    """Mean SNR per layer (over calibration x target pairs) in the language-specific and -agnostic subspace,
    for each variant in the table: centroid (solid) and per-token (dashed)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=100)
    finite = snr.with_columns(pl.col("snr_specific_db").replace([float("inf")], None),
                              pl.col("snr_agnostic_db").replace([float("inf")], None))
    if "variant" not in finite.columns:
        finite = finite.with_columns(pl.lit("centroid").alias("variant"))
    for variant, style in (("centroid", "-"), ("token", "--")):
        frame = finite.filter(pl.col("variant") == variant)
        if frame.is_empty():
            continue
        per_layer = frame.group_by("layer").agg(pl.col("snr_specific_db").mean(),
                                                pl.col("snr_agnostic_db").mean()).sort("layer")
        for column, colour, marker, name in (("snr_specific_db", "C0", "o", "language-specific"),
                                             ("snr_agnostic_db", "C1", "s", "language-agnostic")):
            ax.plot(per_layer["layer"], per_layer[column], linestyle=style, color=colour, marker=marker,
                    markersize=3, label=f"{name}, {variant}")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("SNR vs dense (dB)")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    return _png(fig)
