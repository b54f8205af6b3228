"""What every theory experiment returns and how it is written to disk (CSV + summary JSON, atomically)."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

import numpy as np

from digiq.utils.io import atomic_write_json, atomic_write_text


@dataclasses.dataclass
class Result:
    """``tables``: CSV stem -> column name -> 1-D array (all columns of a table have one length);
    ``summary``: the key numbers (JSON-serialisable) that the docs and tests quote."""

    name: str
    tables: dict[str, dict[str, np.ndarray]]
    summary: dict[str, Any]


def log_points(steps: int, n: int = 300) -> np.ndarray:
    """Steps at which to record an error curve: a geometric grid (the early staircase) merged with a
    linear one (the tail), always including 0 and ``steps``."""
    geo = np.geomspace(1, max(steps, 1), n // 2)
    lin = np.linspace(0, steps, n // 2)
    return np.unique(np.concatenate([[0, steps], geo, lin]).astype(int))


def table_to_csv(columns: dict[str, np.ndarray]) -> str:
    names = list(columns)
    cols = [np.asarray(columns[k]) for k in names]
    n = len(cols[0]) if cols else 0
    if any(len(c) != n for c in cols):
        raise ValueError(f"columns of unequal length: {[(k, len(c)) for k, c in zip(names, cols)]}")
    buf = io.StringIO()
    buf.write(",".join(names) + "\n")
    for i in range(n):
        buf.write(",".join(_fmt(c[i]) for c in cols) + "\n")
    return buf.getvalue()


def _fmt(v: Any) -> str:
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.8g}"
    return str(v)


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj)
    if isinstance(obj, (np.integer, int)) and not isinstance(obj, bool):
        return int(obj)
    return obj


def write_result(result: Result, out_dir: str | Path) -> list[Path]:
    """Write ``<name>[_<table>].csv`` for every table and ``<name>_summary.json``; returns the paths."""
    out = Path(out_dir)
    paths = []
    for stem, cols in result.tables.items():
        paths.append(atomic_write_text(out / f"{stem}.csv", table_to_csv(cols)))
    paths.append(atomic_write_json(out / f"{result.name}_summary.json", _plain(result.summary)))
    return paths


def summary_json(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary with numpy scalars/arrays turned into plain Python (for printing or JSON)."""
    return _plain(summary)
