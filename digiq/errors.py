"""Errors that the CLI turns into one clear line and a non-zero exit code (no traceback)."""

from __future__ import annotations


class DigiqError(Exception):
    """Base class for user-facing errors (bad input, missing artefacts, mismatched shapes)."""


class DataError(DigiqError):
    """Bad input data. Say *where*: file, trajectory and step (use :func:`where`)."""


def where(file: object = None, traj: object = None, step: object = None, key: str | None = None) -> str:
    """``"file.pt, trajectory 3, step 7, key 'reward'"``: the location prefix of a DataError message."""
    parts = []
    if file is not None:
        parts.append(str(file))
    if traj is not None:
        parts.append(f"trajectory {traj}")
    if step is not None:
        parts.append(f"step {step}")
    if key is not None:
        parts.append(f"key {key!r}")
    return ", ".join(parts)
