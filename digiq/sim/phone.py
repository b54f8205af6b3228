"""The simulated Android device: dynamics, judge, rendering cache and exact Q*/V* by value iteration.

Design:

* **State.** A :class:`~digiq.sim.layout.State` (task, screen, shop, search-field contents, scroll, product,
  added-to-cart, three toggles). Every wrong typed text collapses to one "wrong query" state (rendered as
  the task's decoy query), so each task's state graph is finite (~1100 states).
* **Actions.** The AitW space of :class:`digiq.actions.Action`. A tap is hit-tested against the screen's
  widget boxes; a tap on nothing, a swipe where nothing scrolls, TYPE without a focused text field,
  ENTER outside the search screen, and INVALID actions are no-ops (the screen does not change).
  TYPE *replaces* the field's text (AitW's type appends; replacing keeps the state finite).
* **Judge.** Reward 1 on the step whose next state satisfies the goal, and the episode ends there;
  STATUS_TASK_COMPLETE / STATUS_TASK_IMPOSSIBLE end it with reward 0 (a goal state has already ended the
  episode, so "complete" is only ever premature); reaching ``task.max_steps`` ends it too (truncation is
  terminal, as in the official data: DigiRL-agent/digiq @ 8181379, ``digiq/environment/android/env.py:346``).
* **Values.** Q*/V* are the infinite-horizon discounted values on the step-free graph with goal states
  absorbing (V* = 0 there). The horizon is deliberately NOT part of the state: the optimal path of
  every task is far shorter than its horizon (tested), so it never binds for the optimal policy, and the
  critic's TD target (r + gamma (1-d) V(s')) is the same Bellman equation. Because the graph is
  deterministic with a single terminal reward, V*(s) = gamma^(d(s) - 1) with d(s) the BFS distance to a
  goal (0 if none is reachable); the tests check both.
* **Cost.** The dynamics do not depend on the task except through "does the typed text equal the task's
  query", so the transition table is built once per dynamics signature (2 of them) and value iteration
  per (task, gamma) is a few vectorised numpy sweeps. Each state is rendered once; PNG bytes are cached.
"""

from __future__ import annotations

import dataclasses
import io
from collections import OrderedDict
from typing import Literal

import numpy as np
from PIL import Image

from digiq.actions import Action, ActionType, parse_action
from digiq.config import check
from digiq.errors import DigiqError
from digiq.sim import layout as L
from digiq.sim.layout import State
from digiq.sim.render import render_state
from digiq.sim.rules import (
    STATUS,
    best_actions,
    canonical_actions,
    encode_png,
    shop_goal,
    swipe_scroll,
    tap_common,
    typed_query,
)
from digiq.sim.tasks import TEST_QUERIES, TRAIN_QUERIES, Task, catalogue, task_index
from digiq.sim.v2 import layout as v2_layout
from digiq.sim.v2.layout import StateV2, is_v2_id
from digiq.sim.v2.phone import PhoneV2
from digiq.sim.v2.tasks import TaskV2


@dataclasses.dataclass
class SimConfig:
    # Screenshot width in pixels (portrait; AitW phones are 1080x2400, the tiny VLMs read 112-224 px).
    width: int = 180
    # Screenshot height in pixels.
    height: int = 320
    # How many decoded PIL screenshots to keep in memory (PNG bytes of every rendered state are always kept).
    image_cache_size: int = 512
    # Which task catalogue `tasks(split)` serves: v1 (32 test goals, fixed starts) or v2 (train / val / test,
    # randomised starts from the episode seed; docs/benchmark_v2.md). Every other method serves a task or
    # state of either benchmark whatever this says (v2 ids start with "v2/").
    benchmark: Literal["v1", "v2"] = "v1"

    def validate(self, where: str = "sim") -> None:

        check(32 <= self.width <= 2048 and 32 <= self.height <= 4096, f"{where}: screen size out of range")
        check(self.image_cache_size >= 0, f"{where}.image_cache_size must be >= 0")
        check(self.benchmark in ("v1", "v2"), f"{where}.benchmark must be v1 or v2, got {self.benchmark!r}")


@dataclasses.dataclass
class _Graph:
    """Transition table over the abstract (task-free) states of one dynamics signature."""

    keys: list[str]  # abstract keys, index = state id
    index: dict[str, int]
    states: list[State]
    next: np.ndarray  # (S, K) next-state ids; padded columns are self-loops
    status: np.ndarray  # (S, K) bool: the action is a STATUS action (terminal, reward 0)
    valid: np.ndarray  # (S, K) bool: a real canonical action (False = padding)


