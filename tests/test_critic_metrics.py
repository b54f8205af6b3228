"""Rank statistics of the critic validation, against brute-force references."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from digiq.utils.stats import pearson, rankdata, spearman


def _brute_ranks(x: np.ndarray) -> np.ndarray:
    # rank = 1 + #smaller + (#equal - 1) / 2
    return np.array([1 + (x < v).sum() + ((x == v).sum() - 1) / 2 for v in x])


@pytest.mark.parametrize("seed", range(5))
def test_rankdata_with_ties(seed: int) -> None:
    x = np.random.default_rng(seed).integers(0, 4, size=9).astype(float)
    assert np.array_equal(rankdata(x), _brute_ranks(x))


def test_spearman_known_values() -> None:
    a = np.array([1.0, 2.0, 3.0, 4.0])
    assert spearman(a, a**3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    # classic formula without ties: 1 - 6 sum d^2 / (n (n^2 - 1))
    b = np.array([2.0, 1.0, 4.0, 3.0])
    assert spearman(a, b) == pytest.approx(1 - 6 * 4 / (4 * 15))
    assert math.isnan(spearman(a, np.ones(4)))
    assert math.isnan(pearson(np.ones(1), np.ones(1)))


def test_pearson_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    for a, b in itertools.islice(((rng.normal(size=20), rng.normal(size=20)) for _ in range(3)), 3):
        assert pearson(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1])
