"""The simulated phone (:mod:`digiq.sim`) behind the :class:`~digiq.envs.base.Env` interface."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from digiq.actions import Action, ActionType, action_label
from digiq.envs.base import Observation, StepResult, TaskInstance
from digiq.errors import DigiqError
from digiq.sim.behaviour import BehaviourConfig, BehaviourPolicy
from digiq.sim.layout import State
from digiq.sim.phone import SimConfig, SimPhone
from digiq.sim.tasks import TEST_QUERIES, TRAIN_QUERIES


def v2_episode_seed(run_seed: int, episode: int) -> int:
    """The start seed of episode ``episode`` of a run seeded ``run_seed`` (benchmark v2): distinct for up to
    2**20 episodes per run."""
    return (int(run_seed) << 20) + int(episode)


class SimEnv:
    """One simulated phone. Cheap: a rollout uses as many as it steps episodes together."""

    name = "sim"

    def __init__(self, config: SimConfig | None = None, phone: SimPhone | None = None) -> None:
        self.phone = phone or SimPhone(config)
        self.state: State | None = None
        self.goal = ""

    def task_instances(self, split: str, num: int, seed: int) -> list[TaskInstance]:
        """Tasks cycled in one seeded permutation (every task gets ``num / #tasks`` episodes, up to one).

        v1 starts are fixed (every instance has seed 0, as before); a v2 episode draws its start from its
        instance seed, distinct per episode and per run seed."""
        tasks = self.phone.tasks(split)
        order = np.random.default_rng(seed).permutation(len(tasks))
        out = [TaskInstance(tasks[int(order[i % len(tasks)])].task_id) for i in range(num)]
        if self.phone.config.benchmark == "v2":
            out = [TaskInstance(inst.task_id, v2_episode_seed(seed, i)) for i, inst in enumerate(out)]
        return out

    def _obs(self) -> Observation:
        assert self.state is not None
        return Observation(
            screenshot=self.phone.render(self.state),
            goal=self.goal,
            info={"state_key": self.phone.state_key(self.state), "state": self.state},
            png=self.phone.render_png(self.state),
        )

    def reset(self, instance: TaskInstance) -> Observation:
        task = self.phone.task(instance.task_id)
        self.state, self.goal = self.phone.reset(task, instance.seed), task.goal
        return self._obs()

    def step(self, action: Action) -> StepResult:
        if self.state is None:
            raise DigiqError("SimEnv.step before reset")
        self.state, reward, done = self.phone.step(self.state, action)
        return StepResult(self._obs(), float(reward), bool(done))

    def close(self) -> None:
        self.state = None


# The discount of the optimal-action check. On the simulator's step-counting tasks any gamma in (0, 1) ranks the
# actions alike (V* = gamma^(distance - 1)); 0.95 is the collection default (digiq collect gamma).
TRACE_GAMMA = 0.95


def first_mistake(phone: SimPhone, transitions: Sequence[Any], gamma: float = TRACE_GAMMA) -> dict | None:
    """The first step of an episode whose action is not Q*-optimal, or None when every action was.

    ``transitions`` are :class:`digiq.envs.rollout.Transition` s of one episode on ``phone`` (recorded with
    ``record=True``). Returns ``{"step", "screen", "action", "optimal", "q_star", "v_star"}``: where a failed
    episode first went wrong, the action it took there and one action that was optimal (a greedy policy's
    episodes of one task are all alike, so this names what to fix)."""
    for t, tr in enumerate(transitions):
        key = tr.observation.info["state_key"]
        q = float(phone.q_star(key, [tr.action], gamma)[0])
        v = phone.v_star(key, gamma)
        if q < v - 1e-9:
            return {
                "step": t,
                "screen": phone.state_from_key(key).screen,
                "action": action_label(tr.action),
                "optimal": action_label(phone.optimal_actions(key, gamma)[0]),
                "q_star": round(q, 4),
                "v_star": round(v, 4),
            }
    return None


def sim_policy_fn(name: str, phone: SimPhone, seed: int = 0, behaviour: BehaviourConfig | None = None):
    """The simulator's scripted policies: ``behaviour`` (the data-collection policy), ``optimal`` (argmax Q*)
    or ``random``. One random stream for the whole run (the data's historical seeding)."""
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
    raise DigiqError(f"unknown built-in policy {name!r} (behaviour, optimal, random)")
