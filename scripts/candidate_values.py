"""How well a critic ranks the Best-of-N candidates, measured by playing each candidate out on the real page.

On the simulator exact Q* scores every candidate; MiniWoB++ has no such table. But its pages are deterministic
given their seed, so the state of a stored row can be rebuilt: reset the row's page, replay the episode's own
actions up to the row (the screen must then equal the stored screenshot, or the row is dropped and counted),
take the candidate, and let a fixed continuation finish the episode: the environment's scripted expert (default;
it reads the DOM, so the values are the expert's Q, the analogue of the simulator's exact Q*) or a policy run
greedy. Both are deterministic, so one rollout per candidate is exact.
``gamma^(steps after the candidate)`` on success, else 0, is the candidate's value Q^pi(s, a_j) under that
policy. The script then compares the critic's scores with these values state by state:

- ``top1``: the critic's argmax is a best candidate by rollout value (ties count), over the *informative*
  states, those whose candidates do not all have one value;
- ``pick_value`` / ``dataset_value`` / ``random_value`` / ``best_value``: the mean rollout value of the critic's
  pick, of the dataset action, of a uniformly drawn valid candidate and of the best candidate (the ceiling of
  Best-of-N over these candidates);
- ``spearman``: rank correlation of critic scores and rollout values within a state, averaged.

The rollouts read the page seed, privileged information no method may use: this is a measurement, an oracle
reference, never an input to training. Rows come from the critic's held-out trajectories by default (its
``val_fraction`` split), where the ranking is a generalisation.

    PYTHONPATH=. python scripts/candidate_values.py --pipeline runs/miniwob-paper --states 60 \\
        --out runs/miniwob-paper/candidate_values
    PYTHONPATH=. python scripts/candidate_values.py --pipeline runs/miniwob-paper \\
        --critic runs/other/critic/critic --out runs/other/candidate_values      # another critic, same rollouts

Rollout values are cached in ``<out>/rollouts_<continuation>.json`` by (row, candidate text): scoring another
critic on the same rows plays nothing again. Metrics go to ``<out>/metrics_<continuation>_<critic run>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from digiq.actions import parse_action
from digiq.config import from_dict
from digiq.data.schema import dataset_info, split_by_trajectory
from digiq.envs.base import TaskInstance
from digiq.envs.registry import env_for_dataset
from digiq.envs.rollout import Episode, run_episodes
from digiq.errors import DigiqError
from digiq.utils.io import atomic_write_json


@dataclasses.dataclass(frozen=True)
class Rollout:
    """One play-out: the row's page, the episode's own actions before the row, then the candidate."""

    row: int
    candidate: str
    instance: TaskInstance
    prefix: tuple[str, ...]


class RolloutPolicy:
    """The rollout's actions: the replayed prefix, the candidate, then ``continuation`` (a policy function).

    ``screens[i]`` is the stored screenshot of rollout i's row; the screen reached after the prefix is compared
    with it (``mismatch`` collects the rollouts whose replay did not rebuild the state)."""

    def __init__(
        self,
        rollouts: Sequence[Rollout],
        continuation: Callable[[list[dict]], list[Any]],
        screens: Sequence[np.ndarray] | None = None,
    ) -> None:
        self.rollouts, self.continuation, self.screens = rollouts, continuation, screens
        self.mismatch: set[int] = set()

    def __call__(self, batch: list[dict]) -> list[Any]:
        out: list[Any] = [None] * len(batch)
        rest = []
        for k, b in enumerate(batch):
            r, step = self.rollouts[b["episode"]], b["step"]
            if step < len(r.prefix):
                out[k] = r.prefix[step]
            elif step == len(r.prefix):
                if self.screens is not None and not np.array_equal(
                    np.asarray(b["screenshot"]), self.screens[b["episode"]]
                ):
                    self.mismatch.add(b["episode"])
                out[k] = r.candidate
            else:
                rest.append(k)
        if rest:
            for k, a in zip(rest, self.continuation([batch[k] for k in rest])):
                out[k] = a
        return out


def rollout_value(episode: Episode, prefix_len: int, gamma: float) -> float:
    """gamma^(steps after the candidate) on success, else 0: the candidate's discounted return."""
    return float(gamma ** (episode.steps - 1 - prefix_len)) if episode.success else 0.0


