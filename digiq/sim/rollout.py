"""``digiq sim rollout``: roll a policy out on the simulated device and report its success rate.

    digiq sim rollout policy=behaviour split=test num_episodes=200
    digiq sim rollout policy=optimal
    digiq sim rollout policy=runs/pipeline/policy      # a folder exported by Stage 3 (extract-policy)

Episodes cycle through the split's tasks in a seeded order (every task gets ``num_episodes / #tasks``
episodes, up to one), all running in lock-step so the policy sees batches of screens. The success rate
comes with a 95% Wilson interval (honest at small n and near 0 or 1, unlike the normal approximation).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np

from digiq.actions import Action, ActionType, make_observation, parse_action
from digiq.config import check, save_config
from digiq.errors import DigiqError
from digiq.models.policy import load_policy_fn
from digiq.sim.behaviour import BehaviourConfig, BehaviourPolicy
from digiq.sim.phone import SimConfig, SimPhone
from digiq.sim.tasks import TEST_QUERIES, TRAIN_QUERIES
from digiq.utils.io import atomic_write_json

PolicyFn = Callable[[list[dict]], list[str]]


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def evaluate_policy(
    policy_fn: PolicyFn,
    split: str = "test",
    num_episodes: int = 200,
    seed: int = 0,
    phone: SimPhone | None = None,
    batch_size: int = 64,
    progress: bool = False,
) -> dict:
    """Run ``num_episodes`` episodes of ``policy_fn`` on ``split``.

    ``policy_fn(batch)`` gets dicts with ``screenshot`` (PIL), ``observation`` (AutoUI prompt), ``task``
    (goal) and ``state_key``, and returns one AutoUI action string per item (unparsable strings are
    INVALID actions: a no-op step). Returns ``success_rate, ci_low, ci_high, num_episodes, mean_steps``
    plus ``num_successes``, ``split`` and ``per_task`` ({task_id: [successes, episodes]}).
    """
    phone = phone or SimPhone()
    tasks = phone.tasks(split)
    if num_episodes <= 0:
        raise DigiqError(f"num_episodes must be > 0, got {num_episodes}")
    order = np.random.default_rng(seed).permutation(len(tasks))
    episodes = [tasks[int(order[i % len(tasks)])] for i in range(num_episodes)]
    successes, lengths = np.zeros(num_episodes, dtype=bool), np.zeros(num_episodes, dtype=np.int64)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_episodes, desc=f"rollout {split}", unit="ep")
    for start in range(0, num_episodes, batch_size):
        ids = list(range(start, min(num_episodes, start + batch_size)))
        states = {i: phone.reset(episodes[i]) for i in ids}
        prev: dict[int, Action | None] = dict.fromkeys(ids)
        active = list(ids)
        while active:
            batch = [
                {
                    "screenshot": phone.render(states[i]),
                    "observation": make_observation(episodes[i].goal, prev[i]),
                    "task": episodes[i].goal,
                    "state_key": phone.state_key(states[i]),
                }
                for i in active
            ]
            actions = policy_fn(batch)
            if len(actions) != len(batch):
                raise DigiqError(f"policy_fn returned {len(actions)} actions for a batch of {len(batch)}")
            still = []
            for i, text in zip(active, actions):
                a = parse_action(text) if isinstance(text, str) else text
                states[i], reward, done = phone.step(states[i], a)
                prev[i] = a
                lengths[i] += 1
                if done:
                    successes[i] = reward > 0
                    if bar is not None:
                        bar.update(1)
                else:
                    still.append(i)
            active = still
    if bar is not None:
        bar.close()
    k = int(successes.sum())
    lo, hi = wilson_interval(k, num_episodes)
    per_task: dict[str, list[int]] = {}
    for t, s in zip(episodes, successes):
        row = per_task.setdefault(t.task_id, [0, 0])
        row[0] += int(s)
        row[1] += 1
    return {
        "success_rate": k / num_episodes,
        "ci_low": lo,
        "ci_high": hi,
        "num_episodes": num_episodes,
        "num_successes": k,
        "mean_steps": float(lengths.mean()),
        "split": split,
        "per_task": per_task,
    }


def builtin_policy_fn(
    name: str, phone: SimPhone, seed: int = 0, behaviour: BehaviourConfig | None = None
) -> PolicyFn:
    """``behaviour`` (the data-collection policy), ``optimal`` (argmax Q*) or ``random``."""
    if name == "behaviour":
        pi = BehaviourPolicy(phone, seed=seed, config=behaviour)
        return lambda batch: [pi.act(b["state_key"]).render() for b in batch]
    if name == "optimal":
        return lambda batch: [phone.optimal_actions(b["state_key"])[0].render() for b in batch]
    if name == "random":
        rng = np.random.default_rng(seed)
        keys = [
            ActionType.PRESS_BACK,
            ActionType.PRESS_HOME,
            ActionType.PRESS_ENTER,
            ActionType.STATUS_TASK_COMPLETE,
        ]
        queries = (*TRAIN_QUERIES, *TEST_QUERIES)

        def one() -> Action:
            u = rng.random()
            if u < 0.6:
                return Action.tap(round(rng.uniform(0, 1), 4), round(rng.uniform(0, 1), 4))
            if u < 0.7:
                return (
                    Action.swipe((0.75, 0.5), (0.35, 0.5))
                    if rng.random() < 0.5
                    else Action.swipe((0.35, 0.5), (0.75, 0.5))
                )
            if u < 0.8:
                return Action.type_text(queries[int(rng.integers(len(queries)))])
            return Action.key(keys[int(rng.integers(len(keys)))])

        return lambda batch: [one().render() for _ in batch]
    raise DigiqError(f"unknown built-in policy {name!r}")


def load_exported_policy(path: str) -> PolicyFn:
    """A Stage-3 export (``digiq.models.policy.load_policy_fn``)."""
    if not Path(path).exists():
        raise DigiqError(
            f"policy {path!r} is neither a built-in policy (behaviour, optimal, random) nor an existing folder"
        )
    return load_policy_fn(path)


@dataclasses.dataclass
class Config:
    # 'behaviour', 'optimal', 'random', or a folder exported by `digiq extract-policy`.
    policy: str = "behaviour"
    # Task split to evaluate on (train and test tasks are disjoint).
    split: Literal["train", "test"] = "test"
    # Number of episodes (tasks are cycled in a seeded order).
    num_episodes: int = 200
    # Seed for the task order and for the built-in stochastic policies.
    seed: int = 0
    # Episodes stepped together (the batch the policy sees).
    batch_size: int = 64
    # If set, write <output_dir>/rollout.json and the resolved config there.
    output_dir: str | None = None
    # The simulated device.
    sim: SimConfig = dataclasses.field(default_factory=SimConfig)
    # The behaviour policy's noise (policy=behaviour).
    behaviour: BehaviourConfig = dataclasses.field(default_factory=BehaviourConfig)

    def validate(self) -> None:

        check(self.num_episodes > 0, "num_episodes must be > 0")
        check(self.batch_size > 0, "batch_size must be > 0")
        self.sim.validate()
        self.behaviour.validate()


def run(cfg: Config) -> dict:
    phone = SimPhone(cfg.sim)
    if cfg.policy in ("behaviour", "optimal", "random"):
        fn = builtin_policy_fn(cfg.policy, phone, seed=cfg.seed, behaviour=cfg.behaviour)
    else:
        fn = load_exported_policy(cfg.policy)
    result = evaluate_policy(fn, cfg.split, cfg.num_episodes, cfg.seed, phone, cfg.batch_size, progress=True)
    result["policy"] = cfg.policy
    sys.stdout.write(
        f"{cfg.policy} on {cfg.split}: success {result['success_rate']:.3f} "
        f"(95% CI {result['ci_low']:.3f}-{result['ci_high']:.3f}, {result['num_successes']}/{cfg.num_episodes}), "
        f"mean steps {result['mean_steps']:.2f}\n"
    )
    if cfg.output_dir:
        out = Path(cfg.output_dir)
        save_config(cfg, out)
        atomic_write_json(out / "rollout.json", result)
    return json.loads(json.dumps(result))
