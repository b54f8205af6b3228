"""Experiments 1-3 on the depth-3 branching MDP: value iteration, tabular Q-learning, linear semi-gradient
Q-learning against its projection floor. Everything is numpy and vectorised over independent runs (seeds
and step-size schedules are a leading batch axis), so each experiment is a single Python loop over steps.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from digiq.theory.common import Result, log_points
from digiq.theory.mdp import TabularMDP, branching_mdp, q_star, sample_step, value_iteration


@dataclasses.dataclass
class TabularConfig:
    """Knobs of experiments 1-3 (``digiq theory``'s ``tabular.*``)."""

    # Discount of the depth-3 branching MDP (experiments 1-3).
    gamma: float = 0.9
    # Probability that an action leaves the state unchanged ("the tap did nothing"); > 0 makes the MDP cyclic.
    p_stay: float = 0.2
    # Value-iteration sweeps.
    vi_iters: int = 30
    # Environment steps per run for Q-learning and function approximation.
    steps: int = 100_000
    # Independent runs (seeds) per curve.
    seeds: int = 8
    # Exploration of the epsilon-greedy behaviour policy.
    epsilon: float = 0.2
    # Step size of the 'constant' Q-learning schedule.
    constant_alpha: float = 0.1
    # Step size of linear semi-gradient Q-learning.
    fa_alpha: float = 0.02


# --------------------------------------------------------------------------------------------------
# 1. value iteration
# --------------------------------------------------------------------------------------------------


def run_value_iteration(t: TabularConfig, seed: int = 0) -> Result:
    """||T^k Q_0 - Q*||_inf against the contraction bound gamma^k ||Q_0 - Q*||_inf, from Q_0 = 0 and from a
    random Q_0 ~ U[-2, 2] (``t.vi_iters`` sweeps). T is a gamma-contraction in sup norm, so the bound must hold
    at every k."""
    gamma, iters = t.gamma, t.vi_iters
    mdp = branching_mdp(t.p_stay)
    qs = q_star(mdp, gamma)
    rng = np.random.default_rng(seed)
    k = np.arange(iters + 1)
    cols: dict[str, np.ndarray] = {"k": k}
    summary: dict = {"gamma": gamma, "q_star": qs.tolist()}
    for label, q0 in (("zero", np.zeros_like(qs)), ("random", rng.uniform(-2, 2, qs.shape))):
        Qk = value_iteration(mdp, gamma, iters, q0)
        err = np.abs(Qk - qs).max(axis=(1, 2))
        bound = gamma**k * err[0]
        cols[f"error_{label}_init"] = err
        cols[f"bound_{label}_init"] = bound
        # over k >= 1 (k = 0 is equality by construction); <= 1 is the contraction theorem
        summary[f"max_ratio_to_bound_{label}"] = float(np.max(err[1:] / np.maximum(bound[1:], 1e-300)))
        # empirical contraction rate: geometric mean ratio after the first D = 3 sweeps, above round-off
        tail = err[3:][err[3:] > 1e-12]
        if len(tail) > 1:
            summary[f"empirical_rate_{label}"] = float(np.exp(np.mean(np.diff(np.log(tail)))))
    return Result("value-iteration", {"value-iteration": cols}, summary)


# --------------------------------------------------------------------------------------------------
# 2. tabular Q-learning
# --------------------------------------------------------------------------------------------------

SCHEDULES = ("visit", "global", "constant")


def tabular_q_learning(
    mdp: TabularMDP,
    gamma: float,
    steps: int,
    schedules: list[str],
    seed: int,
    epsilon: float = 0.2,
    constant_alpha: float = 0.1,
    record_at: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run ``len(schedules)`` independent epsilon-greedy Q-learners in lock-step (one per entry).

    Step sizes: ``visit``: alpha = 1/(n(s,a)+1) with n the number of earlier updates of that pair (the
    Robbins-Monro conditions hold per pair, so Q_t -> Q* a.s.; Watkins & Dayan 1992); ``global``:
    alpha = 1/(t+1) with t the global step (also sums to infinity, but rarely visited pairs get tiny steps
    and converge very slowly); ``constant``: fixed alpha (converges only to a noise ball of size ~sqrt(alpha)).
    Returns ``(record_at, errors (len(record_at), runs), final Q (runs, S, A))``; the error is
    ||Q_t - Q*||_inf over all (s, a) pairs.
    """
    rng = np.random.default_rng(seed)
    qs = q_star(mdp, gamma)
    runs = len(schedules)
    S, A = mdp.n_states, mdp.n_actions
    rec = log_points(steps) if record_at is None else np.asarray(record_at)
    code = np.array([SCHEDULES.index(s) for s in schedules])
    Q = np.zeros((runs, S, A))
    counts = np.zeros((runs, S, A))
    s = np.full(runs, mdp.start)
    idx = np.arange(runs)
    errors = np.empty((len(rec), runs))
    j = 0
    for t in range(steps + 1):
        if j < len(rec) and rec[j] == t:
            errors[j] = np.abs(Q - qs).max(axis=(1, 2))
            j += 1
        if t == steps:
            break
        greedy = Q[idx, s].argmax(-1)
        explore = rng.random(runs) < epsilon
        a = np.where(explore, rng.integers(0, A, runs), greedy)
        r, s_next, done = sample_step(mdp, rng, s, a)
        v_next = np.where(done, 0.0, Q[idx, np.minimum(s_next, S - 1)].max(-1))
        target = r + gamma * v_next
        counts[idx, s, a] += 1
        alpha = np.select(
            [code == 0, code == 1], [1.0 / counts[idx, s, a], 1.0 / (t + 1.0)], default=constant_alpha
        )
        Q[idx, s, a] += alpha * (target - Q[idx, s, a])
        s = np.where(done, mdp.start, s_next)
    return rec, errors, Q


def run_q_learning(t: TabularConfig, seed: int = 0) -> Result:
    """Experiment 2: the ||Q_t - Q*||_inf staircase for the three step-size schedules, ``t.seeds`` runs each."""
    gamma, steps, seeds, epsilon, constant_alpha = t.gamma, t.steps, t.seeds, t.epsilon, t.constant_alpha
    mdp = branching_mdp(t.p_stay)
    schedules = [sch for sch in SCHEDULES for _ in range(seeds)]
    rec, errors, _ = tabular_q_learning(
        mdp, gamma, steps, schedules, seed, epsilon=epsilon, constant_alpha=constant_alpha
    )
    cols: dict[str, np.ndarray] = {"step": rec}
    summary: dict = {"gamma": gamma, "steps": steps, "seeds": seeds, "epsilon": epsilon}
    for i, sch in enumerate(SCHEDULES):
        e = errors[:, i * seeds : (i + 1) * seeds]
        cols[f"{sch}_mean"] = e.mean(1)
        cols[f"{sch}_min"] = e.min(1)
        cols[f"{sch}_max"] = e.max(1)
        summary[f"final_error_{sch}_mean"] = float(e[-1].mean())
        summary[f"final_error_{sch}_max"] = float(e[-1].max())
    return Result("q-learning", {"q-learning": cols}, summary)


# --------------------------------------------------------------------------------------------------
# 3. linear function approximation
# --------------------------------------------------------------------------------------------------


def cosine_features(mdp: TabularMDP) -> np.ndarray:
    """phi(s, a) = [1, cos(pi * depth(s) / 3), a]  -> (S, A, 3): Q_theta = theta1 + theta2 cos(.) + theta3 a."""
    S, A = mdp.n_states, mdp.n_actions
    d = np.broadcast_to(mdp.depth[:, None], (S, A)).astype(float)
    a = np.broadcast_to(np.arange(A)[None, :], (S, A)).astype(float)
    return np.stack([np.ones((S, A)), np.cos(np.pi * d / 3.0), a], axis=-1)


def least_squares_projection(phi: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Pi q: the (unweighted) least-squares projection of q onto span(phi) over all (s, a) pairs."""
    X = phi.reshape(-1, phi.shape[-1])
    theta, *_ = np.linalg.lstsq(X, q.reshape(-1), rcond=None)
    return (X @ theta).reshape(q.shape)


def minimax_floor(phi: np.ndarray, q: np.ndarray) -> float:
    """min_theta ||phi theta - q||_inf, exactly: the LP  min t s.t. |X theta - q| <= t  has k+1 variables,
    so an optimum sits at a vertex with k+1 active constraints (rows j with signs +-). Enumerate them all
    (C(10, 4) * 16 = 3360 4x4 solves here) and keep the best feasible one (no scipy needed)."""
    X = phi.reshape(-1, phi.shape[-1])
    y = q.reshape(-1)
    n, k = X.shape
    if n <= k:  # at least as many features as pairs: least squares interpolates when X has full row rank
        theta, *_ = np.linalg.lstsq(X, y, rcond=None)
        return float(np.abs(X @ theta - y).max())
    best = np.inf
    for rows in itertools.combinations(range(n), k + 1):
        for signs in itertools.product((-1.0, 1.0), repeat=k + 1):
            M = np.concatenate([X[list(rows)], -np.array(signs)[:, None]], axis=1)
            if abs(np.linalg.det(M)) < 1e-12:
                continue
            sol = np.linalg.solve(M, y[list(rows)])
            best = min(best, float(np.abs(X @ sol[:k] - y).max()))
    return best


def semi_gradient_q_learning(
    mdp: TabularMDP,
    phi: np.ndarray,
    gamma: float,
    steps: int,
    runs: int,
    seed: int,
    alpha: float = 0.02,
    epsilon: float = 0.2,
    record_at: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear Q-learning, theta += alpha (r + gamma max_a' phi(s',a')theta - phi(s,a)theta) phi(s,a) (the
    target is not differentiated: *semi*-gradient). Returns (record_at, Q_theta per record (R, runs, S, A),
    theta (runs, k))."""
    rng = np.random.default_rng(seed)
    S, A, k = phi.shape
    rec = log_points(steps) if record_at is None else np.asarray(record_at)
    theta = np.zeros((runs, k))
    s = np.full(runs, mdp.start)
    idx = np.arange(runs)
    qs_rec = np.empty((len(rec), runs, S, A))
    j = 0
    for t in range(steps + 1):
        if j < len(rec) and rec[j] == t:
            qs_rec[j] = np.einsum("sak,rk->rsa", phi, theta)
            j += 1
        if t == steps:
            break
        q_s = np.einsum("rak,rk->ra", phi[s], theta)
        explore = rng.random(runs) < epsilon
        a = np.where(explore, rng.integers(0, A, runs), q_s.argmax(-1))
        r, s_next, done = sample_step(mdp, rng, s, a)
        q_next = np.einsum("rak,rk->ra", phi[np.minimum(s_next, S - 1)], theta).max(-1)
        target = r + gamma * np.where(done, 0.0, q_next)
        f = phi[s, a]  # (runs, k)
        theta += alpha * (target - q_s[idx, a])[:, None] * f
        s = np.where(done, mdp.start, s_next)
    return rec, qs_rec, theta


def run_function_approximation(t: TabularConfig, seed: int = 0) -> Result:
    """Experiment 3: semi-gradient Q-learning with 3 cosine features (step size ``t.fa_alpha``) vs the
    projection floor."""
    gamma, steps, seeds, alpha, epsilon = t.gamma, t.steps, t.seeds, t.fa_alpha, t.epsilon
    mdp = branching_mdp(t.p_stay)
    qs = q_star(mdp, gamma)
    phi = cosine_features(mdp)
    pq = least_squares_projection(phi, qs)
    l2_floor_sup = float(np.abs(pq - qs).max())
    l2_floor_rms = float(np.sqrt(np.mean((pq - qs) ** 2)))
    minimax = minimax_floor(phi, qs)
    rec, q_rec, theta = semi_gradient_q_learning(mdp, phi, gamma, steps, seeds, seed, alpha, epsilon)
    sup = np.abs(q_rec - qs).max(axis=(2, 3))  # (records, runs)
    rms = np.sqrt(((q_rec - qs) ** 2).mean(axis=(2, 3)))
    tail = sup[len(rec) * 9 // 10 :]
    cols = {
        "step": rec,
        "sup_error_mean": sup.mean(1),
        "sup_error_min": sup.min(1),
        "sup_error_max": sup.max(1),
        "rms_error_mean": rms.mean(1),
        "floor_l2_projection_sup": np.full(len(rec), l2_floor_sup),
        "floor_minimax_sup": np.full(len(rec), minimax),
        "floor_l2_projection_rms": np.full(len(rec), l2_floor_rms),
    }
    final_q = q_rec[-1].mean(0)
    summary = {
        "gamma": gamma,
        "steps": steps,
        "alpha": alpha,
        "floor_l2_projection_sup": l2_floor_sup,
        "floor_l2_projection_rms": l2_floor_rms,
        "floor_minimax_sup": minimax,
        "final_sup_error_mean": float(sup[-1].mean()),
        "final_sup_error_min": float(sup[-1].min()),
        "tail_sup_error_mean": float(tail.mean()),
        "min_sup_error_over_training": float(sup[1:].min()),
        "min_rms_error_over_training": float(rms.min()),
        "theta_mean": theta.mean(0).tolist(),
        "q_star": qs.tolist(),
        "projection": pq.tolist(),
        "final_q_mean": final_q.tolist(),
    }
    pairs = {
        "state": np.repeat(np.array(mdp.names), mdp.n_actions),
        "action": np.tile(np.arange(mdp.n_actions), mdp.n_states),
        "q_star": qs.reshape(-1),
        "projection": pq.reshape(-1),
        "q_theta_final_mean": final_q.reshape(-1),
    }
    return Result(
        "function-approximation",
        {"function-approximation": cols, "function-approximation_values": pairs},
        summary,
    )
