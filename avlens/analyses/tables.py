"""What every analysis's report tables share: frames that keep each value as it is (a count stays an int beside
a float rate in the same column, so the report can print it as a count)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import pandas as pd


def object_frame(rows: Mapping[Hashable, Mapping[Hashable, Any]]) -> pd.DataFrame:
    """A table from row -> {column -> value}, object dtype (no int becomes a float); tuple columns become a
    two-level column index (e.g. (model, figure))."""
    columns = list(dict.fromkeys(c for r in rows.values() for c in r))
    index = list(rows)
    data = {c: pd.Series([r.get(c) for r in rows.values()], index=range(len(index)), dtype=object) for c in columns}
    out = pd.DataFrame(data, columns=columns)
    out.index = pd.MultiIndex.from_tuples(index) if index and all(isinstance(i, tuple) for i in index) else index
    if columns and all(isinstance(c, tuple) for c in columns):
        out.columns = pd.MultiIndex.from_tuples(columns)
    return out


def interval(low: float | None, high: float | None) -> str | None:
    """A 95% interval as the report prints it, "[-0.120, +0.034]"; None when either end is not measured."""
    return None if low is None or high is None else f"[{low:+.3f}, {high:+.3f}]"
