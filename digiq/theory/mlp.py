"""A batch of independent one-hidden-layer ReLU MLPs in numpy with hand-written gradients.

``R`` networks (one per run: seed x depth x gamma) are stored as stacked arrays so a whole sweep trains in one
Python loop; torch would spend more time in dispatch than in maths at this size (2 -> 64 -> 1). The critic
input is ``(state feature, action)`` and the output one scalar Q(s, a), the same shape as Digi-Q's critic
head on f(s, a): 2*64 + 64 + 64*1 + 1 = 257 parameters. Initialisation follows torch.nn.Linear
(U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases). ``tests/test_theory.py`` checks the gradients
against torch autograd.
"""

from __future__ import annotations

import numpy as np

Params = dict[str, np.ndarray]


def init_mlp(runs: int, in_dim: int, hidden: int, rng: np.random.Generator) -> Params:
    b_in, b_h = 1.0 / np.sqrt(in_dim), 1.0 / np.sqrt(hidden)
    return {
        "W1": rng.uniform(-b_in, b_in, (runs, in_dim, hidden)),
        "b1": rng.uniform(-b_in, b_in, (runs, hidden)),
        "W2": rng.uniform(-b_h, b_h, (runs, hidden)),
        "b2": rng.uniform(-b_h, b_h, (runs,)),
    }


def n_params(p: Params) -> int:
    """Parameters of ONE network of the batch."""
    return int(sum(v[0].size if v.ndim > 1 else 1 for v in p.values()))


def forward(p: Params, x: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """x: (R, N, in) -> q: (R, N), plus the cache (pre-activations, activations) for :func:`grad_mse`."""
    pre = np.einsum("rni,rih->rnh", x, p["W1"]) + p["b1"][:, None, :]
    h = np.maximum(pre, 0.0)
    q = np.einsum("rnh,rh->rn", h, p["W2"]) + p["b2"][:, None]
    return q, (pre, h)


def grad_mse(p: Params, x: np.ndarray, cache: tuple[np.ndarray, np.ndarray], dq: np.ndarray) -> Params:
    """Gradients of sum_n L(q_n) given dL/dq = ``dq`` (R, N); for 0.5 * mean (q - y)^2 pass (q - y) / N."""
    pre, h = cache
    g_h = dq[:, :, None] * p["W2"][:, None, :] * (pre > 0)
    return {
        "W1": np.einsum("rni,rnh->rih", x, g_h),
        "b1": g_h.sum(1),
        "W2": np.einsum("rn,rnh->rh", dq, h),
        "b2": dq.sum(1),
    }


def sgd_(p: Params, g: Params, lr: float) -> None:
    for k in p:
        p[k] -= lr * g[k]


class Adam:
    """Adam (Kingma & Ba 2015) on a batch of networks; every moment is elementwise, so runs stay independent."""

    def __init__(self, p: Params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.lr, self.b1, self.b2, self.eps, self.t = lr, betas[0], betas[1], eps, 0
        self.m = {k: np.zeros_like(v) for k, v in p.items()}
        self.v = {k: np.zeros_like(v) for k, v in p.items()}

    def step_(self, p: Params, g: Params, active: np.ndarray | None = None) -> None:
        """``active`` (R,) bool: runs that take a step this time (the others keep params and moments; the
        bias-correction counter is shared, which only matters for the first few masked steps)."""
        self.t += 1
        c1, c2 = 1 - self.b1**self.t, 1 - self.b2**self.t
        if active is not None and active.all():
            active = None
        for k in p:
            m, v = self.m[k], self.v[k]
            if active is None:  # fast path, in place
                m *= self.b1
                m += (1 - self.b1) * g[k]
                v *= self.b2
                v += (1 - self.b2) * g[k] ** 2
                p[k] -= (self.lr / c1) * m / (np.sqrt(v / c2) + self.eps)
                continue
            mask = active.reshape((-1,) + (1,) * (p[k].ndim - 1))
            self.m[k] = np.where(mask, self.b1 * m + (1 - self.b1) * g[k], m)
            self.v[k] = np.where(mask, self.b2 * v + (1 - self.b2) * g[k] ** 2, v)
            step = (self.lr / c1) * self.m[k] / (np.sqrt(self.v[k] / c2) + self.eps)
            p[k] -= np.where(mask, step, 0.0)
