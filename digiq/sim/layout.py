"""Screen states and widget geometry of the simulated phone (shared by hit-testing and rendering).

A :class:`State` is a small frozen record; the screen is a pure function of it (no clock, no
animation), so the set of screens is finite and each is rendered once. All boxes are normalised
``(y0, x0, y1, x1)`` in ``[0, 1]``, like AitW touch points, so the device resolution is free.

Only *interactive* widgets are listed by :func:`widgets`; everything else on a screen (status bar,
banners, keyboard letters, the browser page) is decoration, and a tap there leaves the screen
unchanged. That is what makes the Stage-1 label "did the screen change" meaningful: a tap on
nothing is a visible no-op, a tap on a widget a visible change.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from digiq.sim.v2.layout import StateV2

Box = tuple[float, float, float, float]

HOME, SHOP, SEARCH, RESULTS, PRODUCT, SETTINGS, BROWSER = (
    "home",
    "shop",
    "search",
    "results",
    "product",
    "settings",
    "browser",
)
SCREENS = (HOME, SHOP, SEARCH, RESULTS, PRODUCT, SETTINGS, BROWSER)
# Contents of the search field: nothing, the task's query, or any other text (shown as the task's decoy
# query). Collapsing every wrong text to one state keeps the graph finite (documented in phone.py).
Q_EMPTY, Q_OK, Q_BAD = 0, 1, 2
NUM_RESULTS = 5
VISIBLE_RESULTS = 3
MAX_SCROLL = NUM_RESULTS - VISIBLE_RESULTS

STATUS_BAR: Box = (0.0, 0.0, 0.045, 1.0)
HEADER: Box = (0.045, 0.0, 0.14, 1.0)
SEARCH_BAR: Box = (0.165, 0.05, 0.25, 0.95)
SUGGESTION: Box = (0.265, 0.05, 0.37, 0.95)
KEYBOARD: Box = (0.62, 0.0, 1.0, 1.0)
ENTER_KEY: Box = (0.89, 0.72, 0.98, 0.97)
BANNER: Box = (0.29, 0.05, 0.56, 0.95)
PRODUCT_IMAGE: Box = (0.17, 0.15, 0.44, 0.85)
ADD_TO_CART: Box = (0.62, 0.08, 0.72, 0.92)
# Home-screen icons: 2 columns x 3 rows, big and far apart.
_COLS = ((0.08, 0.44), (0.56, 0.92))
_ROWS = ((0.10, 0.26), (0.32, 0.48), (0.54, 0.70))
HOME_APPS = ("shop0", "shop1", "shop2", "settings", "browser")


def grid_box(rows: tuple[tuple[float, float], ...], cols: tuple[tuple[float, float], ...], slot: int) -> Box:
    """Box of home-grid ``slot`` (row-major) in a grid of (y0, y1) ``rows`` and (x0, x1) ``cols``."""
    r, c = divmod(slot, len(cols))
    return (rows[r][0], cols[c][0], rows[r][1], cols[c][1])


def row_box(i: int, top: float, pitch: float, height: float) -> Box:
    """Box of row ``i`` of a full-width list whose first row starts at ``top``."""
    y0 = top + i * pitch
    return (y0, 0.04, y0 + height, 0.96)


def home_icon_box(slot: int) -> Box:
    return grid_box(_ROWS, _COLS, slot)


def result_box(row: int) -> Box:
    """Box of the ``row``-th *visible* result (0..VISIBLE_RESULTS-1)."""
    return row_box(row, 0.28, 0.2, 0.18)


def toggle_box(i: int) -> Box:
    return row_box(i, 0.17, 0.13, 0.11)


@dataclasses.dataclass(frozen=True)
class State:
    """One screen of one task. ``steps`` counts actions taken (for the horizon) and is NOT part of the
    key: values are computed on the step-free graph (see phone.py)."""

    task_id: str
    screen: str = HOME
    shop: int = -1
    query: int = Q_EMPTY
    scroll: int = 0
    item: int = 0
    added: bool = False
    toggles: tuple[bool, bool, bool] = (True, False, False)
    steps: int = dataclasses.field(default=0, compare=False)

    @property
    def abstract_key(self) -> str:
        """The task-free part of the key (the dynamics do not depend on the task)."""
        bits = "".join("1" if t else "0" for t in self.toggles)
        return f"{self.screen}|{self.shop}|{self.query}|{self.scroll}|{self.item}|{int(self.added)}|{bits}"

    @property
    def key(self) -> str:
        return f"{self.task_id}|{self.abstract_key}"


def state_from_key(key: str) -> State:
    """Inverse of ``State.key`` (raises ValueError on a malformed key)."""
    parts = key.split("|")
    if len(parts) != 8:
        raise ValueError(f"malformed sim state key {key!r}: expected 8 '|'-separated fields")
    task_id, screen, shop, query, scroll, item, added, bits = parts
    if screen not in SCREENS or len(bits) != 3 or set(bits) - {"0", "1"}:
        raise ValueError(f"malformed sim state key {key!r}")
    return State(task_id, screen, *key_fields(shop, query, scroll, item, added, bits))  # type: ignore[arg-type]


def key_fields(*fields: str) -> tuple:
    """(shop, query, scroll, item, added, toggle bits) of a state key, parsed (v2's keys share them)."""
    shop, query, scroll, item, added, bits = fields
    return int(shop), int(query), int(scroll), int(item), added == "1", tuple(b == "1" for b in bits)


@dataclasses.dataclass(frozen=True)
class Widget:
    name: str
    box: Box
    # What a tap does: "open:<app>", "focus", "submit", "result:<i>", "add", "toggle:<i>" (v2 also "page:<p>").
    effect: str


def widgets(s: State) -> list[Widget]:
    """The interactive widgets of a screen, in a fixed order."""
    if s.screen == HOME:
        return [Widget(app, home_icon_box(i), f"open:{app}") for i, app in enumerate(HOME_APPS)]
    if s.screen == SETTINGS:
        return [Widget(f"toggle{i}", toggle_box(i), f"toggle:{i}") for i in range(3)]
    return shop_widgets(s)  # BROWSER: a static page, no widgets


def shop_widgets(s: State | StateV2) -> list[Widget]:
    """The widgets of the shop screens, the same on both benchmarks ([] on any other screen)."""
    if s.screen == SHOP:
        return [Widget("search_bar", SEARCH_BAR, "focus")]
    if s.screen == SEARCH:
        out = [Widget("enter_key", ENTER_KEY, "submit")]
        if s.query != Q_EMPTY:
            out.append(Widget("suggestion", SUGGESTION, "submit"))
        return out
    if s.screen == RESULTS:
        out = [Widget("search_bar", SEARCH_BAR, "focus")]
        for row in range(VISIBLE_RESULTS):
            out.append(Widget(f"result{s.scroll + row}", result_box(row), f"result:{s.scroll + row}"))
        return out
    if s.screen == PRODUCT:
        return [] if s.added else [Widget("add_to_cart", ADD_TO_CART, "add")]
    return []


def inside(point: tuple[float, float], box: Box) -> bool:
    y, x = point
    return box[0] <= y <= box[2] and box[1] <= x <= box[3]


def first_hit(ws: list[Widget], point: tuple[float, float]) -> Widget | None:
    """The first of ``ws`` whose box holds ``point``, or None."""
    return next((w for w in ws if inside(point, w.box)), None)


def hit(s: State, point: tuple[float, float]) -> Widget | None:
    return first_hit(widgets(s), point)


def free_point(ws: list[Widget], ys: tuple[float, ...]) -> tuple[float, float] | None:
    """The first point of the grid ``ys`` x (0.02, 0.5, 0.98) that hits none of ``ws``, or None."""
    for y in ys:
        for x in (0.02, 0.5, 0.98):
            if first_hit(ws, (y, x)) is None:
                return (y, x)
    return None


def empty_point(s: State) -> tuple[float, float] | None:
    """A point that hits no widget (for the canonical 'tap on nothing' action), or None."""
    return free_point(widgets(s), (0.02, 0.5, 0.8, 0.99))
