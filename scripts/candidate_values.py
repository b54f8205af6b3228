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
  ``dataset_top1`` / ``random_top1`` the same for the dataset action and (in expectation) a uniform pick;
- ``pick_value`` / ``dataset_value`` / ``random_value`` / ``best_value``: the mean rollout value of the critic's
  pick, of the dataset action, of a uniform pick (in expectation) and of the best candidate (the ceiling of
  Best-of-N over these candidates);
- ``spearman``: rank correlation (ties averaged) of critic scores and rollout values within an informative
  state, averaged;
- ``--probe``: the same for a ridge regression fit on the rollout values themselves from the candidates'
  features (other states' values, 5 folds): whether the features hold the ranking at all.

The rollouts read the page seed, privileged information no method may use: this is a measurement, an oracle
reference, never an input to training. Rows come from the critic's held-out trajectories by default (its
``val_fraction`` split), where the ranking is a generalisation.

    PYTHONPATH=. python scripts/candidate_values.py --pipeline runs/miniwob-paper --states 60 \\
        --out runs/miniwob-paper/candidate_values
    PYTHONPATH=. python scripts/candidate_values.py --pipeline runs/miniwob-paper \\
        --critic runs/other/critic/critic --out runs/miniwob-paper/candidate_values   # another critic, same rollouts