def ranking_metrics(
    values: np.ndarray, scores: np.ndarray, known: np.ndarray, rng: np.random.Generator
) -> dict[str, float]:
    """Compare critic ``scores`` with rollout ``values`` (both (R, N)) over the candidates ``known`` (R, N)
    bool: played out, parsed, and their state rebuilt. Column 0 is the dataset action. Rows with fewer than two
    known candidates are skipped."""
    top1, pick, data, rand, best, rho = [], [], [], [], [], []
    for v, s, m in zip(values, scores, known):
        idx = np.flatnonzero(m)
        if len(idx) < 2 or not m[0]:
            continue
        vv, ss = v[idx], s[idx]
        j = int(np.argmax(ss))
        if np.ptp(vv) > 0:  # a state whose candidates all have one value cannot be ranked wrong
            top1.append(vv[j] >= vv.max() - 1e-9)
        pick.append(vv[j])
        data.append(v[0])
        rand.append(vv[int(rng.integers(len(idx)))])
        best.append(vv.max())
        if np.ptp(vv) > 0 and np.ptp(ss) > 0:
            rv = np.argsort(np.argsort(vv)).astype(float)
            rs = np.argsort(np.argsort(ss)).astype(float)
            rho.append(float(np.corrcoef(rv, rs)[0, 1]))
    n = len(pick)
    if n == 0:
        raise DigiqError("no state has the dataset action and another candidate played out")
    return {
        "states": float(n),
        "informative_states": float(len(top1)),
        "top1": float(np.mean(top1)) if top1 else math.nan,
        "pick_value": float(np.mean(pick)),
        "dataset_value": float(np.mean(data)),
        "random_value": float(np.mean(rand)),
        "best_value": float(np.mean(best)),
        "spearman": float(np.mean(rho)) if rho else math.nan,
        "spearman_states": float(len(rho)),
    }


