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
from digiq.theory.chain import ChainConfig
from digiq.theory.common import Result, summary_json, write_result
from digiq.theory.plots import plot_result
from digiq.theory.tabular import TabularConfig

POSITIONAL = "experiment"

EXPERIMENTS = ("value-iteration", "q-learning", "function-approximation", "chain-depth", "discount", "n-step")


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


_TABULAR = {
    "value-iteration": tabular.run_value_iteration,
    "q-learning": tabular.run_q_learning,
    "function-approximation": tabular.run_function_approximation,
}
_CHAIN = {"chain-depth": chain.run_chain_depth, "discount": chain.run_discount, "n-step": chain.run_n_step}


def run_experiment(name: str, cfg: Config) -> Result:
    """Run one experiment with the knobs of ``cfg`` (no files written)."""

    if name in _TABULAR:
        return _TABULAR[name](cfg.tabular, cfg.seed)
    if name in _CHAIN:
        return _CHAIN[name](cfg.chain, cfg.seed)
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
