"""Sparsity targets: an unstructured fraction (0.5) or an N:M pattern (2:4 = 2 pruned in every 4)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

_NM = re.compile(r"^\s*(\d+)\s*[:\-]\s*(\d+)\s*$")
_PERCENT = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*%\s*$")


@dataclass(frozen=True, order=True)
class Sparsity:
    """`fraction` is the share of weights pruned; for N:M it is n/m and `n`, `m` are set."""

    fraction: float
    n: int | None = None
    m: int | None = None

    @property
    def is_nm(self) -> bool:
        return self.m is not None

    def canonical(self) -> str:
        """One spelling per target: '0.5' (never '0.50' or '50%'), '2:4' (never '2-4')."""
        if self.is_nm:
            return f"{self.n}:{self.m}"
        return format_fraction(self.fraction)

    def slug(self) -> str:
        if self.is_nm:
            return f"{self.n}of{self.m}"
        return f"s{format_fraction(self.fraction * 100)}"

    def __str__(self) -> str:
        return self.canonical()


def format_fraction(value: float) -> str:
    # 12 significant digits absorb binary noise (0.1 + 0.2) yet keep every value a study would write.
    text = f"{value:.12g}"
    return text


def parse_sparsity(value: object) -> Sparsity:
    """Parses 0.5, '0.50', '50%', '2:4', '2-4'. Raises ValueError with a message fit for a user."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a sparsity; write a fraction in (0, 1) such as 0.5, or N:M such as '2:4'")
    if isinstance(value, (int, float)):
        try:
            fraction = float(value)
        except OverflowError:  # an integer beyond float range
            raise ValueError("an integer of more than 308 digits is not in (0, 1)") from None
        return _unstructured(fraction, shown=value)
    if isinstance(value, str):
        nm = _NM.match(value)
        if nm:
            return _n_of_m(int(nm.group(1)), int(nm.group(2)), shown=value)
        pct = _PERCENT.match(value)
        if pct:
            return _unstructured(float(pct.group(1)) / 100.0, shown=value)
        try:
            return _unstructured(float(value), shown=value)
        except ValueError:
            pass
    raise ValueError(f"{value!r} is not a sparsity; write a fraction in (0, 1) such as 0.5, or N:M such as '2:4'")


def _unstructured(fraction: float, shown: object) -> Sparsity:
    kept = float(format_fraction(fraction)) if math.isfinite(fraction) else fraction
    if not math.isfinite(fraction) or not 0.0 < kept < 1.0:  # 0.99999999999999 is kept as 1: every weight
        raise ValueError(f"{shown} is not in (0, 1)")
    return Sparsity(fraction=kept)


def _n_of_m(n: int, m: int, shown: object) -> Sparsity:
    if m <= 0 or n <= 0:
        raise ValueError(f"{shown!s}: N and M of an N:M pattern must both be positive (for example 2:4)")
    if n >= m:
        raise ValueError(f"{shown!s}: N must be smaller than M in N:M (N weights pruned in every M), for example 2:4")
    return Sparsity(fraction=n / m, n=n, m=m)
