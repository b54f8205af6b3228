"""What the critic, extraction, evaluation and report stages read from a dataset besides the images.

:func:`load_transitions` turns the scalar columns into the arrays a TD / MC backup needs (reward, done,
next row, discounted return recomputed with the critic's gamma); :func:`check_candidate_counts` is the
one check that a feature cache's N fits the dataset's candidate lists; :func:`successful_rows` selects
the steps of successful trajectories (Filtered BC, offline action matching).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from digiq.data.schema import discounted_returns, load_dataset, next_row_index, trajectory_bounds
from digiq.errors import DataError


@dataclasses.dataclass
class Transitions:
    """Per-row scalars of the dataset (numpy), aligned with the feature cache rows."""

    reward: np.ndarray  # float32 (R,)
    done: np.ndarray  # float32 (R,), 1 also for the last row of a truncated trajectory
    mc_return: np.ndarray  # float32 (R,), recomputed with gamma
    next_idx: np.ndarray  # int64 (R,), the row of s_{t+1}; the row itself where terminal (masked by done)
    candidates: list[list[str]]
    state_key: list[str]
    traj_bounds: list[tuple[int, int]]
    num_truncated: int = 0


def load_transitions(path: str | Path, gamma: float) -> tuple[Transitions, Any]:
    """Read the scalar columns (never the images) and derive done/next-row/return arrays.

    The return is recomputed from the rewards with ``gamma`` rather than read from ``mc_return``, which
    may have been written with another discount (the official loader also recomputes it: DigiRL-agent/digiq
    @ 8181379, ``offpolicy_train_loop.py:110``).
    """
    ds = load_dataset(path)
    cols = ds.select_columns(["traj_id", "step_id", "reward", "done", "candidates", "state_key"])
    reward = np.asarray(cols["reward"], dtype=np.float32)
    done = np.asarray(cols["done"], dtype=bool)
    bounds = trajectory_bounds(cols)
    next_idx = next_row_index(cols)  # -1 after the last step of each trajectory
    truncated = 0
    mc = np.zeros(len(reward), dtype=np.float32)
    for s, e in bounds:
        mc[s:e] = discounted_returns(reward[s:e], gamma)
        if not done[e - 1]:
            truncated += 1
    terminal = next_idx < 0
    done_f = (done | terminal).astype(np.float32)
    next_idx = np.where(terminal, np.arange(len(reward)), next_idx)
    tr = Transitions(
        reward=reward,
        done=done_f,
        mc_return=mc,
        next_idx=next_idx,
        candidates=list(cols["candidates"]),
        state_key=list(cols["state_key"]),
        traj_bounds=bounds,
        num_truncated=truncated,
    )
    return tr, ds


def check_candidate_counts(
    candidates: list[list[str]], n: int, dataset: object, features: object, ds: Any = None
) -> None:
    """Raise a DataError unless the feature cache's N fits the dataset's candidate lists.

    cache-features stores N = the longest candidate list (at least 1: the dataset action), padding shorter
    rows; so a row with more than N candidates, or no row with exactly N, means the cache belongs to other
    candidates.
    """
    sizes = np.asarray([max(1, len(c)) for c in candidates])
    if len(sizes) == 0:
        return
    over = np.flatnonzero(sizes > n)
    if len(over) or sizes.max() != n:
        r = int(over[0]) if len(over) else int(np.argmax(sizes))
        loc = f"row {r}"
        if ds is not None:
            ids = ds.select_columns(["traj_id", "step_id"])[r]  # never decode images on the error path
            loc = f"trajectory {ids['traj_id']}, step {ids['step_id']} (row {r})"
        raise DataError(
            f"{dataset}: {loc} has {int(sizes[r])} candidate(s) (longest list: {int(sizes.max())}) but the "
            f"feature cache {features} holds N={n} per row: it was cached for other candidates; re-run "
            "`digiq cache-features`"
        )


def successful_rows(ds: Any) -> np.ndarray:
    """Rows of trajectories that end with a positive reward (``ds`` needs ``traj_id`` and ``reward``)."""
    reward = np.asarray(ds["reward"], dtype=np.float64)
    keep = np.zeros(len(reward), dtype=bool)
    for s, e in trajectory_bounds(ds):
        if reward[e - 1] > 0:
            keep[s:e] = True
    return np.flatnonzero(keep)
