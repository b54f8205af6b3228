"""``digiq evaluate``: success rate on the simulated device, or an offline report for imported data.

    digiq evaluate policy=runs/extract/policy                    # sim: held-out test tasks, 95% CI
    digiq evaluate policy=behaviour num_episodes=200             # built-ins: behaviour, optimal, random
    digiq evaluate mode=offline policy=runs/bc/policy dataset=data/aitw critic_dir=runs/critic/critic \\
        features=runs/feats                                      # no emulator: offline metrics

``sim`` reuses :func:`digiq.sim.rollout.evaluate_policy` (Wilson 95% interval). ``offline`` reports the
policy's agreement with the dataset actions on successful trajectories (AitW action matching: two taps
match within ``tap_threshold`` = 0.14 of the screen, swipes by direction, other actions by type) and, when a
critic and its features are given, the critic's Q / V / advantage of the dataset actions and the Pearson
correlation of Q with the discounted return. Writes ``<output_dir>/metrics.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from digiq.actions import Action, ActionType, parse_action
from digiq.config import check, save_config
from digiq.data.schema import decode_batch, load_dataset, undecoded_view
from digiq.data.transitions import load_transitions, successful_rows
from digiq.errors import DataError
from digiq.models.critic import open_critic_and_features
from digiq.models.critic_text import build_inputs, score
from digiq.models.policy import generate_actions, load_policy, load_policy_fn
from digiq.sim.phone import SimConfig, SimPhone
from digiq.sim.rollout import builtin_policy_fn, evaluate_policy
from digiq.utils.io import atomic_write_json
from digiq.utils.logging import get_logger
from digiq.utils.stats import pearson

log = get_logger(__name__)
BUILTINS = ("behaviour", "optimal", "random")


@dataclasses.dataclass
class Config:
    # An exported policy folder, or a built-in simulator policy (behaviour, optimal, random).
    policy: str = "behaviour"
    # sim = roll out on the simulated device; offline = metrics on a dataset (imported AitW data).
    mode: Literal["sim", "offline"] = "sim"
    # sim: task split (test = held-out tasks) and number of episodes.
    split: Literal["train", "test"] = "test"
    num_episodes: int = 100
    # Episodes stepped together (the policy's generation batch).
    batch_size: int = 32
    # Where the policy runs ('auto' = a GPU when visible) and its weights' dtype ('auto' = bfloat16 on a
    # GPU, float32 on the CPU).
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # None = the export's setting; 0 = greedy; > 0 = sample at this temperature (official eval: 0.8).
    temperature: float | None = None
    seed: int = 0
    # Override the export's generation cap (None = keep it); a cap bounds the cost of a junk-emitting policy.
    max_new_tokens: int | None = None
    # offline: the dataset, and optionally a critic + its feature cache.
    dataset: str = ""
    critic_dir: str = ""
    features: str = ""
    # offline: AitW tap-match radius (fraction of the screen).
    tap_threshold: float = 0.14
    # offline: evaluate at most this many successful-trajectory rows (0 = all).
    max_rows: int = 0
    output_dir: str = "runs/eval"
    sim: SimConfig = dataclasses.field(default_factory=SimConfig)

    def validate(self) -> None:
        check(bool(self.policy) or self.mode == "offline", "policy must be set")
        check(self.num_episodes > 0 and self.batch_size > 0, "num_episodes and batch_size must be > 0")
        check(self.mode != "offline" or bool(self.dataset), "mode=offline needs dataset=<folder>")
        check(self.mode != "offline" or self.policy not in BUILTINS, "built-in policies need mode=sim")
        check(bool(self.critic_dir) == bool(self.features), "critic_dir and features go together")


# --------------------------------------------------------------------------------------------------
# AitW action matching
# --------------------------------------------------------------------------------------------------


def actions_match(pred: Action, ref: Action, tap_threshold: float = 0.14) -> bool:
    """AitW-style match: taps within ``tap_threshold`` (Euclidean, normalised), swipes by main direction,
    TYPE by type and case-insensitive text, other actions by type. (AitW's matcher also accepts taps inside
    the same UI element's box; imported data has no boxes, so distance alone decides.)"""
    if not pred.is_valid or not ref.is_valid or pred.type is not ref.type:
        return False
    if pred.type is ActionType.DUAL_POINT:
        if pred.is_tap != ref.is_tap:
            return False
        if pred.is_tap:
            return math.dist(pred.touch, ref.touch) <= tap_threshold
        return _direction(pred) == _direction(ref)
    if pred.type is ActionType.TYPE:
        return pred.text.strip().lower() == ref.text.strip().lower()
    return True


def _direction(a: Action) -> str:
    dy, dx = a.lift[0] - a.touch[0], a.lift[1] - a.touch[1]
    if abs(dy) >= abs(dx):
        return "down" if dy > 0 else "up"
    return "right" if dx > 0 else "left"


# --------------------------------------------------------------------------------------------------
# Modes
# --------------------------------------------------------------------------------------------------


def evaluate_sim(cfg: Config) -> dict[str, Any]:
    phone = SimPhone(cfg.sim)
    if cfg.policy in BUILTINS:
        fn = builtin_policy_fn(cfg.policy, phone, seed=cfg.seed)
    else:
        fn = load_policy_fn(
            cfg.policy,
            cfg.temperature,
            cfg.seed,
            device=cfg.device,
            batch_size=cfg.batch_size,
            max_new_tokens=cfg.max_new_tokens,
            dtype=cfg.dtype,
        )
    res = evaluate_policy(fn, cfg.split, cfg.num_episodes, cfg.seed, phone, cfg.batch_size, progress=True)
    res["policy"] = cfg.policy
    return res


def evaluate_offline(cfg: Config) -> dict[str, Any]:
    ds = load_dataset(cfg.dataset)
    res: dict[str, Any] = {"policy": cfg.policy, "dataset": cfg.dataset}
    if (
        cfg.critic_dir
    ):  # cheap and checks its inputs: before the policy's generation, so a mismatch fails fast
        res.update(critic_metrics(cfg, ds))
    rows = successful_rows(ds.select_columns(["traj_id", "reward"]))
    if cfg.max_rows:
        rows = rows[: cfg.max_rows]
    if len(rows) == 0:
        raise DataError(f"{cfg.dataset}: no successful trajectory to compare the policy's actions with")
    model, processor, spec = load_policy(cfg.policy, cfg.device, cfg.dtype)
    view = undecoded_view(ds, ["screenshot", "observation", "action"])  # decoded per batch, named errors
    matches, types = [], []
    for s in tqdm(range(0, len(rows), cfg.batch_size), desc="evaluate (offline)", unit="batch"):
        got = decode_batch(view[[int(r) for r in rows[s : s + cfg.batch_size]]], str(cfg.dataset))
        preds = generate_actions(
            model,
            processor,
            got["screenshot"],
            got["observation"],
            1,
            cfg.temperature,
            cfg.max_new_tokens,
            seed=cfg.seed,
            spec=spec,
        )
        for p, ref in zip(preds, got["action"]):
            pa, ra = parse_action(p[0]), parse_action(ref)
            matches.append(actions_match(pa, ra, cfg.tap_threshold))
            types.append(pa.type is ra.type)
    res.update(
        action_match=float(np.mean(matches)),
        type_match=float(np.mean(types)),
        rows_compared=len(matches),
    )
    return res


def critic_metrics(cfg: Config, ds: Any) -> dict[str, float]:
    """Q / V / A of the dataset actions and corr(Q, discounted return) over all rows.

    The cache is checked against the dataset as train-critic checks it (rows, fingerprint, widths), and the
    return is recomputed from the rewards with the critic's own gamma: the dataset's stored ``mc_return``
    may have been written with another discount.
    """
    critic, cache, meta = open_critic_and_features(cfg.critic_dir, cfg.features, ds, cfg.dataset)
    gamma = float(meta.get("gamma", 0.95))
    inputs = build_inputs(critic, cache.state, cache.actions, ds, cfg.features)
    q_t, v_t = score(critic, inputs, torch.arange(len(ds)), 0)
    q, v = q_t.numpy(), v_t.numpy()
    tr, _ = load_transitions(cfg.dataset, gamma)
    mc = tr.mc_return.astype(np.float64)
    return {
        "critic/gamma": gamma,
        "critic/q_mean": float(q.mean()),
        "critic/v_mean": float(v.mean()),
        "critic/advantage_mean": float((q - v).mean()),
        "critic/advantage_positive_fraction": float((q - v > 0).mean()),
        "critic/pearson_q_mc_return": float(pearson(q, mc)),
    }


def run(cfg: Config) -> dict[str, Any]:
    t0 = time.perf_counter()
    res = evaluate_sim(cfg) if cfg.mode == "sim" else evaluate_offline(cfg)
    res["mode"] = cfg.mode
    res["seconds"] = time.perf_counter() - t0
    out = Path(cfg.output_dir)
    save_config(cfg, out)
    atomic_write_json(out / "metrics.json", res)
    if cfg.mode == "sim":
        sys.stdout.write(
            f"{cfg.policy} on {cfg.split}: success {res['success_rate']:.3f} "
            f"(95% CI {res['ci_low']:.3f}-{res['ci_high']:.3f}, n={res['num_episodes']})\n"
        )
    else:
        sys.stdout.write(json.dumps({k: v for k, v in res.items() if not isinstance(v, dict)}) + "\n")
    return res
