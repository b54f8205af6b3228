"""``digiq theory <experiment>``: reproduce the Q-learning theory experiments behind Digi-Q's critic.

Each experiment writes ``<output_dir>/<experiment>.png``, one or more CSVs, ``<experiment>_summary.json``
and the resolved ``config.yaml``; every one is deterministic under ``seed`` and runs in well under a minute
on one CPU core. See docs/theory.md for the maths.

    digiq theory value-iteration          # 1. ||T^k Q - Q*|| vs the gamma^k bound
    digiq theory q-learning               # 2. tabular Q-learning staircase, three step-size schedules
    digiq theory function-approximation   # 3. linear semi-gradient Q-learning vs the projection floor
    digiq theory chain-depth              # 4. 257-parameter MLP on chains of depth 2, 8, 32
    digiq theory discount                 # 5. chain-64 with gamma 0.9 / 0.99 / 0.999 + backup picture
    digiq theory n-step                   # 6. n-step and Monte-Carlo targets on a chain
    digiq theory all output_dir=runs/theory seed=1
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Literal

from digiq.config import ConfigError, check, save_config
from digiq.theory import chain, tabular
from digiq.theory.common import Result, summary_json, write_result
from digiq.theory.plots import plot_result

POSITIONAL = "experiment"

EXPERIMENTS = ("value-iteration", "q-learning", "function-approximation", "chain-depth", "discount", "n-step")


@dataclasses.dataclass
class TabularConfig:
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


@dataclasses.dataclass
class ChainConfig:
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


@dataclasses.dataclass
class Config:
    # Which experiment to run ('all' runs every one in order).
    experiment: Literal[
        "value-iteration", "q-learning", "function-approximation", "chain-depth", "discount", "n-step", "all"
    ] = "all"
    # Where the PNG / CSV / summary files go.
    output_dir: str = "runs/theory"
    # Master seed; every experiment is a deterministic function of it.
    seed: int = 0
    # Write the PNG plots (off: CSV + summary only).
    plot: bool = True
    # Knobs of experiments 1-3 (tabular, depth-3 branching MDP).
    tabular: TabularConfig = dataclasses.field(default_factory=TabularConfig)
    # Knobs of experiments 4-6 (chains, MLP critic).
    chain: ChainConfig = dataclasses.field(default_factory=ChainConfig)

    def validate(self) -> None:
        t, c = self.tabular, self.chain
        check(0 < t.gamma < 1, f"tabular.gamma must be in (0, 1), got {t.gamma}")
        check(0 <= t.p_stay < 1, f"tabular.p_stay must be in [0, 1), got {t.p_stay}")
        check(t.steps > 0 and t.seeds > 0 and t.vi_iters > 0, "tabular.steps, seeds, vi_iters must be > 0")
        check(0 <= t.epsilon <= 1 and 0 <= c.epsilon <= 1, "epsilon must be in [0, 1]")
        check(t.constant_alpha > 0 and t.fa_alpha > 0 and c.alpha > 0, "step sizes must be > 0")
        check(c.hidden > 0, "chain.hidden must be > 0")
        check(len(c.depths) > 0 and min(c.depths) >= 1, f"chain.depths must be >= 1, got {c.depths}")
        check(min(c.discount_depth, c.backup_depth, c.nstep_depth) >= 1, "chain depths must be >= 1")
        for g in (*c.gammas, c.depth_gamma, c.nstep_gamma):
            check(0 < g < 1, f"chain discounts must be in (0, 1), got {g}")
        check(
            len(c.gammas) > 0 and len(c.ns) > 0 and min(c.ns) >= 1,
            "chain.gammas / chain.ns must be non-empty, n >= 1",
        )
        check(c.mc_window >= 0, "chain.mc_window must be >= 0")
        check(0 < c.digiq_tau <= 1, f"chain.digiq_tau must be in (0, 1], got {c.digiq_tau}")
        for name in ("depth", "discount", "nstep"):
            check(getattr(c, f"{name}_steps") > 0, f"chain.{name}_steps must be > 0")
            check(getattr(c, f"{name}_seeds") > 0, f"chain.{name}_seeds must be > 0")


def run_experiment(name: str, cfg: Config) -> Result:
    """Run one experiment with the knobs of ``cfg`` (no files written)."""

    t, c, seed = cfg.tabular, cfg.chain, cfg.seed
    nn = dict(alpha=c.alpha, epsilon=c.epsilon, hidden=c.hidden, optimizer=c.optimizer)
    if name == "value-iteration":
        return tabular.run_value_iteration(t.gamma, t.vi_iters, seed, t.p_stay)
    if name == "q-learning":
        return tabular.run_q_learning(t.gamma, t.steps, t.seeds, seed, t.epsilon, t.constant_alpha, t.p_stay)
    if name == "function-approximation":
        return tabular.run_function_approximation(
            t.gamma, t.steps, t.seeds, seed, t.fa_alpha, t.epsilon, t.p_stay
        )
    if name == "chain-depth":
        return chain.run_chain_depth(c.depths, c.depth_gamma, c.depth_steps, c.depth_seeds, seed, **nn)
    if name == "discount":
        return chain.run_discount(
            c.gammas,
            c.discount_depth,
            c.discount_steps,
            c.discount_seeds,
            seed,
            backup_depth=c.backup_depth,
            **nn,
        )
    if name == "n-step":
        return chain.run_n_step(
            c.ns,
            c.nstep_depth,
            c.nstep_gamma,
            c.nstep_steps,
            c.nstep_seeds,
            seed,
            mc_window=c.mc_window,
            **nn,
        )
    raise ConfigError(f"unknown experiment {name!r}; choose one of {list(EXPERIMENTS)} or 'all'")


def run(cfg: Config) -> dict[str, Result]:
    """Run the chosen experiment(s), write PNG + CSV + summary + config.yaml, print the key numbers."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    names = EXPERIMENTS if cfg.experiment == "all" else (cfg.experiment,)
    results: dict[str, Result] = {}
    for name in names:
        t0 = time.perf_counter()
        res = run_experiment(name, cfg)
        res.summary["seconds"] = round(time.perf_counter() - t0, 2)
        write_result(res, out)
        if cfg.plot:
            plot_result(res, out / f"{name}.png")
        results[name] = res
        scalars = {k: v for k, v in summary_json(res.summary).items() if not isinstance(v, (list, dict))}
        print(f"[{name}] " + ", ".join(f"{k}={_short(v)}" for k, v in scalars.items()))
    print(f"wrote {out}/")
    return results


def _short(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
