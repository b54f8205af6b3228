"""scripts/probe_features.py: the supervised Q* probe finds ranking information exactly when features hold it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("probe_features", ROOT / "scripts/probe_features.py")
probe_features = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe_features)


def _problem(informative: bool, R: int = 240, N: int = 6, D: int = 8):
    g = torch.Generator().manual_seed(0)
    qstar = torch.rand(R, N, generator=g)
    noise = torch.randn(R, N, D, generator=g)
    actions = noise.clone()
    if informative:
        actions[..., 0] = qstar * 3  # one channel carries Q*, the rest is noise
    state = torch.randn(R, 4, generator=g)
    train, val = np.arange(180), np.arange(180, R)
    q = qstar.double().numpy()
    return state, actions, (train, q[train]), (val, q[val])


def test_probe_ranks_well_only_when_features_hold_qstar() -> None:
    torch.manual_seed(0)
    kw = {"steps": 300, "hidden": 64, "batch_size": 64, "lr": 3e-3}
    s, a, tr, va = _problem(informative=True)
    good = probe_features.probe(s, a, None, tr, va, **kw)
    s, a, tr, va = _problem(informative=False)
    bad = probe_features.probe(s, a, None, tr, va, **kw)
    assert good["val/qstar_top1_agreement"] > 0.8 and good["val/qstar_spearman"] > 0.8
    # noise features: about chance (1/6 for a unique optimum among 6 candidates)
    assert bad["val/qstar_top1_agreement"] < 0.4 and abs(bad["val/qstar_spearman"]) < 0.3


def test_listwise_probe_ranks_well_only_when_features_hold_qstar() -> None:
    torch.manual_seed(0)
    kw = {"steps": 600, "hidden": 64, "batch_size": 64, "lr": 3e-3}
    s, a, tr, va = _problem(informative=True)
    good = probe_features.probe(s, a, None, tr, va, loss="listwise", **kw)
    s, a, tr, va = _problem(informative=False)
    bad = probe_features.probe(s, a, None, tr, va, loss="listwise", **kw)
    assert good["val/qstar_top1_agreement"] > 0.6
    assert bad["val/qstar_top1_agreement"] < 0.4  # chance: 1/6
    with pytest.raises(ValueError, match="loss"):
        probe_features.probe(s, a, None, tr, va, loss="hinge", **kw)


def test_listwise_probe_ignores_invalid_candidates() -> None:
    # The Q*-best candidate of every state is marked invalid: the probe must rank among the valid ones.
    s, a, tr, va = _problem(informative=True)
    R, N = a.shape[:2]
    q = np.concatenate([tr[1], va[1]])
    valid = torch.ones(R, N, dtype=torch.bool)
    valid[torch.arange(R), torch.as_tensor(q.argmax(1))] = False
    m = probe_features.probe(
        s, a, valid, tr, va, steps=300, hidden=64, batch_size=64, lr=3e-3, loss="listwise"
    )
    assert np.isfinite(m["val/qstar_top1_agreement"]) and m["val/qstar_top1_agreement"] > 0.6
