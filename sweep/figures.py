"""Heat maps of calibration x target matrices (matplotlib, drawn off screen)."""
from __future__ import annotations

import io
import math

import polars as pl


def heatmap_png(matrix: pl.DataFrame, title: str, lower_is_better: bool) -> bytes:
    """Rows: calibration languages; columns: target languages; each cell shows its value and is coloured
    by how far it is from the best cell of its column. The diagonal (calibrating in the target language)
    is outlined; the best cell of each column is starred; missing cells are hatched grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Rectangle

    rows = [str(c) if c else "(none)" for c in matrix["calibration"].to_list()]
    columns = matrix.columns[1:]
    values = np.array([[math.nan if v is None else float(v) for v in matrix[c].to_list()] for c in columns]).T
    values = values.reshape(len(rows), len(columns))
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
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="black" if light else "white")
            if rows[i] == column:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="#d62728", lw=2.2))
    fig.colorbar(image, ax=ax, shrink=0.8, label=f"% {'above' if lower_is_better else 'below'} the column's best")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
