"""Small numpy statistics used by the critic's validation (no scipy dependency)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def rankdata(x: np.ndarray) -> np.ndarray:
    """1-based ranks of a 1-d array with ties given their average rank (scipy's ``method='average'``)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # Boundaries of runs of equal values; every member of a run gets the run's mean position.
    starts = np.r_[0, np.flatnonzero(sorted_x[1:] != sorted_x[:-1]) + 1]
    ends = np.r_[starts[1:], len(x)]
    avg = (starts + ends - 1) / 2.0 + 1.0
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; NaN when either input is constant or has fewer than 2 entries."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if len(a) < 2:
        return float("nan")
    a = a - a.mean()
    b = b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC of ``scores`` for binary ``labels`` (Mann-Whitney U with average ranks for ties): the chance
    that a random positive scores above a random negative. NaN when a class is empty."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation = Pearson correlation of average ranks; NaN if either side is constant."""
    return pearson(rankdata(a), rankdata(b))


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion (honest at small n and near 0 or 1, unlike the
    normal approximation)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def clustered_success(
    clusters: Sequence[tuple[int, int]], z: float = 1.959963984540054
) -> tuple[float, float, float, int]:
    """Success over independent units (goals x seeds) rather than over episodes: ``(rate, lo, hi, units)``.

    ``clusters`` holds ``(successes, episodes)`` per unit; each unit counts once, with its own success fraction,
    so repeating a deterministic episode does not narrow the interval. The interval is Wilson's on
    ``(sum of fractions, units)``: exact when every unit is 0 or 1 (greedy, deterministic episodes) and
    conservative otherwise, since the variance of a fraction in [0, 1] with mean p is at most p (1 - p).
    """
    fracs = [s / n for s, n in clusters if n > 0]
    k = len(fracs)
    if k == 0:
        return 0.0, 0.0, 1.0, 0
    total = float(sum(fracs))
    lo, hi = _wilson_real(total, k, z)
    return total / k, lo, hi, k


def unit_success(
    cells: Sequence[tuple[int, int]], unit: str, z: float = 1.959963984540054
) -> tuple[float, float, float, int]:
    """Success of ``(successes, episodes)`` cells with a 95% interval over the environment's outcome unit:
    ``(rate, lo, hi, units)``. ``unit='goal'``: :func:`clustered_success` (a goal's repeated episodes are one
    outcome). ``unit='page'``: every episode is a fresh instance, an independent outcome, so Wilson's interval
    on the pooled counts and ``units`` = episodes. The unit is :func:`digiq.envs.registry.episode_unit`'s."""
    if unit == "page":
        k, n = sum(c[0] for c in cells), sum(c[1] for c in cells)
        lo, hi = wilson_interval(k, n, z)
        return (k / n if n else 0.0), lo, hi, n
    if unit != "goal":
        raise ValueError(f"unit must be 'goal' or 'page', got {unit!r}")
    return clustered_success(cells, z)


def _wilson_real(successes: float, n: int, z: float) -> tuple[float, float]:
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)
