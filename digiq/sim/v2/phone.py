"""The v2 half of :class:`digiq.sim.phone.SimPhone` (which dispatches every ``v2/`` task and state here).

Same API and semantics as v1's methods; ``reset`` takes the episode seed. Values: :mod:`digiq.sim.v2.device`
(one quotient graph per (has a query, tracked toggle), one BFS per goal signature, both cached).
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image

from digiq.actions import Action, parse_action
from digiq.errors import DigiqError
from digiq.sim.rules import best_actions, canonical_actions, encode_png
from digiq.sim.v2 import device as D
from digiq.sim.v2 import layout as L
from digiq.sim.v2.layout import StateV2
from digiq.sim.v2.render import render_key, render_state
from digiq.sim.v2.tasks import SPLITS, TaskV2, catalogue, query_pool, task_index


class PhoneV2:
    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self._png: dict[str, bytes] = {}
        self._graphs: dict[tuple[bool, int], D.QuotientGraph] = {}
        self._dist: dict[tuple, np.ndarray] = {}
        self._values: dict[tuple, np.ndarray] = {}

    # -- tasks ------------------------------------------------------------------------------------
    def tasks(self, split: str) -> list[TaskV2]:
        if split not in SPLITS:
            raise DigiqError(f"unknown sim split {split!r} for benchmark v2; expected one of {list(SPLITS)}")
        return list(catalogue()[split])

    def task(self, task: TaskV2 | str) -> TaskV2:
        if isinstance(task, TaskV2):
            return task
        try:
            return task_index()[task]
        except KeyError:
            raise DigiqError(f"unknown sim v2 task id {task!r}") from None

    def query_pool(self, task: TaskV2) -> tuple[str, ...]:
        return query_pool(task)

    # -- dynamics ---------------------------------------------------------------------------------
    def reset(self, task: TaskV2 | str, seed: int = 0) -> StateV2:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise DigiqError(f"sim v2 episode seed must be an integer >= 0, got {seed!r}")
        return D.reset(self.task(task), int(seed))

    def is_goal(self, state: StateV2, task: TaskV2 | None = None) -> bool:
        return D.is_goal(state, task or self.task(state.task_id))

    def transition(self, state: StateV2, action: Action | str) -> tuple[StateV2, float, bool]:
        t = self.task(state.task_id)
        a = parse_action(action) if isinstance(action, str) else action
        if D.is_goal(state, t):
            return state, 0.0, True
        effect = D.effect_of(state, a, t)
        if effect == "status":
            return state, 0.0, True
        nxt = dataclasses.replace(D.apply(state, effect), steps=state.steps)
        if D.is_goal(nxt, t):
            return nxt, 1.0, True
        return nxt, 0.0, False

    def step(self, state: StateV2, action: Action | str) -> tuple[StateV2, float, bool]:
        nxt, reward, terminal = self.transition(state, action)
        nxt = dataclasses.replace(nxt, steps=state.steps + 1)
        return nxt, reward, terminal or nxt.steps >= self.task(state.task_id).max_steps

    def state_from_key(self, key: str) -> StateV2:
        try:
            s = L.state_from_key(key)
        except ValueError as e:
            raise DigiqError(str(e)) from None
        self.task(s.task_id)
        return s

    # -- rendering --------------------------------------------------------------------------------
    def render_png(self, s: StateV2) -> bytes:
        task = self.task(s.task_id)
        key = render_key(s, task)
        data = self._png.get(key)
        if data is None:
            data = self._png[key] = encode_png(render_state(s, task, self.width, self.height))
        return data

    def render(self, s: StateV2) -> Image.Image:
        img = Image.open(io.BytesIO(self.render_png(s)))
        img.load()
        return img

    # -- exact values -----------------------------------------------------------------------------
    def canonical_actions(self, s: StateV2) -> list[Action]:
        """One action per effect available in ``s``, taps at the widgets' centres in this episode's layout;
        the order depends only on the screen (home icons are listed by app, not by slot)."""
        t = self.task(s.task_id)
        texts = (t.query, t.decoy or "asdf", "") if t.query else (t.decoy or "asdf", "")
        return canonical_actions(L.widgets(s), L.empty_point(s), texts)

    def _graph(self, t: TaskV2) -> D.QuotientGraph:
        sig = (bool(t.query), D.tracked_toggle(t))
        g = self._graphs.get(sig)
        if g is None:
            g = self._graphs[sig] = D.build_graph(t)
        return g

    def num_states(self, task: TaskV2 | str) -> int:
        """Size of the task's value-key graph (the quotient; the full state graph is far larger)."""
        return len(self._graph(self.task(task)).keys)

    def values(self, task: TaskV2 | str, gamma: float) -> tuple[D.QuotientGraph, np.ndarray]:
        t = self.task(task)
        if not 0.0 <= gamma < 1.0:
            raise DigiqError(f"gamma must be in [0, 1), got {gamma}")
        g = self._graph(t)
        sig = (bool(t.query), D.tracked_toggle(t), D.goal_signature(t))
        v = self._values.get((sig, float(gamma)))
        if v is None:
            d = self._dist.get(sig)
            if d is None:
                d = self._dist[sig] = D.distances(t, g)
            v = np.where(d > 0, float(gamma) ** np.maximum(d - 1, 0), 0.0)
            self._values[(sig, float(gamma))] = v
        return g, v

    def _value(self, s: StateV2, t: TaskV2, g: D.QuotientGraph, v: np.ndarray) -> float:
        i = g.index.get(D.value_key(s, D.tracked_toggle(t)))
        if i is None:
            raise DigiqError(f"sim state {s.key!r} is not reachable on the device (no value defined)")
        return float(v[i])

    def v_star(self, s: StateV2, gamma: float) -> float:
        t = self.task(s.task_id)
        g, v = self.values(t, gamma)
        return self._value(s, t, g, v)

    def q_star(self, s: StateV2, actions: list[str | Action], gamma: float) -> np.ndarray:
        t = self.task(s.task_id)
        g, v = self.values(t, gamma)
        self._value(s, t, g, v)  # an unreachable state is an error, as in v1
        out = np.zeros(len(actions), dtype=np.float64)
        for j, a in enumerate(actions):
            nxt, r, term = self.transition(s, a)
            out[j] = r if term else r + gamma * self._value(nxt, t, g, v)
        return out

    def optimal_actions(self, s: StateV2, gamma: float = 0.95) -> list[Action]:
        acts = self.canonical_actions(s)
        return best_actions(acts, self.q_star(s, acts, gamma))
