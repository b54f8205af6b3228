"""Intervals over independent units (goals x seeds), not over repeated episodes."""

from __future__ import annotations

import numpy as np
import pytest

from digiq.utils.stats import clustered_success, wilson_interval


def test_binary_units_give_wilsons_interval_on_the_unit_count() -> None:
    units = [(1, 1)] * 20 + [(0, 1)] * 12
    assert clustered_success(units) == pytest.approx((20 / 32, *wilson_interval(20, 32), 32))


def test_repeating_deterministic_episodes_does_not_narrow_the_interval() -> None:
    # 32 goals, greedy: every goal's 6 episodes are the same outcome. Pooled by episodes the interval would
    # shrink with the repeats; by units it is the 32-outcome interval.
    once = [(1, 1)] * 20 + [(0, 1)] * 12
    repeated = [(6, 6)] * 20 + [(0, 6)] * 12
    assert clustered_success(repeated) == pytest.approx(clustered_success(once))
    lo_ep, hi_ep = wilson_interval(120, 192)
    _, lo, hi, _ = clustered_success(repeated)
    assert hi - lo > (hi_ep - lo_ep) * 2  # sqrt(6) wider


def test_fractional_units_are_covered_conservatively() -> None:
    # Units whose episodes disagree (sampled policies): the interval uses the fractions' mean and is at least as
    # wide as the normal interval from their own spread.
    rng = np.random.default_rng(0)
    fracs = rng.integers(0, 5, size=40)
    units = [(int(k), 4) for k in fracs]
    rate, lo, hi, n = clustered_success(units)
    p = fracs / 4
    assert n == 40 and rate == pytest.approx(p.mean())
    half_normal = 1.96 * p.std(ddof=1) / np.sqrt(len(p))
    assert (hi - lo) / 2 >= half_normal * 0.95
    assert lo < rate < hi


def test_no_units() -> None:
    assert clustered_success([]) == (0.0, 0.0, 1.0, 0)
    assert clustered_success([(0, 0)]) == (0.0, 0.0, 1.0, 0)


def test_unit_success_pools_pages_and_clusters_goals() -> None:
    from digiq.utils.stats import unit_success

    cells = [(3, 3)] * 20 + [(0, 3)] * 12
    assert unit_success(cells, "page") == pytest.approx((60 / 96, *wilson_interval(60, 96), 96))
    assert unit_success(cells, "goal") == pytest.approx(clustered_success(cells))
    with pytest.raises(ValueError, match="'episode'"):
        unit_success(cells, "episode")
