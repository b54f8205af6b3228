"""The simulated phone (:mod:`digiq.sim`) behind the :class:`~digiq.envs.base.Env` interface, registered as
``env=sim`` with every capability (exact Q*, offline candidates, behaviour values, failure traces)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from digiq.actions import Action, ActionType, action_label
from digiq.envs.base import Observation, StepResult, TaskInstance
from digiq.envs.registry import EnvSpec, Plan, register_env
from digiq.errors import DataError, DigiqError
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


def trace_failures(phone: SimPhone, episodes: Sequence[Any]) -> dict[str, Any]:
    """``first_mistakes`` (per task, the first failed episode's first non-optimal step: see
    :func:`first_mistake`) and ``first_mistake_screens`` (failed episodes counted by the screen of that step)
    of recorded episodes; a failed episode whose every action was optimal counts under ``none``."""
    per_task: dict[str, dict] = {}
    screens: dict[str, int] = {}
    for e in episodes:
        if e.success:
            continue
        m = first_mistake(phone, e.transitions)
        screen = m["screen"] if m else "none"
        screens[screen] = screens.get(screen, 0) + 1
        if m is not None and e.instance.task_id not in per_task:
            per_task[e.instance.task_id] = m
    return {
        "first_mistakes": dict(sorted(per_task.items())),
        "first_mistake_screens": dict(sorted(screens.items(), key=lambda kv: (-kv[1], kv[0]))),
    }


def collect_plan(phone: SimPhone, behaviour: BehaviourConfig, split: str, num: int, seed: int) -> Plan:
    """``digiq collect``'s historical streams: a fresh permutation of the tasks per pass, one generator each
    for the dataset actions and the candidates (the datasets of earlier releases are reproduced bit for
    bit)."""
    tasks = phone.tasks(split)
    seeds = np.random.SeedSequence(seed).spawn(3)
    order_rng = np.random.default_rng(seeds[0])
    pi = BehaviourPolicy(phone, seed=int(seeds[1].generate_state(1)[0]), config=behaviour)
    cand_pi = BehaviourPolicy(phone, seed=int(seeds[2].generate_state(1)[0]), config=behaviour)
    order: list[int] = []
    instances = []
    v2 = phone.config.benchmark == "v2"  # randomised starts: each episode its own start seed
    for i in range(num):
        if not order:  # a fresh seeded permutation per pass over the tasks: balanced task counts
            order = [int(i) for i in order_rng.permutation(len(tasks))]
        start = v2_episode_seed(seed, i) if v2 else 0
        instances.append(TaskInstance(tasks[order.pop()].task_id, start))
    return (
        instances,
        lambda batch: [pi.act(b["info"]["state"]) for b in batch],
        lambda batch, n: [cand_pi.sample_candidates(b["info"]["state"], n) for b in batch],
    )


def offline_candidates(
    phone: SimPhone,
    behaviour: BehaviourConfig,
    actions: Sequence[str],
    state_keys: Sequence[str],
    n: int,
    seed: int,
) -> list[list[str]]:
    """[dataset action] + n-1 draws of the scripted behaviour policy (one seeded stream, dataset order)."""
    from tqdm.auto import tqdm

    pi = BehaviourPolicy(phone, seed=seed, config=behaviour)
    out = []
    for i, (a, key) in enumerate(tqdm(list(zip(actions, state_keys)), desc="candidates (sim)", unit="row")):
        if not key:
            raise DataError(
                f"row {i}: empty state_key; source=sim needs a dataset collected by `digiq sim collect`"
            )
        out.append([a, *(c.render() for c in pi.sample_candidates(key, n - 1))])
    return out


def _behaviour_values(phone: SimPhone, gamma: float, samples: int, seed: int) -> Any:
    from digiq.sim.behaviour import BehaviourValues

    return BehaviourValues(phone, gamma, samples=samples, seed=seed)


register_env(
    EnvSpec(
        name="sim",
        config_cls=SimConfig,
        behaviour_cls=BehaviourConfig,
        section="sim",
        behaviour_section="behaviour",
        world=SimPhone,
        # Simulated phones share one SimPhone (its render and value caches).
        make=lambda phone, num: [SimEnv(phone=phone) for _ in range(num)],
        plan=collect_plan,
        scripted_policy=lambda phone, behaviour, name, seed: sim_policy_fn(name, phone, seed, behaviour),
        lockstep=True,
        candidates=offline_candidates,
        q_star=lambda phone: phone.q_star,
        screen=lambda phone: lambda key: phone.state_from_key(key).screen,
        behaviour_values=_behaviour_values,
        trace=trace_failures,
    )
)
