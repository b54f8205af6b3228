"""A tiny random MDP with exact Q*, written as a digiq dataset + feature cache (critic tests).

States 0..S-1, actions 0..A-1, deterministic random transitions; one goal state gives reward 1 and ends
the episode. Features are one-hot embeddings: f(s) = e_s, f(s, a) = e_{s*A+a} (plus optional noise
dimensions), so a critic can represent Q exactly and its ranking can be checked against value iteration.
Candidates are all A actions of the state, index 0 = the dataset action.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from PIL import Image

from digiq.data.features import write_cache
from digiq.data.schema import FEATURES, discounted_returns, save_dataset


class TinyMDP:
    def __init__(self, num_states: int = 10, num_actions: int = 4, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.S, self.A = num_states, num_actions
        self.goal = num_states - 1
        self.next = rng.integers(0, num_states, size=(num_states, num_actions))
        # a path 0 -> 1 -> ... -> goal through action (s % A) so every state can reach the goal
        for s in range(num_states - 1):
            self.next[s, s % num_actions] = s + 1

    def step(self, s: int, a: int) -> tuple[int, float, bool]:
        ns = int(self.next[s, a])
        done = ns == self.goal
        return ns, float(done), done

    def q_star(self, gamma: float) -> np.ndarray:
        q = np.zeros((self.S, self.A))
        for _ in range(500):
            v = q.max(1)
            new = np.zeros_like(q)
            for s in range(self.S):
                for a in range(self.A):
                    ns, r, d = self.step(s, a)
                    new[s, a] = r + (0.0 if d else gamma * v[ns])
            q = new
        return q


def make_run_inputs(
    root: Path,
    num_traj: int = 60,
    horizon: int = 12,
    eps: float = 0.3,
    gamma: float = 0.9,
    seed: int = 0,
    noise_dims: int = 0,
    noop_action: int | None = None,
    never_noop_below: int = 0,
) -> tuple[Path, Path, TinyMDP, np.ndarray]:
    """Write ``root/ds`` and ``root/feats``; returns (dataset, features, mdp, Q*).

    ``noop_action``: that action leaves the state unchanged wherever it is not the path action; each state
    then gets a screenshot of its own grey level (so the Stage-1 label is "state changed"), every f(s, a)
    one more dimension that says whether the action is a no-op (what Stage-1 features encode), and the
    behaviour never executes the no-op in states ``< never_noop_below`` (no-ops only the candidates show).
    """
    mdp = TinyMDP(seed=seed)
    if noop_action is not None:
        for st in range(mdp.S - 1):
            if st % mdp.A != noop_action:
                mdp.next[st, noop_action] = st
    qs = mdp.q_star(gamma)
    rng = np.random.default_rng(seed + 1)
    rows: dict[str, list] = {k: [] for k in FEATURES}
    s_feats, a_feats = [], []
    eye_s, eye_sa = np.eye(mdp.S, dtype=np.float32), np.eye(mdp.S * mdp.A, dtype=np.float32)
    for t in range(num_traj):
        s = int(rng.integers(0, mdp.goal))
        rewards = []
        for k in range(horizon):
            a = int(np.argmax(qs[s])) if rng.random() > eps else int(rng.integers(0, mdp.A))
            if noop_action is not None and a == noop_action and s < never_noop_below:
                a = int(np.argmax(qs[s]))
            ns, r, d = mdp.step(s, a)
            cands = [a] + [b for b in range(mdp.A) if b != a]
            rows["traj_id"].append(t)
            rows["step_id"].append(k)
            rows["task"].append("reach the goal")
            rows["observation"].append("obs")
            rows["screenshot"].append(None if noop_action is None else _screen(s))
            rows["next_screenshot"].append(None if noop_action is None else _screen(ns))
            rows["action"].append(f"a{a}")
            rows["reward"].append(r)
            rows["done"].append(d)
            rows["candidates"].append([f"a{b}" for b in cands])
            rows["state_key"].append(f"s{s}")
            rewards.append(r)
            noise = rng.normal(size=noise_dims).astype(np.float32)
            s_feats.append(np.r_[eye_s[s], noise])
            # the no-op flag (empty without noop_action)
            flag = [np.float32([mdp.next[s, b] == s] if noop_action is not None else []) for b in cands]
            a_feats.append(
                np.stack([np.r_[eye_sa[s * mdp.A + b], noise, flag[i]] for i, b in enumerate(cands)])
            )
            s = ns
            if d:
                break
        rows["mc_return"].extend(discounted_returns(rewards, gamma).tolist())
    ds_path, feat_path = root / "ds", root / "feats"
    save_dataset(Dataset.from_dict(rows, features=FEATURES), ds_path)
    write_cache(
        feat_path,
        torch.from_numpy(np.stack(s_feats)),
        torch.from_numpy(np.stack(a_feats)),
        meta={"dataset": str(ds_path), "model": "one-hot", "layer": 0, "rendering": "text"},
        shard_rows=128,
    )
    return ds_path, feat_path, mdp, qs


def _screen(state: int) -> Image.Image:
    return Image.new("RGB", (16, 16), (20 * state, 20 * state, 20 * state))


def q_star_fn(qs: np.ndarray):
    """An injectable Q* source for train-critic: state_key 's3', candidates ['a1', ...]."""

    def fn(key: str, actions: list[str], gamma: float) -> np.ndarray:
        return qs[int(key[1:]), [int(a[1:]) for a in actions]]

    return fn
