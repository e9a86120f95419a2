"""How the report writes and shows a table: Parquet always, CSV while short enough to read as text, and
an HTML rendering for the page; plus the file-name slugs of figures and tables."""
from __future__ import annotations

import html
import re
from pathlib import Path

import polars as pl
from markupsafe import Markup

# Tables longer than this are written as Parquet only: a CSV of a real study's per-matrix analyses runs to
# tens of megabytes (Gemma 3 270M's layer errors: 52,000 rows, 6.7 MB; an 8B model's about ten times that),
# which no one reads as text and a repository should not hold; Parquet keeps them at a sixteenth.
CSV_MAX_ROWS = 20_000


def write_table(frame: pl.DataFrame, folder: Path, stem: str) -> str:
    """`<stem>.parquet`, and `<stem>.csv` while the table is short enough to read as text; returns the
    name of the file to point a reader to (the CSV when there is one)."""
    frame.write_parquet(folder / f"{stem}.parquet")
    if frame.height > CSV_MAX_ROWS:
        (folder / f"{stem}.csv").unlink(missing_ok=True)  # an earlier report's, now out of date
        return f"{stem}.parquet"
    frame.write_csv(folder / f"{stem}.csv")
    return f"{stem}.csv"


def slug(*parts: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", "-".join(parts).lower()).strip("-")


def _fmt(value: object) -> str:
    if value is None:
        return "missing"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def table_html(frame: pl.DataFrame, limit: int | None = None) -> Markup:
    rows = list(frame.iter_rows())[:limit] if limit else list(frame.iter_rows())
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(
        "<td class=missing>missing</td>" if v is None else f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>"
        for row in rows)
    more = f"<p class=note>{frame.height - len(rows)} more rows in the CSV.</p>" if limit and frame.height > limit else ""
    return Markup(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{more}")
