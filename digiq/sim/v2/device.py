"""Dynamics, judge and exact Q*/V* of benchmark v2.

Same rules as v1 (:mod:`digiq.sim.phone`: taps hit-tested against widget boxes, no-ops elsewhere, TYPE
replaces the field's text and every wrong text collapses to one "wrong query" state, reward 1 on reaching
the goal, STATUS_* end the episode with 0, goal states absorbing). New: settings sub-pages, seven toggles, a
3 x 3 home grid of nine apps, and a per-episode layout drawn from the episode seed.

**Values on a quotient graph.** Taps are first mapped to *effects* (``open:3``, ``result:1``, ...) with the
episode's layout, then the effect changes the state. The layout only relabels which tap hits which widget,
and a toggle other than the goal's never changes what else a tap does or whether the goal holds. So the
optimal values of a state are those of its *value key* (the state without the task, the seed and the
toggles that are not the goal's), computed once per (task signature) by BFS on the value-key graph:
V* = gamma^(d - 1), d the distance to a goal (0 at a goal or where none is reachable). ``transition`` and
``q_star`` hit-test concrete taps with the episode's layout and look the successor's value key up.
tests/test_sim_v2.py checks this against a brute-force BFS on the full state graph of several episodes.
"""

from __future__ import annotations

import dataclasses
from collections import deque

import numpy as np

from digiq.actions import Action, ActionType
from digiq.sim.rules import STATUS, shop_goal, swipe_scroll, tap_common, typed_query
from digiq.sim.v2 import layout as L
from digiq.sim.v2.layout import StateV2
from digiq.sim.v2.tasks import BROWSER_APP, CLOCK_APP, SETTINGS_APP, SITES, TaskV2

# Effects that are not widget taps; each of them can be produced by some action on every screen.
_SWIPED = {1: "scroll_down", -1: "scroll_up", 0: "noop"}
_TYPED = {L.Q_EMPTY: "type:empty", L.Q_OK: "type:ok", L.Q_BAD: "type:bad"}
_GLOBAL_EFFECTS = ("noop", "scroll_down", "scroll_up", "type:bad", "type:empty", "back", "home", "enter")


def reset(task: TaskV2, seed: int) -> StateV2:
    toggles = list(L.episode(task.task_id, seed).toggles)
    if task.kind == "toggle":
        toggles[task.toggle] = not task.target  # the goal never holds at reset
    return StateV2(task.task_id, int(seed), L.HOME, toggles=tuple(toggles))


def is_goal(s: StateV2, t: TaskV2) -> bool:
    if t.kind == "toggle":
        return s.toggles[t.toggle] == t.target
    if t.kind == "open_app":
        if t.app < len(SITES):
            return s.screen == L.SHOP and s.shop == t.app
        return s.screen == {SETTINGS_APP: L.SETTINGS, BROWSER_APP: L.BROWSER, CLOCK_APP: L.CLOCK}[t.app]
    if t.kind == "open_page":
        return s.screen == L.PAGE_SCREENS[t.page]
    shop = shop_goal(s, t)
    if shop is not None:
        return shop
    raise ValueError(f"task {t.task_id}: unknown kind {t.kind!r}")


def effect_of(s: StateV2, a: Action, t: TaskV2) -> str:
    """What ``a`` does on ``s``: a widget's effect (hit-tested with the episode's layout) or a global one."""
    if a.type is ActionType.DUAL_POINT and a.touch is not None and a.lift is not None:
        if a.is_tap:
            w = L.hit(s, a.touch)
            return "noop" if w is None else w.effect
        return _SWIPED[swipe_scroll(s.screen, a)]
    if a.type is ActionType.TYPE:
        return _TYPED[typed_query(a, t)] if s.screen == L.SEARCH else "noop"
    if a.type is ActionType.PRESS_HOME:
        return "home"
    if a.type is ActionType.PRESS_BACK:
        return "back"
    if a.type is ActionType.PRESS_ENTER:
        return "enter"
    return "status" if a.type in STATUS else "noop"


