"""scripts/probe_features.py: the supervised Q* probe finds ranking information exactly when features hold it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
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
