"""A noisy scripted behaviour policy for the simulated device, tuned to AutoUI-like success (~20-35%).

The official offline data was collected by AutoUI, whose success on AitW is about 20-28% (Digi-Q paper,
arXiv:2502.15760, Table 1); the point of Digi-Q is to extract a better policy than the data's. This policy
mimics AutoUI's failure modes: with probability ``p_optimal`` it takes a shortest-path action (the argmax of
the exact Q*, tap jittered inside the widget), otherwise a plausible mistake: a random tap, the wrong widget
(wrong app, wrong result), back / home, typing a wrong query, a stray swipe, or a premature
STATUS_TASK_COMPLETE (AutoUI's most damaging habit). ``sample_candidates`` draws from the same mixture with a
lower ``p_optimal`` (a higher temperature), as the official candidates are sampled at T=1.2
(DigiRL-agent/digiq @ 8181379, ``postprocess_data/get_more_actions/get_more_actions_batched.py:77``).
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

from digiq.actions import Action, ActionType
from digiq.config import check
from digiq.sim import layout as L
from digiq.sim.layout import State
from digiq.sim.phone import SimPhone

MISTAKES = ("random_tap", "wrong_widget", "back", "home", "complete", "wrong_type", "swipe", "impossible")


@dataclasses.dataclass
class BehaviourConfig:
    # Probability of the next optimal action at each step (the rest is a mistake from `mistakes`). 0.33 gives
    # ~25-30% success over 200 episodes on both splits (AutoUI's range on AitW); 0.55 gives ~60%.
    p_optimal: float = 0.33
    # p_optimal used by sample_candidates (more noise = more diverse Best-of-N candidates).
    p_optimal_candidates: float = 0.25
    # Relative weights of the mistakes: random_tap, wrong_widget, back, home, complete, wrong_type, swipe,
    # impossible.
    mistakes: tuple[float, float, float, float, float, float, float, float] = (
        0.30,
        0.25,
        0.08,
        0.06,
        0.12,
        0.10,
        0.07,
        0.02,
    )
    # Taps land uniformly in the central `jitter` fraction of the intended widget's box.
    jitter: float = 0.8
    # Probability that a correct query is typed with different capitalisation (matching ignores case).
    p_case_noise: float = 0.2

    def validate(self, where: str = "behaviour") -> None:

        check(0 <= self.p_optimal <= 1, f"{where}.p_optimal must be in [0, 1]")
        check(0 <= self.p_optimal_candidates <= 1, f"{where}.p_optimal_candidates must be in [0, 1]")
        check(
            all(w >= 0 for w in self.mistakes) and sum(self.mistakes) > 0, f"{where}.mistakes: weights >= 0"
        )
        check(0 < self.jitter <= 1, f"{where}.jitter must be in (0, 1]")


class BehaviourPolicy:
    """``act(state) -> Action``; deterministic given ``seed`` and the sequence of calls."""

    def __init__(self, phone: SimPhone, seed: int = 0, config: BehaviourConfig | None = None) -> None:
        self.phone = phone
        self.config = config or BehaviourConfig()
        self.rng = np.random.default_rng(seed)
        w = np.asarray(self.config.mistakes, dtype=np.float64)
        self._mistake_p = w / w.sum()

    # -- building blocks --------------------------------------------------------------------------
    def _jittered_tap(self, box: L.Box) -> Action:
        y0, x0, y1, x1 = box
        m = (1 - self.config.jitter) / 2
        y = self.rng.uniform(y0 + m * (y1 - y0), y1 - m * (y1 - y0))
        x = self.rng.uniform(x0 + m * (x1 - x0), x1 - m * (x1 - x0))
        return Action.tap(round(y, 4), round(x, 4))

    def _realise(self, state: State, a: Action) -> Action:
        """Turn a canonical action into what an agent would emit: jittered taps, case noise in typing."""
        if a.is_tap and a.touch is not None:
            w = self.phone.hit(state, a.touch)
            return self._jittered_tap(w.box) if w is not None else a
        if a.type is ActionType.TYPE and a.text and self.rng.random() < self.config.p_case_noise:
            return Action.type_text(a.text.upper() if self.rng.random() < 0.5 else a.text.title())
        if a.is_swipe and a.touch is not None and a.lift is not None:
            dx = self.rng.uniform(-0.1, 0.1)
            return Action.swipe(
                (a.touch[0], round(a.touch[1] + dx, 4)), (a.lift[0], round(a.lift[1] + dx, 4))
            )
        return a

    def _optimal(self, state: State) -> Action:
        best = self.phone.optimal_actions(state)
        return self._realise(state, best[int(self.rng.integers(len(best)))])

    def _mistake(self, state: State) -> Action:
        kind = MISTAKES[int(self.rng.choice(len(MISTAKES), p=self._mistake_p))]
        if kind == "random_tap":
            return Action.tap(round(self.rng.uniform(0.05, 0.99), 4), round(self.rng.uniform(0.01, 0.99), 4))
        if kind == "wrong_widget":
            ws = self.phone.widgets(state)
            if not ws:
                return Action.tap(
                    round(self.rng.uniform(0.05, 0.99), 4), round(self.rng.uniform(0.01, 0.99), 4)
                )
            return self._jittered_tap(ws[int(self.rng.integers(len(ws)))].box)
        if kind == "back":
            return Action.key(ActionType.PRESS_BACK)
        if kind == "home":
            return Action.key(ActionType.PRESS_HOME)
        if kind == "complete":
            return Action.key(ActionType.STATUS_TASK_COMPLETE)
        if kind == "impossible":
            return Action.key(ActionType.STATUS_TASK_IMPOSSIBLE)
        if kind == "wrong_type":
            task = self.phone.task(state.task_id)
            # v2: the train words and the task's own held-out group only (docs/benchmark_v2.md)
            pool = [q for q in self.phone.query_pool(task) if q != task.query]
            return Action.type_text(pool[int(self.rng.integers(len(pool)))])
        # a stray vertical swipe
        y0, y1 = (0.75, 0.35) if self.rng.random() < 0.5 else (0.35, 0.75)
        x = round(self.rng.uniform(0.2, 0.8), 4)
        return Action.swipe((y0, x), (y1, x))

    # -- public API -------------------------------------------------------------------------------
    def act(self, state: State | str, p_optimal: float | None = None) -> Action:
        s = self.phone.state_from_key(state) if isinstance(state, str) else state
        p = self.config.p_optimal if p_optimal is None else p_optimal
        return self._optimal(s) if self.rng.random() < p else self._mistake(s)

    def sample_candidates(self, state: State | str, n: int) -> list[Action]:
        """``n`` actions from the same mixture with more noise (for Best-of-N candidate sets)."""
        return [self.act(state, self.config.p_optimal_candidates) for _ in range(n)]


class BehaviourValues:
    """Q and V of the behaviour policy itself, Q^beta and V^beta: what a perfect Digi-Q critic converges to.

    Digi-Q's critic backs V up from the dataset action (J_V = (V(s) - Q_targ(s, a_data))^2, paper Sec. 4.2;
    DigiRL-agent/digiq @ 8181379 ``trainer.py:148``), a SARSA-style in-sample backup, so its fixed point is
    Q^beta, not Q*. Comparing argmax_i Q^beta(s, a_i) with the Q*-optimal candidates separates what the
    algorithm can reach from what function approximation loses (``scripts/qbeta_ceiling.py``;
    ``digiq extract-policy scorer=q_beta``).

    Policy evaluation on the task's step-free state graph (:meth:`SimPhone.values` is the Q* analogue): the
    successor distribution of every graph state under the behaviour mixture is estimated from ``samples``
    actions drawn by :class:`BehaviourPolicy` (taps are continuous, their effects a few discrete successors),
    then V^beta(s) = E_a[r + gamma (1 - terminal) V^beta(s')] is iterated to a fixed point. Goal states are
    absorbing with value 0, as in :meth:`SimPhone.values`; the horizon is ignored, as the critic does.
    """

    def __init__(
        self,
        phone: SimPhone,
        gamma: float,
        config: BehaviourConfig | None = None,
        samples: int = 100,
        seed: int = 0,
    ) -> None:
        check(0.0 <= gamma < 1.0, f"gamma must be in [0, 1), got {gamma}")
        check(samples >= 1, f"samples must be >= 1, got {samples}")
        self.phone, self.gamma, self.samples, self.seed = phone, float(gamma), int(samples), int(seed)
        self.config = config
        self._v: dict[str, tuple[dict[str, int], np.ndarray]] = {}

    def values(self, task_id: str) -> tuple[dict[str, int], np.ndarray]:
        """(abstract key -> index, V^beta per graph state; 0 at goal states) of one task (cached)."""
        hit = self._v.get(task_id)
        if hit is not None:
            return hit
        task = self.phone.task(task_id)
        g = self.phone._graph(task)
        goal = self.phone._goal_mask(task, g)
        S, K = len(g.keys), self.samples
        # One stream per task, so a task's values do not depend on which tasks were asked for before it.
        policy = BehaviourPolicy(
            self.phone, seed=(self.seed << 32) | zlib.crc32(task_id.encode()), config=self.config
        )
        nxt = np.zeros((S, K), dtype=np.int64)
        reward = np.zeros((S, K))
        cont = np.zeros((S, K))
        for i, s0 in enumerate(g.states):
            if goal[i]:
                continue
            s = dataclasses.replace(s0, task_id=task.task_id)
            for k in range(K):
                n, r, term = self.phone.transition(s, policy.act(s))
                reward[i, k] = r
                if not term:
                    nxt[i, k], cont[i, k] = g.index[n.abstract_key], 1.0
        v = np.zeros(S)
        for _ in range(100_000):
            new = np.where(goal, 0.0, (reward + self.gamma * cont * v[nxt]).mean(axis=1))
            done = np.max(np.abs(new - v)) < 1e-12
            v = new
            if done:
                break
        self._v[task_id] = (g.index, v)
        return self._v[task_id]

    def v(self, state_key: str | State) -> float:
        s = self.phone.state_from_key(state_key) if isinstance(state_key, str) else state_key
        index, v = self.values(s.task_id)
        return float(v[index[s.abstract_key]])

    def q(self, state_key: str | State, actions: list[str | Action]) -> np.ndarray:
        """Q^beta(s, a) = r(s, a) + gamma (1 - terminal) V^beta(s') for any actions."""
        s = self.phone.state_from_key(state_key) if isinstance(state_key, str) else state_key
        index, v = self.values(s.task_id)
        out = np.zeros(len(actions), dtype=np.float64)
        for j, a in enumerate(actions):
            # Reaching a goal is terminal (SimPhone.transition), so a non-terminal successor is never one.
            n, r, term = self.phone.transition(s, a)
            out[j] = r if term else r + self.gamma * v[index[n.abstract_key]]
        return out