def apply(s: StateV2, effect: str) -> StateV2:
    """The next screen after ``effect`` (ignores the step counter and the judge)."""
    r = dataclasses.replace
    kind, _, arg = effect.partition(":")
    home = StateV2(s.task_id, s.seed, L.HOME, toggles=s.toggles)
    if kind == "open":
        app = int(arg)
        if app < len(SITES):
            return r(home, screen=L.SHOP, shop=app)
        return r(home, screen={SETTINGS_APP: L.SETTINGS, BROWSER_APP: L.BROWSER, CLOCK_APP: L.CLOCK}[app])
    if kind == "focus":
        return r(s, screen=L.SEARCH, query=s.query if s.screen == L.RESULTS else L.Q_EMPTY, scroll=0)
    if kind in ("submit", "enter"):
        if s.screen == L.SEARCH and s.query != L.Q_EMPTY:
            return r(s, screen=L.RESULTS, scroll=0)
        return s
    if kind in ("result", "add", "toggle"):
        return tap_common(s, kind, arg)
    if kind == "page":
        return r(s, screen=L.PAGE_SCREENS[int(arg)])
    if kind == "scroll_down":
        return r(s, scroll=min(L.MAX_SCROLL, s.scroll + 1)) if s.screen == L.RESULTS else s
    if kind == "scroll_up":
        return r(s, scroll=max(0, s.scroll - 1)) if s.screen == L.RESULTS else s
    if kind == "type":
        q = {"ok": L.Q_OK, "bad": L.Q_BAD, "empty": L.Q_EMPTY}[arg]
        return r(s, query=q) if s.screen == L.SEARCH else s
    if kind == "home":
        return home
    if kind == "back":
        if s.screen == L.PRODUCT:
            return r(s, screen=L.RESULTS, item=0, added=False)
        if s.screen in (L.SEARCH, L.RESULTS):
            return r(home, screen=L.SHOP, shop=s.shop)
        if s.screen in L.PAGE_SCREENS:
            return r(s, screen=L.SETTINGS)
        return home
    if kind in ("noop", "status"):
        return s
    raise AssertionError(f"unknown v2 effect {effect!r}")


def tracked_toggle(t: TaskV2) -> int:
    """The one toggle the value key keeps (-1: none matters)."""
    return t.toggle if t.kind == "toggle" else -1


def value_key(s: StateV2, tracked: int) -> str:
    bit = "-" if tracked < 0 else str(int(s.toggles[tracked]))
    return f"{s.screen}|{s.shop}|{s.query}|{s.scroll}|{s.item}|{int(s.added)}|{bit}"


def goal_signature(t: TaskV2) -> tuple:
    """What the goal predicate reads: tasks with one signature share their values."""
    return (t.kind, t.shop, t.item if t.kind in ("select", "cart") else 0, t.toggle, t.target, t.app, t.page)


@dataclasses.dataclass
class QuotientGraph:
    keys: list[str]
    index: dict[str, int]
    states: list[StateV2]  # one representative per value key
    preds: list[list[int]]  # non-terminal predecessors of each node


def build_graph(t: TaskV2) -> QuotientGraph:
    """The value-key graph of every task with ``t``'s (has a query, tracked toggle): BFS from home with the
    tracked toggle off and on, over every effect (layout-free: a representative's seed is irrelevant)."""
    tracked = tracked_toggle(t)
    effects_extra = ("type:ok",) if t.query else ()
    starts = [StateV2(t.task_id, 0, L.HOME)]
    if tracked >= 0:
        tg = [False] * L.NUM_TOGGLES
        tg[tracked] = True
        starts.append(StateV2(t.task_id, 0, L.HOME, toggles=tuple(tg)))
    keys: list[str] = []
    index: dict[str, int] = {}
    states: list[StateV2] = []
    succ: list[set[int]] = []
    queue: deque[StateV2] = deque()
    for s0 in starts:
        index[value_key(s0, tracked)] = len(keys)
        keys.append(value_key(s0, tracked))
        states.append(s0)
        succ.append(set())
        queue.append(s0)
    while queue:
        s = queue.popleft()
        i = index[value_key(s, tracked)]
        for e in [w.effect for w in L.widgets(s)] + list(_GLOBAL_EFFECTS) + list(effects_extra):
            if e.startswith("toggle:") and int(e[7:]) != tracked:
                continue  # flips a toggle the value key drops: a self-loop of the quotient
            nxt = apply(s, e)
            k = value_key(nxt, tracked)
            j = index.get(k)
            if j is None:
                j = index[k] = len(keys)
                keys.append(k)
                states.append(nxt)
                succ.append(set())
                queue.append(nxt)
            succ[i].add(j)
    preds: list[list[int]] = [[] for _ in keys]
    for i, out in enumerate(succ):
        for j in out:
            preds[j].append(i)
    return QuotientGraph(keys, index, states, preds)


def distances(t: TaskV2, g: QuotientGraph) -> np.ndarray:
    """BFS distance (actions) from every node to a goal of ``t``; 0 at goals and where none is reachable."""
    goal = [is_goal(s, t) for s in g.states]
    dist = np.zeros(len(g.keys), dtype=np.int64)
    frontier = [i for i, x in enumerate(goal) if x]
    seen = set(frontier)
    depth = 0
    while frontier:
        depth += 1
        nxt = []
        for j in frontier:
            for i in g.preds[j]:
                if i not in seen:
                    seen.add(i)
                    dist[i] = depth
                    nxt.append(i)
        frontier = nxt
    return dist
