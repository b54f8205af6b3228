"""A linear probe that reads the Stage-1 label ("did the action change the screen?") off cached f(s, a).

Stage 1 fine-tunes the VLM on exactly this label, so its intermediate features carry it: a logistic
regression on the dataset action's features, fitted on the training split, predicts it for candidates the
dataset never executed. train-critic's no-op backup (``noop.enabled``) uses it to give those candidates a
Bellman target: a screen that did not change is the same state, so Q(s, a) = r + gamma V(s) with r = 0.
:func:`noop_candidates` applies the probe to every candidate and returns the mask of those to back up.
"""

from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def _standardise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x.float() - mean) / std


def fit_change_probe(
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int = 500,
    lr: float = 0.01,
    weight_decay: float = 1e-3,
    seed: int = 0,
) -> torch.nn.Module:
    """Logistic regression on features ``x`` (M, D) for 0/1 labels ``y`` (M,); full-batch Adam, deterministic.

    Returns a module mapping (..., D) features to P(changed) (...,); inputs are standardised with the
    training features' mean/std inside it.
    """
    if x.dim() != 2 or y.shape != x.shape[:1]:
        raise ValueError(
            f"fit_change_probe: x must be (M, D) and y (M,), got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if len(x) == 0:
        raise ValueError("fit_change_probe: no rows to fit on")
    x = x.float()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    xs = _standardise(x, mean, std)
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(x.shape[1], 1)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.01)
        lin.bias.zero_()
    opt = torch.optim.Adam(lin.parameters(), lr=lr, weight_decay=weight_decay)
    target = y.float()
    with torch.enable_grad():
        for _ in range(steps):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(lin(xs).squeeze(-1), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return _Probe(lin, mean, std)


class _Probe(torch.nn.Module):
    def __init__(self, lin: torch.nn.Linear, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.lin = lin
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.lin(_standardise(x, self.mean, self.std)).squeeze(-1))


def noop_candidates(
    actions: torch.Tensor,
    valid: torch.Tensor | None,
    labels: np.ndarray,
    train_rows: np.ndarray,
    val_rows: np.ndarray,
    threshold: float,
    seed: int = 0,
    chunk: int = 1024,
) -> tuple[torch.Tensor, dict[str, float]]:
    """(R, N) float mask of the candidates to back up as no-ops, and the probe's diagnostics.

    A linear probe on the dataset action's features (column 0) of ``train_rows`` learns the Stage-1 label
    ``labels`` (R,); a candidate is a no-op where its P(changed) < ``threshold``. Column 0 (executed: it
    has its real transition) and padding are never masked.
    """
    y = torch.as_tensor(labels, dtype=torch.float32)
    tr = torch.as_tensor(train_rows, dtype=torch.long)
    probe = fit_change_probe(actions[tr.to(actions.device), 0].cpu(), y[tr], seed=seed).to(actions.device)
    p = torch.cat([probe(actions[i : i + chunk]) for i in range(0, len(actions), chunk)])  # (R, N)
    mask = p < threshold
    mask[:, 0] = False
    if valid is not None:
        mask &= valid.bool()
    stats = {
        "noop/candidates_masked": float(mask[:, 1:].float().mean()),
        "noop/rows_with_one": float(mask.any(1).float().mean()),
        "noop/train_label_positive": float(y[tr].mean()) if len(tr) else float("nan"),
    }
    if len(val_rows):
        vr = torch.as_tensor(val_rows, dtype=torch.long)
        pred = (p[vr.to(p.device), 0].cpu() >= 0.5).float()
        stats["noop/probe_val_accuracy"] = float((pred == y[vr]).float().mean())
    return mask.float(), stats
