"""The linear screen-change probe behind train-critic's no-op backup."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from digiq.models.change_probe import fit_change_probe, noop_candidates


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g) * 3 + 5  # off-centre, unscaled: the probe standardises
    y = (x[:, 2] - x[:, 5] > 0).long()
    return x, y


def test_probe_learns_a_linear_label_and_generalises() -> None:
    x, y = _data(400, 0)
    probe = fit_change_probe(x, y)
    xt, yt = _data(400, 1)
    acc = ((probe(xt) >= 0.5).long() == yt).float().mean().item()
    assert acc >= 0.95
    # deterministic: the same fit twice gives the same probabilities
    assert torch.equal(probe(xt), fit_change_probe(x, y)(xt))
    with pytest.raises(ValueError, match="x must be"):
        fit_change_probe(x, y[:-1])


def test_noop_candidates_masks_predicted_noops_but_never_column_0_or_padding() -> None:
    # feature 0 says "changes the screen" (+1) or not (-1); candidates (R, N=4)
    R, N = 60, 4
    rng = np.random.default_rng(0)
    change = rng.random((R, N)) < 0.5
    actions = torch.from_numpy(
        np.where(change, 1.0, -1.0)[..., None] + 0.05 * rng.normal(size=(R, N, 3))
    ).float()
    labels = change[:, 0].astype(np.int64)
    valid = torch.ones(R, N, dtype=torch.bool)
    valid[:5, 3] = False
    mask, stats = noop_candidates(actions, valid, labels, np.arange(40), np.arange(40, R), 0.1)
    assert mask.shape == (R, N) and mask.dtype == torch.float32
    assert mask[:, 0].sum() == 0
    assert mask[:5, 3].sum() == 0
    expect = torch.from_numpy(~change) & valid
    expect[:, 0] = False
    assert torch.equal(mask.bool(), expect)
    assert stats["noop/probe_val_accuracy"] == 1.0
    assert stats["noop/candidates_masked"] == pytest.approx(expect[:, 1:].float().mean().item())
