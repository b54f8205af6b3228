"""The environment interface and the episode runner (no browser needed: a scripted fake device)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from digiq.actions import Action, ActionType
from digiq.envs import evaluate_policy, make_envs
from digiq.envs.base import Observation, StepResult, TaskInstance
from digiq.envs.miniwob import BrowserCrashed
from digiq.envs.rollout import run_episodes
from digiq.envs.sim import SimEnv, sim_policy_fn
from digiq.errors import DigiqError
from digiq.sim.phone import SimPhone


class Counter:
    """A fake device: the screen shows a counter; a tap adds one, and reaching the task's target (its seed)
    succeeds. ``crash_at`` = {(task, seed, step)} raise BrowserCrashed once each, like a dying browser."""

    name = "fake"

    def __init__(self, crash_at: set | None = None, log: list | None = None) -> None:
        self.crash_at = crash_at if crash_at is not None else set()
        self.log = log if log is not None else []
        self.n = 0
        self.inst: TaskInstance | None = None
        self.t = 0

    def task_instances(self, split: str, num: int, seed: int) -> list[TaskInstance]:
        return [TaskInstance(f"task{i % 3}", 1 + i % 4) for i in range(num)]

    def _obs(self) -> Observation:
        img = Image.new("RGB", (8, 8), (10 * self.n, 0, 0))
        return Observation(img, f"count to {self.inst.seed}", {"n": self.n})

    def reset(self, instance: TaskInstance) -> Observation:
        self.inst, self.n, self.t = instance, 0, 0
        return self._obs()

    def step(self, action: Action) -> StepResult:
        key = (self.inst.task_id, self.inst.seed, self.t)
        if key in self.crash_at:
            self.crash_at.discard(key)
            raise BrowserCrashed(f"fake crash at {key}")
        self.t += 1
        self.log.append(key)
        if action.type is ActionType.STATUS_TASK_COMPLETE:
            return StepResult(self._obs(), 0.0, True)
        if action.is_tap:
            self.n += 1
        won = self.n >= self.inst.seed
        return StepResult(self._obs(), float(won), won or self.t >= 6)

    def close(self) -> None:
        pass


def noisy_policy(seed: int):
    """Taps, or (1 in 4, from a per-episode stream) gives up: what it does depends only on the episode."""
    rngs: dict[int, np.random.Generator] = {}

    def fn(batch: list[dict]) -> list[Action]:
        out = []
        for b in batch:
            if b["step"] == 0:
                rngs[b["episode"]] = np.random.default_rng([seed, b["episode"]])
            give_up = rngs[b["episode"]].random() < 0.25
            out.append(Action.key(ActionType.STATUS_TASK_COMPLETE) if give_up else Action.tap(0.5, 0.5))
        return out

    return fn


def summary(eps):
    return [(e.index, e.instance, e.success, e.steps, [t.text for t in e.transitions]) for e in eps]


def test_episodes_do_not_depend_on_workers_threads_or_order() -> None:
    inst = Counter().task_instances("train", 23, 0)
    ref = run_episodes([Counter()], inst, noisy_policy(0), record=True)
    assert [e.index for e in ref] == list(range(23))
    assert 0 < sum(e.success for e in ref) < 23  # both outcomes occur: the comparison below means something
    for kw in (
        dict(refill=True, threads=True, group_by_task=True),
        dict(refill=False, threads=False),
        dict(refill=True, threads=False, group_by_task=True),
    ):
        got = run_episodes([Counter(), Counter(), Counter()], inst, noisy_policy(0), record=True, **kw)
        assert summary(got) == summary(ref), kw


def test_a_crashed_worker_restarts_its_episode_from_the_first_step() -> None:
    inst = Counter().task_instances("train", 12, 0)
    ref = run_episodes([Counter()], inst, noisy_policy(1), record=True)
    finished: list[int] = []
    log: list = []
    crash = {(inst[5].task_id, inst[5].seed, 1), (inst[9].task_id, inst[9].seed, 0)}
    envs = [Counter(crash, log), Counter(crash, log)]
    got = run_episodes(
        envs, inst, noisy_policy(1), record=True, threads=True, on_episode=lambda e: finished.append(e.index)
    )
    assert summary(got) == summary(ref)  # the restarted episodes are whole, and the same
    assert sorted(finished) == list(range(12)) and len(finished) == 12  # each reported once, never partial
    assert not crash  # both crashes happened


def test_a_browser_that_keeps_dying_is_an_error_naming_the_episode() -> None:
    class Dead(Counter):
        def step(self, action: Action) -> StepResult:
            raise BrowserCrashed("gone")

    with pytest.raises(DigiqError, match=r"episode 0 .* died 4 times"):
        run_episodes([Dead()], Counter().task_instances("train", 2, 0), noisy_policy(0), max_restarts=3)


def test_other_errors_are_not_swallowed_as_crashes() -> None:
    class Broken(Counter):
        def step(self, action: Action) -> StepResult:
            raise ValueError("a bug, not a crash")

    with pytest.raises(ValueError, match="a bug"):
        run_episodes([Broken()], Counter().task_instances("train", 2, 0), noisy_policy(0))


def test_skip_and_candidates() -> None:
    inst = Counter().task_instances("train", 6, 0)

    def cands(batch: list[dict], n: int) -> list[list[Action]]:
        return [[Action.tap(0.1 * k, 0.1) for k in range(n)] for _ in batch]

    got = run_episodes(
        [Counter()], inst, noisy_policy(2), candidates=cands, num_candidates=3, record=True, skip={1, 4}
    )
    assert [e.index for e in got] == [0, 2, 3, 5]
    for e in got:
        for t in e.transitions:
            assert len(t.candidates) == 4 and t.candidates[0] == t.text  # index 0 = the action taken


def test_sim_env_matches_the_phone() -> None:
    phone = SimPhone()
    env = SimEnv(phone=phone)
    task = phone.tasks("test")[0]
    obs = env.reset(TaskInstance(task.task_id))
    s = phone.reset(task)
    assert obs.info["state_key"] == phone.state_key(s) and obs.goal == task.goal
    assert np.array_equal(np.asarray(obs.screenshot), np.asarray(phone.render(s)))
    a = phone.optimal_actions(s)[0]
    res = env.step(a)
    s2, r, d = phone.step(s, a)
    assert res.observation.info["state_key"] == phone.state_key(s2) and (res.reward, res.done) == (r, d)


def test_sim_evaluation_blocks_equal_one_episode_at_a_time() -> None:
    """The simulator's block batching (refill=False) and a single phone give the same deterministic results."""
    phone = SimPhone()
    opt = sim_policy_fn("optimal", phone)
    a = evaluate_policy(opt, "test", 30, 3, phone, batch_size=8)
    b = evaluate_policy(opt, "test", 30, 3, phone, batch_size=1)
    assert a == b and a["success_rate"] == 1.0 and sum(v[1] for v in a["per_task"].values()) == 30


