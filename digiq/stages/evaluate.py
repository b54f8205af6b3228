"""``digiq evaluate``: success rate on an environment, or an offline report for imported data.

    digiq evaluate policy=runs/extract/policy                    # the simulator's held-out test tasks, 95% CI
    digiq evaluate policy=behaviour num_episodes=200             # built-ins: behaviour, optimal, random
    digiq evaluate policy=runs/bc/policy trace=true              # + where failed episodes first went wrong
    digiq evaluate env=miniwob policy=runs/mw/extract_policy/policy num_workers=2   # fresh MiniWoB++ seeds
    digiq evaluate env=miniwob policy=optimal                    # any registered environment
    digiq evaluate mode=offline policy=runs/bc/policy dataset=data/aitw critic_dir=runs/critic/critic \\
        features=runs/feats                                      # no emulator: offline metrics

``sim rollout`` is this command's alias with env=sim. ``online`` (``sim`` is its old name) runs :func:`digiq.envs.evaluate_policy` on ``env`` (Wilson 95% interval). ``offline`` reports the
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
from digiq.envs import BUILTINS, builtin_policy_fn, evaluate_policy
from digiq.envs.registry import config_class, get_env, validate_env
from digiq.errors import DataError
from digiq.models.critic import open_critic_and_features
from digiq.models.critic_text import build_inputs, score
from digiq.models.policy import generate_actions, load_policy, load_policy_fn
from digiq.utils.io import atomic_write_json, config_fingerprint, plan_output, staged_output
from digiq.utils.logging import get_logger
from digiq.utils.stats import pearson

log = get_logger(__name__)
# The built-in environments' sections (YAMLs and overrides such as sim.benchmark=v2, miniwob.tasks=...).
SimConfig, BehaviourConfig = config_class("sim"), config_class("sim", behaviour=True)
MiniWoBConfig, MiniWoBBehaviourConfig = config_class("miniwob"), config_class("miniwob", behaviour=True)


@dataclasses.dataclass
class Config:
    # An exported policy folder, or a built-in scripted policy of the environment (behaviour, optimal, random).
    policy: str = "behaviour"
    # online = roll out on `env` ("sim" is the old name of online); offline = metrics on a dataset (imported
    # AitW data).
    mode: Literal["online", "sim", "offline"] = "online"
    # online: a registered environment (digiq.envs.registry): sim = the simulated phone, miniwob = MiniWoB++
    # in headless Chromium.
    env: str = "sim"
    # online: split (test = held-out tasks on the simulator, fresh page seeds on MiniWoB++; val = the
    # validation goals that choose defaults, on benchmarks that have them), episodes.
    split: Literal["train", "val", "test"] = "test"
    num_episodes: int = 100
    # Simulator: episodes stepped together (the policy's generation batch). MiniWoB++ batches its workers.
    batch_size: int = 32
    # MiniWoB++: browsers running episodes side by side.
    num_workers: int = 1
    # Where the policy runs ('auto' = a GPU when visible) and its weights' dtype ('auto' = bfloat16 on a
    # GPU, float32 on the CPU).
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # None = the export's setting; 0 = greedy; > 0 = sample at this temperature (official eval: 0.8).
    temperature: float | None = None
    seed: int = 0
    # Override the export's generation cap (None = keep it); a cap bounds the cost of a junk-emitting policy.
    max_new_tokens: int | None = None
    # online, environments with an exact Q* (the simulator): also report where failed episodes went wrong,
    # from the exact Q*: per task the first non-optimal step (screen, action taken, an optimal action) and
    # the failures counted by screen.
    trace: bool = False
    # offline: the dataset, and optionally a critic + its feature cache.
    dataset: str = ""
    critic_dir: str = ""
    features: str = ""
    # offline: AitW tap-match radius (fraction of the screen).
    tap_threshold: float = 0.14
    # offline: evaluate at most this many successful-trajectory rows (0 = all).
    max_rows: int = 0
    # offline critic report: the rows it scores. heldout = the trajectories the critic validated on (the last
    # val_fraction of them, as train-critic splits); all = every row (e.g. another dataset).
    rows: Literal["heldout", "all"] = "heldout"
    # Held-out fraction; null = the critic's own (critic.json), 0.2 for critics that did not store it.
    val_fraction: float | None = None
    # Best-of-N threshold of the replacement statistics (official 0.05 webshop, 0.10 general).
    threshold: float = 0.10
    output_dir: str = "runs/eval"
    # Replace a finished evaluation at output_dir instead of refusing it.
    overwrite: bool = False
    sim: SimConfig = dataclasses.field(default_factory=SimConfig)
    # The simulator's behaviour policy (policy=behaviour, env=sim).
    behaviour: BehaviourConfig = dataclasses.field(default_factory=BehaviourConfig)
    # MiniWoB++ tasks and browser, and its DOM behaviour policy (policy=behaviour, env=miniwob).
    miniwob: MiniWoBConfig = dataclasses.field(default_factory=MiniWoBConfig)
    miniwob_behaviour: MiniWoBBehaviourConfig = dataclasses.field(default_factory=MiniWoBBehaviourConfig)
    # The settings of an environment registered without a section here, checked against its config class.
    env_config: dict[str, Any] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        if self.mode == "sim":
            self.mode = "online"
        spec = validate_env(self)
        check(bool(self.policy) or self.mode == "offline", "policy must be set")
        check(self.num_workers > 0, "num_workers must be > 0")
        check(
            not self.trace or (self.mode == "online" and spec.trace is not None),
            f"trace needs an exact Q* (mode=online on an environment with one: env=sim), got "
            f"mode={self.mode} "
            f"env={self.env}",
        )
        check(self.num_episodes > 0 and self.batch_size > 0, "num_episodes and batch_size must be > 0")
        check(self.mode != "offline" or bool(self.dataset), "mode=offline needs dataset=<folder>")
        check(self.mode != "offline" or self.policy not in BUILTINS, "built-in policies need mode=online")
        check(bool(self.critic_dir) == bool(self.features), "critic_dir and features go together")
        check(
            self.mode != "offline" or not critic_only(self.policy) or bool(self.critic_dir),
            "mode=offline without a policy (policy=none) reports on a critic: set critic_dir and features",
        )
        check(self.val_fraction is None or 0 < self.val_fraction < 1, "val_fraction must be in (0, 1)")


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


def evaluate_online(cfg: Config) -> dict[str, Any]:
    spec = get_env(cfg.env)
    config, behaviour = spec.settings(cfg)
    world = spec.open(config)
    if cfg.policy in BUILTINS:
        fn = builtin_policy_fn(cfg.env, cfg.policy, seed=cfg.seed, world=world, behaviour=behaviour)
    elif not Path(cfg.policy).exists():
        raise DataError(
            f"policy {cfg.policy!r} is neither a built-in policy ({', '.join(BUILTINS)}) nor an existing folder"
        )
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
    res = evaluate_policy(
        fn,
        cfg.split,
        cfg.num_episodes,
        cfg.seed,
        batch_size=cfg.batch_size,
        progress=True,
        env=cfg.env,
        num_workers=cfg.num_workers,
        trace=cfg.trace,
        world=world,
    )
    res["policy"] = cfg.policy
    res["env"] = cfg.env
    return res


def critic_only(policy: str) -> bool:
    """``policy=none`` (or empty) in offline mode: a report on the critic alone."""
    return policy.strip().lower() in ("", "none")


def evaluate_offline(cfg: Config) -> dict[str, Any]:
    ds = load_dataset(cfg.dataset)
    if critic_only(cfg.policy):
        return {"policy": None, "dataset": cfg.dataset, **critic_report(cfg, ds)}
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


def critic_report(cfg: Config, ds: Any) -> dict[str, Any]:
    """A critic on held-out trajectories, without a policy: how well V and Q track the return and predict
    success, the advantage of the logged actions, and what Best-of-N would do with the stored candidates.

    - ``pearson_v_mc`` / ``pearson_q_mc`` (and Spearman): V(s) and Q(s, a_logged) against the discounted
      return (recomputed with the critic's gamma);
    - ``auc_v_success``: AUC of V(s) for "this step's trajectory succeeds" (every step; ``_first_step``:
      V(s_0) only, one per trajectory);
    - ``advantage``: quantiles, mean and positive fraction of A(s, a_logged) = Q - V;
    - ``best_of_n``: kept fraction at ``threshold`` and how often the argmax candidate is not the logged
      action (all rows and kept rows), with the official rule (:func:`digiq.models.policy.best_of_n`;
      a candidate that does not parse gets A = 0, as in extract-policy).
    """
    from digiq.data.schema import split_by_trajectory
    from digiq.models.policy import best_of_n
    from digiq.utils.stats import auc, spearman

    critic, cache, meta = open_critic_and_features(cfg.critic_dir, cfg.features, ds, cfg.dataset)
    gamma = float(meta.get("gamma", 0.95))
    frac = cfg.val_fraction if cfg.val_fraction is not None else float(meta.get("val_fraction", 0.2))
    if cfg.rows == "heldout":
        rows = split_by_trajectory(ds.select_columns(["traj_id"]), frac)[1]
        if len(rows) == 0:
            raise DataError(f"{cfg.dataset}: no held-out trajectory at val_fraction={frac}; use rows=all")
    else:
        rows = np.arange(len(ds))
    inputs = build_inputs(critic, cache.state, cache.actions, ds, cfg.features)
    qs, vs = [], []
    for s in range(0, len(rows), 1024):
        q_b, v_b = score(critic, inputs, torch.as_tensor(rows[s : s + 1024]), slice(None))
        qs.append(q_b)
        vs.append(v_b)
    q_all, v = torch.cat(qs), torch.cat(vs)  # (M, N), (M,)
    valid = cache.valid[rows] if cache.valid is not None else torch.ones_like(q_all, dtype=torch.bool)
    # extract-policy's rule (and the official actor's, trainer.py:264-271): a candidate that does not parse
    # as an action gets A = 0, so it never wins the argmax however high its Q.
    valid = valid & parsable_candidates(ds, rows, q_all.shape[1])
    tr, _ = load_transitions(cfg.dataset, gamma)
    mc = tr.mc_return[rows].astype(np.float64)
    q0, v_np = q_all[:, 0].double().numpy(), v.double().numpy()
    # A trajectory succeeds when any of its steps has a positive reward (the import's success rate).
    traj_of_row = np.zeros(len(ds), np.int64)
    traj_success = np.zeros(len(tr.traj_bounds), bool)
    for k, (s, e) in enumerate(tr.traj_bounds):
        traj_of_row[s:e] = k
        traj_success[k] = bool((tr.reward[s:e] > 0).any())
    success = traj_success[traj_of_row[rows]]
    first = np.isin(rows, [s for s, _ in tr.traj_bounds])
    adv = q0 - v_np
    index, best, keep = best_of_n(q_all, v, valid, cfg.threshold)
    replaced = (index != 0).numpy()
    kept = keep.numpy()
    qs_ = np.quantile(adv, [0.05, 0.25, 0.5, 0.75, 0.95]) if len(adv) else [float("nan")] * 5
    return {
        "critic/gamma": gamma,
        "critic/rows": int(len(rows)),
        "critic/row_set": cfg.rows if cfg.rows == "all" else f"heldout (last {frac:g} of trajectories)",
        "critic/trajectories": int(len(np.unique(traj_of_row[rows]))),
        "critic/pearson_v_mc": pearson(v_np, mc),
        "critic/pearson_q_mc": pearson(q0, mc),
        "critic/spearman_v_mc": spearman(v_np, mc),
        "critic/spearman_q_mc": spearman(q0, mc),
        "critic/auc_v_success": auc(v_np, success),
        "critic/auc_v_success_first_step": auc(v_np[first], success[first]),
        "critic/success_fraction": float(success.mean()),
        "critic/q_mean": float(q0.mean()),
        "critic/v_mean": float(v_np.mean()),
        "critic/advantage_mean": float(adv.mean()),
        "critic/advantage_std": float(adv.std()),
        "critic/advantage_positive_fraction": float((adv > 0).mean()),
        "critic/advantage_quantiles": dict(zip(["p05", "p25", "p50", "p75", "p95"], map(float, qs_))),
        "critic/best_of_n_threshold": cfg.threshold,
        "critic/best_of_n_candidates": int(q_all.shape[1]),
        "critic/best_of_n_valid_candidate_fraction": float(valid.float().mean()),
        "critic/best_of_n_kept_fraction": float(kept.mean()),
        "critic/best_of_n_replaces_logged": float(replaced.mean()),
        "critic/best_of_n_replaces_logged_when_kept": float(replaced[kept].mean()) if kept.any() else 0.0,
    }


def parsable_candidates(ds: Any, rows: np.ndarray, n: int) -> torch.Tensor:
    """(len(rows), n) bool: candidate j of each row parses as a valid action (``parse_action(a).is_valid``,
    as extract-policy masks candidates); columns past a row's list are False. A row without candidates has
    the dataset action alone, as the feature cache stores it."""
    cols = ds.select_columns(["action", "candidates"])[[int(r) for r in rows]]
    out = torch.zeros(len(rows), n, dtype=torch.bool)
    for i, (action, cands) in enumerate(zip(cols["action"], cols["candidates"])):
        for j, a in enumerate((cands or [action])[:n]):
            out[i, j] = parse_action(a).is_valid
    return out


def screens_line(res: dict[str, Any]) -> str:
    """``search 40, home 25`` from an evaluation's ``first_mistake_screens`` ('-' when nothing failed)."""
    screens = res.get("first_mistake_screens") or {}
    return ", ".join(f"{k} {v}" for k, v in screens.items()) or "-"


def run(cfg: Config) -> dict[str, Any]:
    plan = plan_output(
        cfg.output_dir,
        "evaluate",
        overwrite=cfg.overwrite,
        fingerprint=config_fingerprint(cfg),
        resumable=False,
    )
    t0 = time.perf_counter()
    res = evaluate_online(cfg) if cfg.mode in ("online", "sim") else evaluate_offline(cfg)
    res["mode"] = cfg.mode
    res["seconds"] = time.perf_counter() - t0
    with staged_output(plan) as tmp:
        save_config(cfg, tmp)
        atomic_write_json(tmp / "metrics.json", res)
    if cfg.mode in ("online", "sim"):
        sys.stdout.write(
            f"{cfg.policy} on {cfg.env} {cfg.split}: success {res['success_rate']:.3f} "
            f"(95% CI {res['ci_low']:.3f}-{res['ci_high']:.3f}, n={res['num_episodes']})\n"
        )
        if "first_mistake_screens" in res:
            sys.stdout.write(f"failed episodes by the screen of their first mistake: {screens_line(res)}\n")
            for task, m in res["first_mistakes"].items():
                sys.stdout.write(
                    f"  {task}: step {m['step']} on {m['screen']}: {m['action']} (optimal: {m['optimal']})\n"
                )
    else:
        sys.stdout.write(json.dumps({k: v for k, v in res.items() if not isinstance(v, dict)}) + "\n")
    return res