class SimPhone:
    """A deterministic simulated phone. The task catalogue does not depend on any seed."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self._png: dict[str, bytes] = {}
        self._img: OrderedDict[str, Image.Image] = OrderedDict()
        self._graphs: dict[bool, _Graph] = {}
        self._values: dict[tuple[str, float], np.ndarray] = {}
        self._v2: PhoneV2 | None = None

    @property
    def v2(self) -> PhoneV2:
        """The benchmark-v2 device (built on first use; v1 never touches it)."""
        if self._v2 is None:
            self._v2 = PhoneV2(self.config.width, self.config.height)
        return self._v2

    # -- tasks ------------------------------------------------------------------------------------
    def tasks(self, split: str = "train") -> list[Task] | list[TaskV2]:
        if self.config.benchmark == "v2":
            return self.v2.tasks(split)
        cat = catalogue()
        if split not in cat:
            raise DigiqError(f"unknown sim split {split!r}; expected one of {sorted(cat)}")
        return list(cat[split])

    def task(self, task: Task | TaskV2 | str) -> Task | TaskV2:
        if isinstance(task, Task):
            return task
        if isinstance(task, TaskV2) or is_v2_id(task):
            return self.v2.task(task)
        try:
            return task_index()[task]
        except KeyError:
            raise DigiqError(f"unknown sim task id {task!r}") from None

    # -- dynamics ---------------------------------------------------------------------------------
    def query_pool(self, task: Task | TaskV2) -> tuple[str, ...]:
        """The queries a demonstrator may mistype on ``task`` (v2: never a word of another held-out group)."""
        if isinstance(task, TaskV2):
            return self.v2.query_pool(task)
        return (*TRAIN_QUERIES, *TEST_QUERIES)

    def reset(self, task: Task | TaskV2 | str, seed: int = 0) -> State | StateV2:
        """The start state. v1 starts are fixed (``seed`` is ignored); a v2 start is drawn from ``seed``."""
        t = self.task(task)
        if isinstance(t, TaskV2):
            return self.v2.reset(t, seed)
        return State(t.task_id, L.HOME, toggles=t.initial_toggles)

    def is_goal(self, state: State, task: Task | None = None) -> bool:
        if isinstance(state, StateV2):
            return self.v2.is_goal(state, task)  # type: ignore[arg-type]
        t = task or self.task(state.task_id)
        s = state
        if t.kind == "toggle":
            return s.toggles[t.toggle] == t.target
        if t.kind == "open_settings":
            return s.screen == L.SETTINGS
        if t.kind == "open_browser":
            return s.screen == L.BROWSER
        if t.kind == "open_shop":
            return s.screen == L.SHOP and s.shop == t.shop
        shop = shop_goal(s, t)
        if shop is not None:
            return shop
        raise DigiqError(f"task {t.task_id}: unknown kind {t.kind!r}")

    def _effect(self, s: State, a: Action, t: Task) -> State:
        """The next screen (ignores the step counter and the judge)."""
        r = dataclasses.replace
        if a.type is ActionType.DUAL_POINT and a.touch is not None and a.lift is not None:
            if a.is_tap:
                w = L.hit(s, a.touch)
                return s if w is None else self._tap(s, w.effect)
            move = swipe_scroll(s.screen, a)
            return r(s, scroll=min(L.MAX_SCROLL, max(0, s.scroll + move))) if move else s
        if a.type is ActionType.TYPE:
            return r(s, query=typed_query(a, t)) if s.screen == L.SEARCH else s
        if a.type is ActionType.PRESS_HOME:
            return State(s.task_id, L.HOME, toggles=s.toggles)
        if a.type is ActionType.PRESS_BACK:
            if s.screen == L.PRODUCT:
                return r(s, screen=L.RESULTS, item=0, added=False)
            if s.screen in (L.SEARCH, L.RESULTS):
                return State(s.task_id, L.SHOP, shop=s.shop, toggles=s.toggles)
            return State(s.task_id, L.HOME, toggles=s.toggles)
        if a.type is ActionType.PRESS_ENTER:
            if s.screen == L.SEARCH and s.query != L.Q_EMPTY:
                return r(s, screen=L.RESULTS, scroll=0)
            return s
        return s  # STATUS_* (handled by the judge) and INVALID: no-op

    def _tap(self, s: State, effect: str) -> State:
        r = dataclasses.replace
        kind, _, arg = effect.partition(":")
        if kind == "open":
            if arg.startswith("shop"):
                return State(s.task_id, L.SHOP, shop=int(arg[4:]), toggles=s.toggles)
            return State(s.task_id, L.SETTINGS if arg == "settings" else L.BROWSER, toggles=s.toggles)
        if kind == "focus":
            q = s.query if s.screen == L.RESULTS else L.Q_EMPTY
            return State(s.task_id, L.SEARCH, shop=s.shop, query=q, toggles=s.toggles)
        if kind == "submit":
            return r(s, screen=L.RESULTS, scroll=0) if s.query != L.Q_EMPTY else s
        nxt = tap_common(s, kind, arg)
        if nxt is None:
            raise AssertionError(f"unknown widget effect {effect!r}")
        return nxt

    def transition(self, state: State, action: Action | str) -> tuple[State, float, bool]:
        """One step on the step-free graph: ``(next_state, reward, terminal)`` without the horizon.

        A goal state is absorbing: any action from it returns ``(state, 0.0, True)``.
        """
        if isinstance(state, StateV2):
            return self.v2.transition(state, action)  # type: ignore[return-value]
        t = self.task(state.task_id)
        a = parse_action(action) if isinstance(action, str) else action
        if self.is_goal(state, t):
            return state, 0.0, True
        if a.type in STATUS:
            return state, 0.0, True
        nxt = self._effect(state, a, t)
        nxt = dataclasses.replace(nxt, steps=state.steps)
        if self.is_goal(nxt, t):
            return nxt, 1.0, True
        return nxt, 0.0, False

    def step(self, state: State, action: Action | str) -> tuple[State, float, bool]:
        """Apply ``action``; ``done`` also when the task's horizon (``max_steps`` actions) is reached."""
        if isinstance(state, StateV2):
            return self.v2.step(state, action)  # type: ignore[return-value]
        nxt, reward, terminal = self.transition(state, action)
        nxt = dataclasses.replace(nxt, steps=state.steps + 1)
        done = terminal or nxt.steps >= self.task(state.task_id).max_steps
        return nxt, reward, done

    # -- keys -------------------------------------------------------------------------------------
    def state_key(self, state: State) -> str:
        return state.key

    def state_from_key(self, key: str) -> State:
        if is_v2_id(key):
            return self.v2.state_from_key(key)  # type: ignore[return-value]
        try:
            s = L.state_from_key(key)
        except ValueError as e:
            raise DigiqError(str(e)) from None
        self.task(s.task_id)  # unknown task -> clear error
        return s

    def _state(self, state: State | str) -> State:
        return self.state_from_key(state) if isinstance(state, str) else state

    # -- rendering --------------------------------------------------------------------------------
    def render_png(self, state: State | str) -> bytes:
        """PNG bytes of the screenshot; each distinct state is rendered and encoded once."""
        s = self._state(state)
        if isinstance(s, StateV2):
            return self.v2.render_png(s)
        key = s.key
        data = self._png.get(key)
        if data is None:
            img = render_state(s, self.task(s.task_id), self.config.width, self.config.height)
            data = self._png[key] = encode_png(img)
        return data

    def render(self, state: State | str) -> Image.Image:
        """The screenshot as a portrait RGB PIL image (a copy: callers may modify it)."""
        s = self._state(state)
        key = s.key
        img = self._img.get(key)
        if img is None:
            img = Image.open(io.BytesIO(self.render_png(s)))
            img.load()
            if self.config.image_cache_size:
                self._img[key] = img
                if len(self._img) > self.config.image_cache_size:
                    self._img.popitem(last=False)
        else:
            self._img.move_to_end(key)
        return img.copy()

    def widgets(self, state: State | str) -> list[L.Widget]:
        s = self._state(state)
        if isinstance(s, StateV2):
            return v2_layout.widgets(s)  # type: ignore[return-value]
        return L.widgets(s)

    def hit(self, state: State, point: tuple[float, float]) -> L.Widget | None:
        """The widget a tap at ``point`` hits (with a v2 episode's layout), or None."""
        if isinstance(state, StateV2):
            return v2_layout.hit(state, point)  # type: ignore[return-value]
        return L.hit(state, point)

    # -- exact values -----------------------------------------------------------------------------
    def canonical_actions(self, state: State | str) -> list[Action]:
        """One action per distinct effect available in ``state``; every action's effect equals one of these.

        The order depends only on the task-free state, so it indexes the shared transition table.
        """
        s = self._state(state)
        if isinstance(s, StateV2):
            return self.v2.canonical_actions(s)
        t = self.task(s.task_id)
        return canonical_actions(L.widgets(s), L.empty_point(s), (t.query, t.decoy or "asdf", ""))

    @staticmethod
    def _signature(task: Task) -> bool:
        return bool(task.query)

    def _graph(self, task: Task) -> _Graph:
        if isinstance(task, TaskV2):
            raise DigiqError(
                f"task {task.task_id}: the full transition table (and Q^beta, BehaviourValues) is v1-only; "
                "benchmark v2 has exact Q*/V* through q_star / v_star"
            )
        sig = self._signature(task)
        g = self._graphs.get(sig)
        if g is not None:
            return g
        # Any task with this signature has the same task-free dynamics; explore from every toggle setting
        # so the table covers all tasks' start states.
        keys: list[str] = []
        index: dict[str, int] = {}
        states: list[State] = []
        edges: list[list[tuple[int, bool]]] = []
        frontier = []
        for bits in range(8):
            toggles = tuple(bool(bits >> i & 1) for i in range(3))
            s0 = State(task.task_id, L.HOME, toggles=toggles)  # type: ignore[arg-type]
            if s0.abstract_key not in index:
                index[s0.abstract_key] = len(keys)
                keys.append(s0.abstract_key)
                states.append(s0)
                frontier.append(s0)
        while frontier:
            s = frontier.pop()
            row = []
            for a in self.canonical_actions(s):
                nxt = self._effect(s, a, task)
                k = nxt.abstract_key
                if k not in index:
                    index[k] = len(keys)
                    keys.append(k)
                    states.append(nxt)
                    frontier.append(nxt)
                row.append((index[k], a.type in STATUS))
            while len(edges) <= index[s.abstract_key]:
                edges.append([])
            edges[index[s.abstract_key]] = row
        n, kmax = len(keys), max(len(r) for r in edges)
        nxt_arr = np.tile(np.arange(n)[:, None], (1, kmax))
        status = np.zeros((n, kmax), dtype=bool)
        valid = np.zeros((n, kmax), dtype=bool)
        for i, row in enumerate(edges):
            for k, (j, st) in enumerate(row):
                nxt_arr[i, k], status[i, k], valid[i, k] = j, st, True
        g = self._graphs[sig] = _Graph(keys, index, states, nxt_arr, status, valid)
        return g

    def num_states(self, task: Task | str) -> int:
        """Size of the task's (step-free) state graph (v2: of its value-key quotient)."""
        if isinstance(task, TaskV2) or is_v2_id(task):
            return self.v2.num_states(task)
        return len(self._graph(self.task(task)).keys)

    def _goal_mask(self, task: Task, g: _Graph) -> np.ndarray:
        return np.array([self.is_goal(s, task) for s in g.states], dtype=bool)

    def values(self, task: Task | str, gamma: float) -> np.ndarray:
        """V* over the task's graph (indexed like ``_graph(task).keys``), by value iteration."""
        t = self.task(task)
        if not 0.0 <= gamma < 1.0:
            raise DigiqError(f"gamma must be in [0, 1), got {gamma}")
        cached = self._values.get((t.task_id, float(gamma)))
        if cached is not None:
            return cached
        g = self._graph(t)
        goal = self._goal_mask(t, g)
        reach_goal = goal[g.next] & ~g.status
        reward = reach_goal.astype(np.float64)
        cont = (~reach_goal & ~g.status).astype(np.float64)
        v = np.zeros(len(g.keys))
        for _ in range(100_000):
            q = reward + gamma * cont * v[g.next]
            new = np.where(goal, 0.0, q.max(axis=1))
            if np.max(np.abs(new - v)) < 1e-15:
                v = new
                break
            v = new
        self._values[(t.task_id, float(gamma))] = v
        return v

    def _index(self, s: State) -> tuple[Task, _Graph, int]:
        t = self.task(s.task_id)
        g = self._graph(t)
        i = g.index.get(s.abstract_key)
        if i is None:
            raise DigiqError(f"sim state {s.key!r} is not reachable on the device (no value defined)")
        return t, g, i

    def v_star(self, state_key: str | State, gamma: float) -> float:
        s = self._state(state_key)
        if isinstance(s, StateV2):
            return self.v2.v_star(s, gamma)
        t, _, i = self._index(s)
        return float(self.values(t, gamma)[i])

    def q_star(self, state_key: str | State, actions: list[str | Action], gamma: float) -> np.ndarray:
        """Q*(s, a) = r(s, a) + gamma (1 - terminal) V*(s') for any actions (strings or Actions)."""
        s = self._state(state_key)
        if isinstance(s, StateV2):
            return self.v2.q_star(s, actions, gamma)
        t, g, _ = self._index(s)
        v = self.values(t, gamma)
        out = np.zeros(len(actions), dtype=np.float64)
        for j, a in enumerate(actions):
            nxt, r, term = self.transition(s, a)
            if term:
                out[j] = r
            else:
                i = g.index.get(nxt.abstract_key)
                if i is None:  # cannot happen for a state in the graph: effects are closed
                    raise DigiqError(f"sim: successor {nxt.key!r} of {s.key!r} is outside the graph")
                out[j] = r + gamma * v[i]
        return out

    def optimal_actions(self, state: State | str, gamma: float = 0.95) -> list[Action]:
        """The canonical actions that attain V*(s) (ties kept, in canonical order)."""
        s = self._state(state)
        if isinstance(s, StateV2):
            return self.v2.optimal_actions(s, gamma)
        acts = self.canonical_actions(s)
        return best_actions(acts, self.q_star(s, acts, gamma))