def test_trace_names_the_first_non_optimal_step() -> None:
    """A policy that is optimal except on the search screen, where it taps the Go button of an empty field (a
    step that changes nothing): every shopping task fails there, and the trace says so; the others succeed."""
    phone = SimPhone()
    opt = sim_policy_fn("optimal", phone)
    go = Action.tap(0.92, 0.78)

    def stuck(batch: list[dict]) -> list:
        return [go if "|search|" in b["state_key"] else a for b, a in zip(batch, opt(batch))]

    res = evaluate_policy(stuck, "test", 64, 0, phone, batch_size=16, trace=True)
    shopping = {t for t, (k, n) in res["per_task"].items() if t.split("/")[1] in ("search", "select", "cart")}
    assert shopping and all(res["per_task"][t][0] == 0 for t in shopping)
    assert all(k == n for t, (k, n) in res["per_task"].items() if t not in shopping)
    failed = res["num_episodes"] - res["num_successes"]
    assert res["first_mistake_screens"] == {"search": failed}
    assert set(res["first_mistakes"]) == shopping
    for task, m in res["first_mistakes"].items():
        query = phone.task(task).goal.split('"')[1]
        # home -> the shop's app -> the search field -> here: the third action
        assert (m["step"], m["screen"], m["action"]) == (2, "search", "tap (0.920, 0.780)"), task
        assert m["optimal"] == f'type "{query}"' and m["q_star"] < m["v_star"]
    # The optimal policy has nothing to trace, and only the simulator has a Q* to trace with.
    clean = evaluate_policy(opt, "test", 32, 0, phone, trace=True)
    assert (
        clean["success_rate"] == 1.0
        and clean["first_mistakes"] == {}
        and clean["first_mistake_screens"] == {}
    )
    with pytest.raises(DigiqError, match="exact Q"):
        evaluate_policy(opt, "test", 4, 0, env="miniwob", trace=True)
    from digiq.config import ConfigError
    from digiq.stages import evaluate

    with pytest.raises(ConfigError, match="trace needs"):  # refused before any browser starts
        evaluate.Config(env="miniwob", trace=True).validate()


def test_make_envs_names_the_choices() -> None:
    with pytest.raises(DigiqError, match="sim, miniwob"):
        make_envs("android", 1)
