"""The device rules benchmarks v1 and v2 share (:mod:`digiq.sim.phone`, :mod:`digiq.sim.v2.device`).

Both benchmarks read the same canonical swipes and keys, turn a TYPE and a swipe into the same change of the
search field and the results list, judge search / select / cart goals alike and encode screens to PNG the
same way; v2 only adds screens and a per-episode layout. Keeping these in one place is what keeps the same
action strings meaning the same thing on both benchmarks.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence
from typing import Any, Protocol, TypeVar

import numpy as np
from PIL import Image

from digiq.actions import Action, ActionType
from digiq.sim import layout as L

# Canonical swipes: finger moves up (content scrolls down the list), down, and sideways (always a no-op).
SWIPE_UP = Action.swipe((0.75, 0.5), (0.35, 0.5))
SWIPE_DOWN = Action.swipe((0.35, 0.5), (0.75, 0.5))
SWIPE_SIDE = Action.swipe((0.5, 0.85), (0.5, 0.15))
KEYS = tuple(
    Action.key(t)
    for t in (
        ActionType.PRESS_BACK,
        ActionType.PRESS_HOME,
        ActionType.PRESS_ENTER,
        ActionType.STATUS_TASK_COMPLETE,
        ActionType.STATUS_TASK_IMPOSSIBLE,
    )
)
STATUS = (ActionType.STATUS_TASK_COMPLETE, ActionType.STATUS_TASK_IMPOSSIBLE)


class _ShopState(Protocol):
    screen: str
    shop: int
    query: int
    item: int
    added: bool


_S = TypeVar("_S", bound=Any)  # a v1 State or a v2 StateV2


class _ShopTask(Protocol):
    kind: str
    shop: int
    item: int
    query: str


def shop_goal(s: _ShopState, t: _ShopTask) -> bool | None:
    """Whether ``s`` satisfies a search / select / cart task; None for any other kind of task."""
    same = s.shop == t.shop and s.query == L.Q_OK
    if t.kind == "search":
        return same and s.screen == L.RESULTS
    if t.kind == "select":
        return same and s.screen == L.PRODUCT and s.item == t.item
    if t.kind == "cart":
        return same and s.screen == L.PRODUCT and s.item == t.item and s.added
    return None


def tap_common(s: _S, kind: str, arg: str) -> _S | None:
    """The tap effects both benchmarks share (open a result, add to cart, flip a toggle); None for others."""
    if kind == "result":
        return dataclasses.replace(s, screen=L.PRODUCT, item=int(arg), added=False)
    if kind == "add":
        return dataclasses.replace(s, added=True)
    if kind == "toggle":
        tg = list(s.toggles)
        tg[int(arg)] = not tg[int(arg)]
        return dataclasses.replace(s, toggles=tuple(tg))
    return None


def swipe_scroll(screen: str, a: Action) -> int:
    """How a swipe moves the results list: +1 (finger up: the list moves on), -1 (finger down) or 0 (a
    sideways swipe, or any screen but the results)."""
    assert a.touch is not None and a.lift is not None
    dy, dx = a.lift[0] - a.touch[0], a.lift[1] - a.touch[1]
    if screen == L.RESULTS and abs(dy) > abs(dx):
        return 1 if dy < 0 else -1
    return 0


def typed_query(a: Action, t: _ShopTask) -> int:
    """The search field after TYPE ``a`` (which replaces its text): empty, the task's query, or wrong."""
    text = a.text.strip().lower()
    if not text:
        return L.Q_EMPTY
    return L.Q_OK if t.query and text == t.query.lower() else L.Q_BAD


def canonical_actions(
    widgets: Sequence[L.Widget], empty: tuple[float, float] | None, texts: Sequence[str]
) -> list[Action]:
    """Taps at the widgets' centres, a tap on nothing (``empty``), the swipes, TYPE of each of ``texts``, and
    the keys: one action per effect a screen offers, in the order both benchmarks index them by."""
    acts = [Action.tap((w.box[0] + w.box[2]) / 2, (w.box[1] + w.box[3]) / 2) for w in widgets]
    if empty is not None:
        acts.append(Action.tap(*empty))
    acts += [SWIPE_UP, SWIPE_DOWN, SWIPE_SIDE]
    acts += [Action.type_text(x) for x in texts]
    acts += list(KEYS)
    return acts


def best_actions(actions: Sequence[Action], q: np.ndarray) -> list[Action]:
    """The actions whose Q* attains the maximum (ties kept, in the given order)."""
    best = q.max()
    return [a for a, x in zip(actions, q) if x >= best - 1e-12]


def encode_png(img: Image.Image) -> bytes:
    """A screen's PNG bytes (fixed settings: the bytes of a screen are part of the frozen benchmarks)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()
