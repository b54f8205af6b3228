"""Experiments 4-6 on chain MDPs with a 257-parameter MLP critic: depth, discount, n-step / MC targets.

The chain (see :func:`digiq.theory.mdp.chain_mdp`): states ``0..D-1``, actions ``stay`` (0: the screen does
not change) and ``forward`` (1); ``forward`` from state ``D-1`` ends the episode with reward +1, every other
reward is 0. So Q*(s, forward) = gamma^(D-1-s) and Q*(s, stay) = gamma^(D-s): the value of the start state is
a product of D bootstrapped backups, which is what makes depth and gamma -> 1 hard.

Encoding (why 257 parameters): input = (s / (D-1), a) with a in {0, 1}, output = the scalar Q(s, a);
2*64 + 64 + 64*1 + 1 = 257. A scalar-state input with one output per action would be 1*64+64+64*2+2 = 258;
a scalar input with a single output (193) could not tell the two actions apart. Feeding the action as an
input mirrors Digi-Q's critic, which scores f(s, a) and outputs one number (DigiRL-agent/digiq @ 8181379,
``digiq/models/critic.py:156-157``).

Data: online epsilon-greedy (epsilon = 0.3) with *exploring starts* (each episode begins at a uniformly random
state). Uniform starts stand in for an offline dataset that covers every screen; they remove the exploration
problem (a random walk rarely reaches the end of a 64-chain) so the curves isolate bootstrapping. One SGD
step (step size alpha on 0.5 (Q - y)^2, batch size 1) per environment step, semi-gradient: the target y is
held fixed. All runs of a sweep (depths x gammas x seeds x n) train in lock-step as one numpy batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np

from digiq.theory.common import Result, log_points
from digiq.theory.mdp import chain_mdp, value_iteration
from digiq.theory.mlp import Adam, forward, grad_mse, init_mlp, n_params, sgd_


@dataclasses.dataclass
class ChainConfig:
    """Knobs of experiments 4-6 (``digiq theory``'s ``chain.*``)."""

    # Hidden units of the 1-hidden-layer ReLU critic (64 -> 257 parameters with input (s, a), one output).
    hidden: int = 64
    # Step size.
    alpha: float = 5e-4
    # 'adam' (default) or plain 'sgd' on 0.5 (Q - y)^2, one transition per step.
    optimizer: Literal["adam", "sgd"] = "adam"
    # Exploration of the epsilon-greedy behaviour policy.
    epsilon: float = 0.3
    # Experiment 4: chain depths, discount, steps, seeds.
    depths: tuple[int, ...] = (2, 8, 32)
    depth_gamma: float = 0.9
    depth_steps: int = 10_000
    depth_seeds: int = 3
    # Experiment 5: discounts, chain depth, steps, seeds, and the depth of the backup picture.
    gammas: tuple[float, ...] = (0.9, 0.99, 0.999)
    discount_depth: int = 64
    discount_steps: int = 60_000
    discount_seeds: int = 5
    backup_depth: int = 5
    # Experiment 6: n values (a Monte-Carlo curve is always added), chain depth, discount, steps, seeds.
    ns: tuple[int, ...] = (1, 4, 16)
    nstep_depth: int = 32
    nstep_gamma: float = 0.99
    nstep_steps: int = 20_000
    nstep_seeds: int = 3
    # Window of the Monte-Carlo target in steps (0 = 8 x depth; longer episodes are bootstrapped).
    mc_window: int = 0
    # Add Digi-Q's TD critic (Q and V heads, EMA targets, V(s) <- Q_targ(s, a_data)) to experiment 6.
    nstep_digiq_td: bool = True
    # EMA rate of its target networks (official: 0.1 per optimiser step).
    digiq_tau: float = 0.1


def _net(c: ChainConfig) -> dict[str, Any]:
    """The critic and data settings every chain experiment passes to :func:`train_chain`."""
    return dict(alpha=c.alpha, epsilon=c.epsilon, hidden=c.hidden, optimizer=c.optimizer)


def chain_q_star(depth: int, gamma: float) -> np.ndarray:
    """Closed form (D, 2): column 0 = stay, column 1 = forward."""
    fwd = gamma ** (depth - 1 - np.arange(depth, dtype=float))
    return np.stack([gamma * fwd, fwd], axis=-1)


def _inputs(s: np.ndarray, a: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """(R, N) states/actions -> (R, N, 2) inputs (normalised position, action)."""
    pos = s / np.maximum(depth - 1, 1)[:, None]
    return np.stack([pos, a.astype(float)], axis=-1)


def n_step_targets(
    rewards: np.ndarray, dones: np.ndarray, ns: np.ndarray, gammas: np.ndarray, v_boot: np.ndarray
) -> np.ndarray:
    """n-step targets for the entry ``W - n`` of each run's window (oldest first, length W):
    ``sum_{k<n} gamma^k r_k`` over the last ``n`` entries, cut after the first ``done``, plus
    ``gamma^n v_boot`` if no entry in those ``n`` ended the episode. ``v_boot`` = max_a Q(s after the newest
    entry, a). rewards/dones: (R, W); ns, gammas, v_boot: (R,)."""
    R, W = rewards.shape
    first = W - ns
    j = np.arange(W)[None, :]
    in_horizon = j >= first[:, None]
    disc = np.where(in_horizon, gammas[:, None] ** np.maximum(j - first[:, None], 0), 0.0)
    d_h = dones & in_horizon
    alive = np.cumprod(np.concatenate([np.ones((R, 1)), 1.0 - d_h[:, :-1]], axis=1), axis=1)
    not_ended = alive[:, -1] * (1.0 - d_h[:, -1])
    return (disc * alive * rewards).sum(1) + gammas**ns * not_ended * v_boot


def train_chain(
    depths: np.ndarray,
    gammas: np.ndarray,
    steps: int,
    seed: int,
    n_steps: np.ndarray | None = None,
    hidden: int = 64,
    alpha: float = 5e-4,
    epsilon: float = 0.3,
    record_at: np.ndarray | None = None,
    optimizer: str = "adam",
    oracle: np.ndarray | None = None,
    digiq_td: np.ndarray | None = None,
    tau: float = 0.1,
) -> dict[str, np.ndarray]:
    """Train ``R = len(depths)`` independent MLP critics with (n-step) semi-gradient Q-learning.

    ``n_steps[r]``: the target for the transition taken at time t is
    sum_{k<n} gamma^k r_{t+k} + gamma^n max_a Q(s_{t+n}, a), cut at the episode's end (n = 1 is Q-learning;
    n >= the episode length is a Monte-Carlo return). With epsilon-greedy data the uncorrected n-step return
    evaluates the behaviour policy's "stay" detours, so n trades bootstrapping bias for off-policy bias.
    Each transition is updated exactly once, ``n - 1`` steps after it happened (a sliding window).
    ``oracle[r]``: regress on Q*(s, a) instead (same data, network and optimiser, no bootstrapping), which
    measures how well the network can fit Q* at all; the gap to it is what bootstrapping adds.
    ``optimizer``: 'adam' (default; step size ``alpha``) or 'sgd'.
    ``digiq_td[r]``: Digi-Q's TD critic instead (DigiRL-agent/digiq @ 8181379,
    ``digiq/algorithms/digiq/trainer.py:133-176``): a second
    MLP V(s) (1 -> hidden -> 1) and EMA target copies of both (rate ``tau``, official 0.1 per step);
    Q(s, a) <- r + gamma (1 - d) V_targ(s') and V(s) <- Q_targ(s, a_data), the SARSA-style in-sample backup
    with no max. (We copy the online weights into the targets at the start; the official target critic is
    initialised independently.) Such runs must have n = 1.

    Returns ``record_at``, ``errors`` (records, R) = ||Q_theta - Q*||_inf over all (s, a), ``errors_start``
    = max_a |Q_theta(0, a) - Q*(0, a)| (the state farthest from the reward), ``q_final``
    (R, Dmax, 2) and ``q_star`` (R, Dmax, 2) padded with NaN past each run's depth, and ``n_params``.
    """
    rng = np.random.default_rng(seed)
    depths = np.asarray(depths, dtype=int)
    gammas = np.asarray(gammas, dtype=float)
    R = len(depths)
    ns = np.ones(R, dtype=int) if n_steps is None else np.asarray(n_steps, dtype=int)
    W = int(ns.max())  # window length
    rec = log_points(steps, 200) if record_at is None else np.asarray(record_at)
    params = init_mlp(R, 2, hidden, rng)
    adam = Adam(params, alpha) if optimizer == "adam" else None
    use_v = np.zeros(R, dtype=bool) if digiq_td is None else np.asarray(digiq_td, dtype=bool)
    if np.any(use_v & (ns != 1)):
        raise ValueError("digiq_td runs use one-step targets: set n_steps = 1 for them")
    if use_v.any():
        v_params = init_mlp(R, 1, hidden, rng)
        v_adam = Adam(v_params, alpha) if optimizer == "adam" else None
        q_targ = {k: v.copy() for k, v in params.items()}
        v_targ = {k: v.copy() for k, v in v_params.items()}

    # evaluation grid: every (s, a) of every run, padded to the longest chain
    dmax = int(depths.max())
    grid_s = np.tile(np.repeat(np.arange(dmax), 2), (R, 1))
    grid_a = np.tile(np.tile([0, 1], dmax), (R, 1))
    x_grid = _inputs(grid_s, grid_a, depths)
    valid = grid_s < depths[:, None]
    qstar = np.full((R, dmax, 2), np.nan)
    for r in range(R):
        qstar[r, : depths[r]] = chain_q_star(int(depths[r]), float(gammas[r]))
    qstar_flat = qstar.reshape(R, -1)

    # sliding window of the last W transitions, oldest first
    buf_s = np.zeros((R, W), dtype=int)
    buf_a = np.zeros((R, W), dtype=int)
    buf_r = np.zeros((R, W))
    buf_d = np.zeros((R, W), dtype=bool)
    buf_ok = np.zeros((R, W), dtype=bool)
    first = W - ns  # index of the entry whose n-step horizon completes at this step
    idx = np.arange(R)

    acts = np.tile([0, 1], (R, 1))
    s = rng.integers(0, depths)
    errors = np.empty((len(rec), R))
    errors_start = np.empty((len(rec), R))
    j = 0
    for t in range(steps + 1):
        if j < len(rec) and rec[j] == t:
            q_grid, _ = forward(params, x_grid)
            gap = np.where(valid, np.abs(q_grid - qstar_flat), np.nan)
            errors[j] = np.nanmax(gap, axis=1)
            errors_start[j] = gap[:, :2].max(1)  # state 0, the farthest from the reward
            j += 1
        if t == steps:
            break
        # act: epsilon-greedy on Q(s, stay), Q(s, forward)
        both = np.stack([s, s], axis=1)
        q_s, _ = forward(params, _inputs(both, acts, depths))
        explore = rng.random(R) < epsilon
        a = np.where(explore, rng.integers(0, 2, R), q_s.argmax(-1))
        done = (a == 1) & (s == depths - 1)
        rwd = done.astype(float)
        s_next = np.where(done, rng.integers(0, depths), s + a)  # exploring start after the end
        # push into the window
        buf_s[:, :-1], buf_a[:, :-1], buf_r[:, :-1] = buf_s[:, 1:], buf_a[:, 1:], buf_r[:, 1:]
        buf_d[:, :-1], buf_ok[:, :-1] = buf_d[:, 1:], buf_ok[:, 1:]
        buf_s[:, -1], buf_a[:, -1], buf_r[:, -1], buf_d[:, -1], buf_ok[:, -1] = s, a, rwd, done, True
        nxt = np.stack([s_next, s_next], axis=1)
        q_next, _ = forward(params, _inputs(nxt, acts, depths))
        v_boot = q_next.max(-1)
        if use_v.any():
            pos_next = (s_next / np.maximum(depths - 1, 1))[:, None, None]
            v_boot = np.where(use_v, forward(v_targ, pos_next)[0][:, 0], v_boot)
        y = n_step_targets(buf_r, buf_d, ns, gammas, v_boot)
        if oracle is not None:  # supervised regression on Q* itself: the approximation/optimisation floor
            y = np.where(oracle, qstar[idx, buf_s[idx, first], buf_a[idx, first]], y)
        upd = buf_ok[idx, first].astype(float)  # the window is not full yet at the very start
        x = _inputs(buf_s[idx, first][:, None], buf_a[idx, first][:, None], depths)
        q, cache = forward(params, x)
        g = grad_mse(params, x, cache, (q[:, 0] - y)[:, None] * upd[:, None])
        if adam is None:
            sgd_(params, g, alpha)
        else:
            adam.step_(params, g, upd > 0)
        if use_v.any():  # V(s) <- Q_targ(s, a_data) on the same transition, then the EMA targets
            y_v = forward(q_targ, x)[0][:, 0]
            xv = x[:, :, :1]
            v, v_cache = forward(v_params, xv)
            gv = grad_mse(v_params, xv, v_cache, (v[:, 0] - y_v)[:, None] * (upd * use_v)[:, None])
            if v_adam is None:
                sgd_(v_params, gv, alpha)
            else:
                v_adam.step_(v_params, gv, (upd > 0) & use_v)
            for tgt, src in ((q_targ, params), (v_targ, v_params)):
                for k in tgt:
                    tgt[k] += tau * (src[k] - tgt[k])
        s = s_next
    q_grid, _ = forward(params, x_grid)
    q_final = np.where(valid, q_grid, np.nan).reshape(R, dmax, 2)
    return {
        "record_at": rec,
        "errors": errors,
        "errors_start": errors_start,
        "q_final": q_final,
        "q_star": qstar,
        "n_params": np.array(n_params(params)),
    }


# --------------------------------------------------------------------------------------------------
# 4. chain depth
# --------------------------------------------------------------------------------------------------


def _final(errors: np.ndarray) -> np.ndarray:
    """Final error per run: mean over the last 10% of the records (single-sample updates are noisy)."""
    return errors[-max(1, len(errors) // 10) :].mean(0)


def _bands(cols: dict[str, np.ndarray], prefix: str, err: np.ndarray) -> None:
    """Add ``<prefix>_mean/_min/_max`` over the runs (columns) of ``err``."""
    cols[f"{prefix}_mean"] = err.mean(1)
    cols[f"{prefix}_min"] = err.min(1)
    cols[f"{prefix}_max"] = err.max(1)


def run_chain_depth(c: ChainConfig, seed: int = 0) -> Result:
    """Experiment 4: error vs steps per depth (Q-learning and the supervised-on-Q* baseline), and the final
    per-state bias Q_theta(s, forward) - Q*(s, forward) vs the distance to the terminal."""
    depths, gamma, steps, seeds = c.depths, c.depth_gamma, c.depth_steps, c.depth_seeds
    d = np.tile(np.repeat(np.asarray(depths), seeds), 2)
    oracle = np.repeat([False, True], len(depths) * seeds)
    out = train_chain(d, np.full(len(d), gamma), steps, seed, oracle=oracle, **_net(c))
    err, fin = out["errors"], _final(out["errors"])
    cols: dict[str, np.ndarray] = {"step": out["record_at"]}
    bias_cols: dict[str, list] = {
        "depth": [],
        "distance": [],
        "bias_mean": [],
        "bias_min": [],
        "bias_max": [],
    }
    summary: dict = {"gamma": gamma, "steps": steps, "seeds": seeds, "n_params": int(out["n_params"])}
    n_td = len(depths) * seeds
    for i, D in enumerate(depths):
        sl = slice(i * seeds, (i + 1) * seeds)
        so = slice(n_td + i * seeds, n_td + (i + 1) * seeds)
        _bands(cols, f"depth{D}", err[:, sl])
        _bands(cols, f"depth{D}_oracle", err[:, so])
        summary[f"final_error_depth{D}"] = float(fin[sl].mean())
        summary[f"final_error_oracle_depth{D}"] = float(fin[so].mean())
        bias = out["q_final"][sl, :D, 1] - out["q_star"][sl, :D, 1]  # forward action, (seeds, D)
        dist = D - np.arange(D)  # forward steps to the terminal
        for k in range(D):
            bias_cols["depth"].append(D)
            bias_cols["distance"].append(int(dist[k]))
            bias_cols["bias_mean"].append(float(bias[:, k].mean()))
            bias_cols["bias_min"].append(float(bias[:, k].min()))
            bias_cols["bias_max"].append(float(bias[:, k].max()))
        summary[f"mean_abs_bias_depth{D}"] = float(np.abs(bias).mean())
    tables = {"chain-depth": cols, "chain-depth_bias": {k: np.asarray(v) for k, v in bias_cols.items()}}
    return Result("chain-depth", tables, summary)


# --------------------------------------------------------------------------------------------------
# 5. discount
# --------------------------------------------------------------------------------------------------


def backup_sweeps(depth: int = 5, gamma: float = 0.9) -> np.ndarray:
    """V_k(s) = max_a (T^k 0)(s, a) for k = 0..depth on a chain: (depth + 1, depth). Exact value information
    travels one state per synchronous sweep, so V_k(s) = V*(s) exactly when s >= depth - k, else 0."""
    return value_iteration(chain_mdp(depth), gamma, depth).max(-1)


def run_discount(c: ChainConfig, seed: int = 0) -> Result:
    """Experiment 5: a chain of ``discount_depth`` for several gammas (bands over seeds), each next to the same
    network regressed on Q* directly (``oracle``), plus the D-sweep backup picture on a ``backup_depth`` chain.

    The sup-norm error mixes two things: how hard Q* is to *fit* (gamma = 0.9 makes gamma^(D-1-s) a sharp
    exponential near the goal) and what *bootstrapping* adds (errors in the target are re-used, amplified
    by up to min(D, 1/(1-gamma))). The oracle run measures the first; ``bootstrap_excess`` = TD - oracle the
    second."""
    gammas, depth, steps, seeds = c.gammas, c.discount_depth, c.discount_steps, c.discount_seeds
    n = len(gammas) * seeds
    g = np.tile(np.repeat(np.asarray(gammas, dtype=float), seeds), 2)
    oracle = np.repeat([False, True], n)
    out = train_chain(np.full(len(g), depth), g, steps, seed, oracle=oracle, **_net(c))
    err, fin, fin_start = out["errors"], _final(out["errors"]), _final(out["errors_start"])
    cols: dict[str, np.ndarray] = {"step": out["record_at"]}
    summary: dict = {"depth": depth, "steps": steps, "seeds": seeds}
    for i, gm in enumerate(gammas):
        sl = slice(i * seeds, (i + 1) * seeds)
        so = slice(n + i * seeds, n + (i + 1) * seeds)
        _bands(cols, f"gamma{gm:g}", err[:, sl])
        _bands(cols, f"gamma{gm:g}_oracle", err[:, so])
        _bands(cols, f"gamma{gm:g}_start", out["errors_start"][:, sl])
        summary[f"final_error_gamma{gm:g}"] = float(fin[sl].mean())
        summary[f"final_error_oracle_gamma{gm:g}"] = float(fin[so].mean())
        summary[f"bootstrap_excess_gamma{gm:g}"] = float(fin[sl].mean() - fin[so].mean())
        summary[f"final_start_error_gamma{gm:g}"] = float(fin_start[sl].mean())
        summary[f"q_star_start_gamma{gm:g}"] = float(gm ** (depth - 1))
    backup_depth = c.backup_depth
    V = backup_sweeps(backup_depth, gammas[0])
    backup = {
        "sweep": np.repeat(np.arange(V.shape[0]), V.shape[1]),
        "state": np.tile(np.arange(V.shape[1]), V.shape[0]),
        "value": V.reshape(-1),
    }
    summary["backup_depth"] = backup_depth
    return Result("discount", {"discount": cols, "discount_backup": backup}, summary)


# --------------------------------------------------------------------------------------------------
# 6. n-step / Monte-Carlo targets
# --------------------------------------------------------------------------------------------------


def run_n_step(c: ChainConfig, seed: int = 0) -> Result:
    """Experiment 6: horizon reduction. n-step targets for each n in ``ns``, a Monte-Carlo target (Digi-Q's
    'mc' critic loss: regression on the discounted return) over a window of ``mc_window`` steps (0 = 8 * depth;
    the rare longer episode is bootstrapped), and optionally (``nstep_digiq_td``) Digi-Q's TD critic (Q and V
    heads, EMA targets at rate ``digiq_tau``, in-sample V backup; see :func:`train_chain`). Both Digi-Q losses
    evaluate the *behaviour* policy (no max), so against Q* they carry the off-policy gap of the
    epsilon-greedy data."""
    ns, depth, gamma, steps, seeds = c.ns, c.nstep_depth, c.nstep_gamma, c.nstep_steps, c.nstep_seeds
    digiq_td = c.nstep_digiq_td
    mcw = c.mc_window or 8 * depth
    labels = [f"n{n}" for n in ns] + ["mc"] + (["digiq_td"] if digiq_td else [])
    n_list = [*ns, mcw] + ([1] if digiq_td else [])
    n_arr = np.repeat(np.asarray(n_list), seeds)
    use_v = np.repeat([lab == "digiq_td" for lab in labels], seeds)
    out = train_chain(
        np.full(len(n_arr), depth),
        np.full(len(n_arr), gamma),
        steps,
        seed,
        n_steps=n_arr,
        digiq_td=use_v,
        tau=c.digiq_tau,
        **_net(c),
    )
    err = out["errors"]
    fin = _final(err)
    cols: dict[str, np.ndarray] = {"step": out["record_at"]}
    summary: dict = {"depth": depth, "gamma": gamma, "steps": steps, "seeds": seeds, "mc_window": mcw}
    for i, lab in enumerate(labels):
        sl = slice(i * seeds, (i + 1) * seeds)
        _bands(cols, lab, err[:, sl])
        summary[f"final_error_{lab}"] = float(fin[sl].mean())
    return Result("n-step", {"n-step": cols}, summary)