def _critic_scores(critic_dir: str, features: str, ds: Any, dataset: str, n: int) -> np.ndarray:
    from digiq.stages.extract_policy import critic_scores

    q, _, _ = critic_scores(critic_dir, features, ds, dataset, n, list(ds["candidates"]))
    return q.numpy()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", required=True, help="a finished `digiq pipeline` output_dir")
    ap.add_argument("--critic", help="critic folder to score (default: <pipeline>/critic/critic)")
    ap.add_argument("--continuation", choices=("expert", "policy"), default="expert",
                    help="who finishes the episode after the candidate: the environment's scripted expert "
                    "(default; the values are then the expert's Q, the analogue of the simulator's Q*) or "
                    "--policy run greedy")  # fmt: skip
    ap.add_argument("--policy", help="--continuation policy's model (default: <pipeline>/bc/policy, pi_beta)")
    ap.add_argument("--states", type=int, default=60, help="rows to measure (drawn with --seed)")
    ap.add_argument("--rows", choices=("heldout", "train"), default="heldout",
                    help="the critic's held-out trajectories (default) or its training ones")  # fmt: skip
    ap.add_argument("--workers", type=int, default=2, help="environments (browsers) in parallel")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    from datasets import load_from_disk

    from digiq.models.policy import load_policy_fn

    pipe = Path(args.pipeline)
    dataset, features = pipe / "data_candidates", pipe / "features"
    critic_dir = args.critic or str(pipe / "critic" / "critic")
    crit_cfg = yaml.safe_load((pipe / "critic" / "config.yaml").read_text())
    info = dataset_info(str(pipe / "data"))
    ccfg = info["config"]
    spec = env_for_dataset(info.get("source"))
    if not spec.section or spec.section not in ccfg:
        raise SystemExit(f"{pipe / 'data'}: no {spec.name} settings in its collect config")
    config = from_dict(spec.config_cls, ccfg[spec.section], spec.section)
    ds = load_from_disk(str(dataset))
    n = len(ds[0]["candidates"])
    gamma = float(crit_cfg["gamma"])
    train_rows, val_rows = split_by_trajectory(ds, float(crit_cfg["val_fraction"]))
    pool = np.asarray(val_rows if args.rows == "heldout" else train_rows)
    rng = np.random.default_rng(args.seed)
    rows = np.sort(rng.choice(pool, size=min(args.states, len(pool)), replace=False))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache_path = out / f"rollouts_{args.continuation}.json"
    cache: dict[str, dict[str, Any]] = json.loads(cache_path.read_text()) if cache_path.exists() else {}

    cols = ds.select_columns(["traj_id", "step_id", "action", "candidates"])
    traj, step = np.asarray(cols["traj_id"]), np.asarray(cols["step_id"])
    actions, table = cols["action"], cols["candidates"]
    world = spec.open(config)
    envs = spec.make(world, args.workers)
    try:
        instances = envs[0].task_instances(ccfg["split"], int(ccfg["num_trajectories"]), int(ccfg["seed"]))
        plays: list[Rollout] = []
        screens: list[np.ndarray] = []
        for r in rows:
            t, k = int(traj[r]), int(step[r])
            first = int(r) - k  # rows are sorted by (traj_id, step_id)
            prefix = tuple(actions[first + i] for i in range(k))
            shot = np.asarray(ds[int(r)]["screenshot"])
            for c in dict.fromkeys(table[r]):  # each distinct candidate once
                if str(int(r)) in cache and c in cache[str(int(r))]:
                    continue
                if not parse_action(c).is_valid:
                    continue
                plays.append(Rollout(int(r), c, instances[t], prefix))
                screens.append(shot)
        print(f"{len(rows)} states, {len(plays)} rollouts to play ({spec.name}, {args.workers} workers)")
        if plays:
            if args.continuation == "expert":
                scripted = spec.require("scripted_policy", "--continuation expert")
                behaviour = from_dict(
                    spec.behaviour_cls, ccfg[spec.behaviour_section], spec.behaviour_section
                )
                cont = scripted(config, behaviour, "optimal", args.seed)
            else:
                cont = load_policy_fn(args.policy or str(pipe / "bc" / "policy"), temperature=0.0)
            pol = RolloutPolicy(plays, cont, screens)
            from tqdm.auto import tqdm

            with tqdm(total=len(plays), desc="rollouts", unit="ep") as bar:
                eps = run_episodes(
                    envs, [p.instance for p in plays], pol, threads=True, group_by_task=True, progress=bar
                )
            for i, (p, ep) in enumerate(zip(plays, eps)):
                cell = cache.setdefault(str(p.row), {})
                cell[p.candidate] = None if i in pol.mismatch else rollout_value(ep, len(p.prefix), gamma)
            atomic_write_json(cache_path, cache)
    finally:
        for e in envs:
            e.close()

    values = np.zeros((len(rows), n))
    known = np.zeros((len(rows), n), dtype=bool)
    dropped = 0
    for i, r in enumerate(rows):
        cell = cache.get(str(int(r)), {})
        if table[r][0] in cell and cell[table[r][0]] is None:
            dropped += 1
            continue
        for j, c in enumerate(table[r]):
            if cell.get(c) is not None:
                values[i, j], known[i, j] = cell[c], True
    scores = _critic_scores(critic_dir, str(features), ds, str(dataset), n)[rows]
    res = ranking_metrics(values, scores, known, np.random.default_rng(args.seed))
    res.update(
        rows_drawn=float(len(rows)), rows_not_rebuilt=float(dropped), critic=critic_dir, split_rows=args.rows,
        continuation=args.continuation,
    )  # fmt: skip
    atomic_write_json(out / f"metrics_{args.continuation}_{Path(critic_dir).parent.name}.json", res)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
