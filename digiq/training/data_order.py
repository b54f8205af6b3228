"""The deterministic shuffle of one epoch: a pure function of (seed, epoch), so a resumed run replays the
data order exactly without saving any sampler state."""

from __future__ import annotations

import numpy as np


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of ``range(n)`` for epoch ``epoch`` (index the training rows with it)."""
    return np.random.default_rng([seed, epoch]).permutation(n)
