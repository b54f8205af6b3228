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
    got = [cv.rollout_value(e, len(p.prefix), GAMMA) for p, e in zip(plays, eps)]
    assert got == pytest.approx([GAMMA**1, GAMMA**3, GAMMA**3, GAMMA**1])
    assert pol.mismatch == set()
    # A stored screen the replay does not reach (position 2 instead of 1) marks the rollout.
    bad = cv.RolloutPolicy(plays[:1], _forward, [np.asarray(Image.new("RGB", (4, 4), (120, 0, 0)))])
    run_episodes([LineEnv()], [plays[0].instance], bad)
    assert bad.mismatch == {0}


def test_a_failed_rollout_is_worth_zero() -> None:
    cv = _script()
    play = cv.Rollout(0, BWD, TaskInstance("line", 0), ())
    pol = cv.RolloutPolicy([play], lambda b: [BWD] * len(b))  # never moves forward: the episode times out
    (ep,) = run_episodes([LineEnv()], [play.instance], pol)
    assert not ep.success and cv.rollout_value(ep, 0, GAMMA) == 0.0


def test_ranking_metrics_by_hand() -> None:
    cv = _script()
    values = np.array([[0.5, 1.0, 0.0], [1.0, 0.2, 0.9], [0.3, 0.3, 0.0], [0.7, 0.1, 0.2]])
    scores = np.array([[0.1, 0.9, 0.0], [0.0, 0.5, 0.2], [0.2, 0.1, 0.9], [0.5, 0.0, 0.0]])
    # the last row has its dataset action unknown (not rebuilt): skipped
    known = np.array([[1, 1, 1], [1, 1, 1], [1, 1, 0], [0, 1, 1]], dtype=bool)
    m = cv.ranking_metrics(values, scores, known, np.random.default_rng(0))
    # picks: row 0 col 1 (best), row 1 col 1 (not best), row 2 col 0 among the known (0.3, ties the best);
    # row 2's known candidates share one value, so top-1 counts rows 0 and 1 only
    assert m["states"] == 3 and m["informative_states"] == 2 and m["top1"] == pytest.approx(1 / 2)
    assert m["pick_value"] == pytest.approx((1.0 + 0.2 + 0.3) / 3)
    assert m["dataset_value"] == pytest.approx((0.5 + 1.0 + 0.3) / 3)
    assert m["best_value"] == pytest.approx((1.0 + 1.0 + 0.3) / 3)
    # Spearman: row 0 ranks agree (1), row 1 values rank (2, 0, 1) and scores (0, 2, 1): -1; row 2's two known
    # values tie: no ranking to compare
    assert m["spearman_states"] == 2 and m["spearman"] == pytest.approx(0.0)
    assert m["random_value"] <= m["best_value"]