Outcomes (success, steps) are cached in ``<out>/rollouts_<continuation>.json`` by (row, candidate text), under
the dataset's fingerprint and the continuation: scoring another critic on the same rows plays nothing again.
Metrics go to ``<out>/metrics_<continuation>_<name>.json`` (``--name``, default the critic's run folder).
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
import yaml

from digiq.actions import parse_action
from digiq.config import from_dict
from digiq.data.schema import dataset_info, split_by_trajectory
from digiq.envs.base import TaskInstance
from digiq.envs.registry import env_for_dataset
from digiq.envs.rollout import Episode, run_episodes
from digiq.errors import DigiqError
from digiq.training.critic_metrics import candidate_ranking
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


Outcome = tuple[bool, int]  # (success, steps from the candidate to the episode's end)


def rollout_outcome(episode: Episode, prefix_len: int) -> Outcome | None:
    """(success, steps taken from the candidate on), or None when the episode ended before the candidate."""
    if episode.steps <= prefix_len:
        return None
    return bool(episode.success), int(episode.steps - prefix_len)


def outcome_value(outcome: Outcome, gamma: float) -> float:
    """gamma^(steps after the candidate) on success, else 0: the candidate's discounted return."""
    success, steps = outcome
    return float(gamma ** (steps - 1)) if success else 0.0


def ranking_metrics(values: np.ndarray, scores: np.ndarray, known: np.ndarray) -> dict[str, float]:
    """Compare critic ``scores`` with rollout ``values`` (both (R, N)) over the candidates ``known`` (R, N)
    bool: played out, parsed, and their state rebuilt. Column 0 is the dataset action. Rows with fewer than two
    known candidates, or without the dataset action, are skipped. Top-1 and Spearman are train-critic's
    :func:`~digiq.training.critic_metrics.candidate_ranking` over the *informative* rows only (candidates of
    more than one value); the random pick is the exact expectation over the columns."""
    rows = [r for r, m in enumerate(known) if m.sum() >= 2 and m[0]]
    if not rows:
        raise DigiqError("no state has the dataset action and another candidate played out")
    pick, rand, best = [], [], []
    for r in rows:
        idx = np.flatnonzero(known[r])
        vv = values[r, idx]
        pick.append(vv[int(np.argmax(scores[r, idx]))])
        rand.append(vv.mean())
        best.append(vv.max())
    # a state whose candidates all have one value cannot be ranked wrong
    informative = [r for r in rows if np.ptp(values[r, known[r]]) > 0]
    res = {"states": float(len(rows)), "informative_states": float(len(informative))}
    if informative:
        ranked, _ = candidate_ranking(scores[informative], values[informative], known[informative])
        res.update(
            top1=ranked["val/qstar_top1_agreement"],
            dataset_top1=ranked["val/qstar_dataset_action_optimal"],
            random_top1=ranked["val/qstar_random_optimal"],
            spearman=ranked["val/qstar_spearman"],
        )
    else:
        res.update(top1=math.nan, dataset_top1=math.nan, random_top1=math.nan, spearman=math.nan)
    res.update(
        pick_value=float(np.mean(pick)),
        dataset_value=float(np.mean(values[rows, 0])),
        random_value=float(np.mean(rand)),
        best_value=float(np.mean(best)),
    )
    return res


def ridge_probe(
    feats: np.ndarray,
    values: np.ndarray,
    known: np.ndarray,
    folds: int = 5,
    alpha: float = 0.1,
    seed: int = 0,
) -> np.ndarray:
    """Scores from a ridge regression of the rollout values on the candidates' features (R, N, D), centred
    within each state (only differences between a state's candidates remain), fit on the other states of
    ``folds`` folds. Asks whether the features hold the ranking at all, given its answers on other states."""
    rows = np.flatnonzero(known.sum(1) >= 2)
    x = feats - (feats * known[..., None]).sum(1, keepdims=True) / np.maximum(known.sum(1), 1)[:, None, None]
    out = np.zeros(values.shape)
    rng = np.random.default_rng(seed)
    for part in np.array_split(rng.permutation(rows), folds):
        train = np.setdiff1d(rows, part)
        a, b = x[train][known[train]], values[train][known[train]]
        mu, sd = a.mean(0), a.std(0) + 1e-6
        a = (a - mu) / sd
        w = np.linalg.solve(a.T @ a + alpha * len(a) * np.eye(a.shape[1]), a.T @ (b - b.mean()))
        out[part] = ((x[part] - mu) / sd) @ w
    return out


def plan_rollouts(
    rows: Sequence[int],
    traj: np.ndarray,
    step: np.ndarray,
    actions: Sequence[str],
    table: Sequence[Sequence[str]],
    instances: Sequence[TaskInstance],
    done: dict[str, dict[str, Any]],
) -> list[Rollout]:
    """One rollout per distinct parsable candidate of each row not yet in ``done``, after the episode's own
    actions before the row. Rows must be sorted by (traj_id, step_id) with steps 0, 1, ... (as collect
    writes them); the row's episode is instance ``traj_id`` of the collection's instance list."""
    plays = []
    for r in map(int, rows):
        t, k = int(traj[r]), int(step[r])
        first = r - k
        if (
            first < 0
            or not (traj[first : r + 1] == t).all()
            or not (step[first : r + 1] == np.arange(k + 1)).all()
        ):
            raise DigiqError(
                f"row {r} (trajectory {t}, step {k}): its episode's earlier steps are not the rows before it"
            )
        prefix = tuple(actions[first:r])
        for c in dict.fromkeys(table[r]):  # each distinct candidate once
            if c in done.get(str(r), {}) or not parse_action(c).is_valid:
                continue
            plays.append(Rollout(r, c, instances[t], prefix))
    return plays


def _critic_scores(critic_dir: str, features: str, ds: Any, dataset: str, n: int) -> np.ndarray:
    from digiq.stages.extract_policy import critic_scores

    q, _, _ = critic_scores(critic_dir, features, ds, dataset, n, list(ds["candidates"]))
    return q.numpy()


def _read_cache(path: Path, meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The rollouts already played for this dataset and continuation; refuses a cache of others."""
    if not path.exists():
        return {}
    got = json.loads(path.read_text())
    if got.get("meta") != meta:
        raise SystemExit(
            f"{path} holds rollouts of {got.get('meta')}, not {meta}: use another --out or delete the file"
        )
    return got["rows"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", required=True, help="a finished `digiq pipeline` output_dir")
    ap.add_argument("--critic", help="critic folder to score (default: <pipeline>/critic/critic)")
    ap.add_argument("--features", help="the feature cache that critic reads (default: <pipeline>/features)")
    ap.add_argument("--continuation", choices=("expert", "policy"), default="expert",
                    help="who finishes the episode after the candidate: the environment's scripted expert "
                    "(default; the values are then the expert's Q, the analogue of the simulator's Q*) or "
                    "--policy run greedy")  # fmt: skip
    ap.add_argument("--policy", help="--continuation policy's model (default: <pipeline>/bc/policy, pi_beta)")
    ap.add_argument("--states", type=int, default=60, help="rows to measure (drawn with --seed)")
    ap.add_argument("--rows", choices=("heldout", "train"), default="heldout",
                    help="the critic's held-out trajectories (default) or its training ones")  # fmt: skip
    ap.add_argument("--probe", action="store_true",
                    help="also fit a ridge probe of the rollout values on the features (5 folds over states)")  # fmt: skip
    ap.add_argument("--name", help="metrics file name (default: from the critic's path)")
    ap.add_argument("--workers", type=int, default=2, help="environments (browsers) in parallel")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    from datasets import load_from_disk

    from digiq.models.policy import load_policy_fn

    pipe = Path(args.pipeline)
    dataset, features = pipe / "data_candidates", Path(args.features or pipe / "features")
    critic_dir = Path(args.critic or pipe / "critic" / "critic")
    # gamma and the held-out split of the critic being scored (its run folder's resolved config)
    cfg_path = critic_dir.parent / "config.yaml"
    crit_cfg = yaml.safe_load(
        (cfg_path if cfg_path.exists() else pipe / "critic" / "config.yaml").read_text()
    )
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
    rows = np.sort(
        np.random.default_rng(args.seed).choice(pool, size=min(args.states, len(pool)), replace=False)
    )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    policy = args.policy or str(pipe / "bc" / "policy")
    meta = {"dataset": ds._fingerprint, "continuation": args.continuation,
            "policy": policy if args.continuation == "policy" else "scripted expert"}  # fmt: skip
    cache_path = out / f"rollouts_{args.continuation}.json"
    cache = _read_cache(cache_path, meta)

    cols = ds.select_columns(["traj_id", "step_id", "action", "candidates"])
    traj, step = np.asarray(cols["traj_id"]), np.asarray(cols["step_id"])
    table = cols["candidates"]
    plays: list[Rollout] = []
    envs: list[Any] = []
    try:
        envs = spec.make(spec.open(config), args.workers)
        instances = envs[0].task_instances(ccfg["split"], int(ccfg["num_trajectories"]), int(ccfg["seed"]))
        plays = plan_rollouts(rows, traj, step, cols["action"], table, instances, cache)
        print(f"{len(rows)} states, {len(plays)} rollouts to play ({spec.name}, {args.workers} workers)")
        if plays:
            if args.continuation == "expert":
                scripted = spec.require("scripted_policy", "--continuation expert")
                behaviour = from_dict(
                    spec.behaviour_cls, ccfg[spec.behaviour_section], spec.behaviour_section
                )
                cont = scripted(config, behaviour, "optimal", args.seed)
            else:
                cont = load_policy_fn(policy, temperature=0.0)
            screens = [np.asarray(ds[p.row]["screenshot"]) for p in plays]
            pol = RolloutPolicy(plays, cont, screens)
            from tqdm.auto import tqdm

            with tqdm(total=len(plays), desc="rollouts", unit="ep") as bar:
                eps = run_episodes(
                    envs, [p.instance for p in plays], pol, threads=True, group_by_task=True, progress=bar
                )
            for i, (p, ep) in enumerate(zip(plays, eps)):
                got = None if i in pol.mismatch else rollout_outcome(ep, len(p.prefix))
                cache.setdefault(str(p.row), {})[p.candidate] = got
            atomic_write_json(cache_path, {"meta": meta, "rows": cache})
    finally:
        for e in envs:
            e.close()

    values = np.zeros((len(rows), n))
    known = np.zeros((len(rows), n), dtype=bool)
    dropped = 0
    for i, r in enumerate(rows):
        cell = cache.get(str(int(r)), {})
        if cell.get(table[r][0], 0) is None:  # played, but the state was not rebuilt
            dropped += 1
            continue
        for j, c in enumerate(table[r]):
            if cell.get(c) is not None:
                values[i, j], known[i, j] = outcome_value(cell[c], gamma), True
    scores = _critic_scores(str(critic_dir), str(features), ds, str(dataset), n)
    res: dict[str, Any] = ranking_metrics(values, scores[rows], known)
    if args.probe:
        from digiq.data.features import FeatureCache

        feats = FeatureCache.open(str(features)).actions[rows].float().numpy()
        probe = ridge_probe(feats, values, known, seed=args.seed)
        res.update(
            {
                f"probe_{k}": v
                for k, v in ranking_metrics(values, probe, known).items()
                if k in ("top1", "spearman", "pick_value")
            }
        )
    played = sum(len(c) for c in cache.values())
    res.update(
        rows_drawn=float(len(rows)), rows_not_rebuilt=float(dropped), rollouts=float(played),
        critic=str(critic_dir), features=str(features), split_rows=args.rows, continuation=args.continuation,
    )  # fmt: skip
    name = args.name or "_".join(critic_dir.parts[-3:-1])
    atomic_write_json(out / f"metrics_{args.continuation}_{name}.json", res)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
