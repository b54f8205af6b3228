"""scripts/candidate_values.py on a toy deterministic device whose candidate values are known in closed form:
the replayed prefix rebuilds the state, the rollout value is gamma^(steps after the candidate), a replay that
does not rebuild the stored screen is caught, and the ranking metrics match a hand computation."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from digiq.actions import Action, ActionType
from digiq.envs.base import Observation, StepResult, TaskInstance
from digiq.envs.rollout import run_episodes

ROOT = Path(__file__).resolve().parents[1]
GAMMA = 0.9


def _script():
    spec = importlib.util.spec_from_file_location("candidate_values", ROOT / "scripts/candidate_values.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


class LineEnv:
    """Position 0..3 on a line; a tap left of x = 0.5 moves forward, right of it back (not below 0), BACK
    returns to 0. Reaching 3 is success. The page seed sets the start. The screen shows the position."""

    name = "line"

    def __init__(self) -> None:
        self.pos, self.t = 0, 0

    def task_instances(self, split: str, num: int, seed: int) -> list[TaskInstance]:
        return [TaskInstance("line", i % 2) for i in range(num)]

    def _obs(self) -> Observation:
        return Observation(Image.new("RGB", (4, 4), (60 * self.pos, 0, 0)), "reach 3", {})

    def reset(self, instance: TaskInstance) -> Observation:
        self.pos, self.t = instance.seed, 0
        return self._obs()

    def step(self, action: Action) -> StepResult:
        self.t += 1
        if action.type is ActionType.PRESS_BACK:
            self.pos = 0
        elif action.is_tap:
            self.pos = self.pos + 1 if action.touch[1] < 0.5 else max(0, self.pos - 1)
        won = self.pos >= 3
        return StepResult(self._obs(), float(won), won or self.t >= 8)

    def close(self) -> None:
        pass


FWD, BWD, BACK = (
    Action.tap(0.5, 0.2).render(),
    Action.tap(0.5, 0.8).render(),
    Action.key("PRESS_BACK").render(),
)


def _forward(batch: list[dict]) -> list[str]:
    return [FWD] * len(batch)


def test_rollout_values_equal_the_closed_form() -> None:
    cv = _script()
    # From start 0, after one forward step (position 1): forward needs 2 steps in all (value gamma^1), backward
    # 4 (gamma^3), BACK to 0 then 3 forward (gamma^3). From start 1 with no prefix: forward gamma^1.
    inst0, inst1 = TaskInstance("line", 0), TaskInstance("line", 1)
    plays = [cv.Rollout(0, c, inst0, (FWD,)) for c in (FWD, BWD, BACK)] + [cv.Rollout(1, FWD, inst1, ())]
    screens = [np.asarray(Image.new("RGB", (4, 4), (60, 0, 0)))] * 4
    pol = cv.RolloutPolicy(plays, _forward, screens)
    eps = run_episodes([LineEnv(), LineEnv()], [p.instance for p in plays], pol, threads=True)
    outcomes = [cv.rollout_outcome(e, len(p.prefix)) for p, e in zip(plays, eps)]
    assert outcomes == [(True, 2), (True, 4), (True, 4), (True, 2)]
    got = [cv.outcome_value(o, GAMMA) for o in outcomes]
    assert got == pytest.approx([GAMMA**1, GAMMA**3, GAMMA**3, GAMMA**1])
    assert pol.mismatch == set()
    # A stored screen the replay does not reach (position 2 instead of 1) marks the rollout.
    bad = cv.RolloutPolicy(plays[:1], _forward, [np.asarray(Image.new("RGB", (4, 4), (120, 0, 0)))])
    run_episodes([LineEnv()], [plays[0].instance], bad)
    assert bad.mismatch == {0}


def test_a_failed_rollout_is_worth_zero_and_one_that_ends_early_is_dropped() -> None:
    cv = _script()
    play = cv.Rollout(0, BWD, TaskInstance("line", 0), ())
    pol = cv.RolloutPolicy([play], lambda b: [BWD] * len(b))  # never moves forward: the episode times out
    (ep,) = run_episodes([LineEnv()], [play.instance], pol)
    assert not ep.success and cv.outcome_value(cv.rollout_outcome(ep, 0), GAMMA) == 0.0
    # from position 1 a prefix of two forward taps wins on its second step: the candidate is never taken
    early = cv.Rollout(0, BWD, TaskInstance("line", 1), (FWD, FWD, FWD))
    (ep,) = run_episodes([LineEnv()], [early.instance], cv.RolloutPolicy([early], _forward))
    assert ep.steps == 2 and cv.rollout_outcome(ep, 3) is None


def test_plan_rollouts_replays_the_episode_before_the_row() -> None:
    cv = _script()
    traj, step = np.array([0, 0, 0, 1, 1]), np.array([0, 1, 2, 0, 1])
    actions = ["a0", "a1", "a2", "b0", "b1"]
    table = [[FWD, FWD, BWD]] * 3 + [[BWD, "not an action", FWD]] * 2
    inst = [TaskInstance("line", 0), TaskInstance("line", 1)]
    plays = cv.plan_rollouts([2, 3], traj, step, actions, table, inst, {"3": {BWD: [True, 1]}})
    # row 2: its episode's two earlier actions, each distinct candidate once; row 3: BWD already played and
    # the unparsable candidate skipped
    assert [(p.row, p.candidate, p.instance.seed, p.prefix) for p in plays] == [
        (2, FWD, 0, ("a0", "a1")),
        (2, BWD, 0, ("a0", "a1")),
        (3, FWD, 1, ()),
    ]
    with pytest.raises(Exception, match="earlier steps"):
        cv.plan_rollouts([1], traj, np.array([0, 2, 2, 0, 1]), actions, table, inst, {})


def test_ranking_metrics_by_hand() -> None:
    cv = _script()
    values = np.array([[0.5, 1.0, 0.0], [1.0, 0.2, 0.9], [0.3, 0.3, 0.0], [0.7, 0.1, 0.2]])
    scores = np.array([[0.1, 0.9, 0.0], [0.0, 0.5, 0.2], [0.2, 0.1, 0.9], [0.5, 0.0, 0.0]])
    # the last row has its dataset action unknown (not rebuilt): skipped
    known = np.array([[1, 1, 1], [1, 1, 1], [1, 1, 0], [0, 1, 1]], dtype=bool)
    m = cv.ranking_metrics(values, scores, known)
    # picks: row 0 col 1 (best), row 1 col 1 (not best), row 2 col 0 among the known (0.3, ties the best);
    # row 2's known candidates share one value, so top-1 and Spearman count rows 0 and 1 only
    assert m["states"] == 3 and m["informative_states"] == 2 and m["top1"] == pytest.approx(1 / 2)
    assert m["dataset_top1"] == pytest.approx(1 / 2) and m["random_top1"] == pytest.approx(1 / 3)
    assert m["pick_value"] == pytest.approx((1.0 + 0.2 + 0.3) / 3)
    assert m["dataset_value"] == pytest.approx((0.5 + 1.0 + 0.3) / 3)
    assert m["random_value"] == pytest.approx((1.5 / 3 + 2.1 / 3 + 0.3) / 3)
    assert m["best_value"] == pytest.approx((1.0 + 1.0 + 0.3) / 3)
    # Spearman: row 0 ranks agree (1), row 1 values rank (2, 0, 1) and scores (0, 2, 1): -1
    assert m["spearman"] == pytest.approx(0.0)


def test_spearman_averages_tied_ranks() -> None:
    cv = _script()
    # values tie at 0 for three failures; the critic orders the winner first and the failures arbitrarily.
    # With tied ranks averaged, any order of the failures gives the same correlation (1/sqrt(1) * ...)
    values = np.array([[0.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    known = np.ones((2, 4), dtype=bool)
    a = cv.ranking_metrics(values, np.array([[0.1, 0.2, 0.3, 0.9], [0.9, 0.3, 0.2, 0.1]]), known)
    b = cv.ranking_metrics(values, np.array([[0.3, 0.2, 0.1, 0.9], [0.9, 0.1, 0.2, 0.3]]), known)
    assert a["spearman"] == pytest.approx(b["spearman"])
    # ranks (1, 1, 1, 3.5) against (0, 1, 2, 3) (0-based, ties averaged): Pearson = 3 / sqrt(15) / 1 ...
    r = np.corrcoef([1, 1, 1, 3], [0, 1, 2, 3])[0, 1]
    assert a["spearman"] == pytest.approx(r) and a["top1"] == 1.0


def test_ridge_probe_reads_a_feature_that_carries_the_value() -> None:
    cv = _script()
    rng = np.random.default_rng(0)
    R, N, D = 60, 6, 5
    values = rng.integers(0, 3, size=(R, N)).astype(float)
    known = np.ones((R, N), dtype=bool)
    noise = rng.normal(size=(R, N, D))
    carries = noise.copy()
    carries[..., 2] = values + 0.01 * rng.normal(size=(R, N))  # one dimension is the value
    good = cv.ranking_metrics(values, cv.ridge_probe(carries, values, known), known)
    blind = cv.ranking_metrics(values, cv.ridge_probe(noise, values, known), known)
    assert good["top1"] == 1.0 and good["spearman"] > 0.8  # < 1: three value levels tie, scores do not
    assert blind["top1"] < 0.7 and abs(blind["spearman"]) < 0.2
