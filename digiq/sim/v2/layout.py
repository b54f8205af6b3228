"""v2 states, the per-episode draw and the widget geometry (shared by hit-testing and rendering).

A :class:`StateV2` carries the episode seed: the episode's layout (which app sits in which home-grid slot,
which product title sits at which position of the results list) is a pure function of (task id, seed), drawn
by :func:`episode` from a self-contained SHA-256 stream (no numpy or Python RNG whose streams may change
between versions), so a task + seed is the same episode in every process and every release. Boxes are
normalised ``(y0, x0, y1, x1)``, as in v1 (whose shop-screen boxes v2 reuses).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib

from digiq.sim import layout as L1
from digiq.sim.v2.tasks import APPS, MAIN_TOGGLES, PAGES, PREFIX, TOGGLES, TaskV2

Box = L1.Box
HOME, SHOP, SEARCH, RESULTS, PRODUCT, SETTINGS, BROWSER = L1.SCREENS  # v1's screens, and a clock app
CLOCK = "clock"
PAGE_SCREENS = tuple(p.lower() for p in PAGES)  # one sub-page of the settings per entry of PAGES
SCREENS = (HOME, SHOP, SEARCH, RESULTS, PRODUCT, SETTINGS, *PAGE_SCREENS, BROWSER, CLOCK)
Q_EMPTY, Q_OK, Q_BAD = L1.Q_EMPTY, L1.Q_OK, L1.Q_BAD
NUM_RESULTS, VISIBLE_RESULTS, MAX_SCROLL = L1.NUM_RESULTS, L1.VISIBLE_RESULTS, L1.MAX_SCROLL
NUM_TOGGLES = len(TOGGLES)
STATUS_BAR, HEADER, SEARCH_BAR, SUGGESTION = L1.STATUS_BAR, L1.HEADER, L1.SEARCH_BAR, L1.SUGGESTION
KEYBOARD, ENTER_KEY, BANNER, PRODUCT_IMAGE, ADD_TO_CART = (
    L1.KEYBOARD,
    L1.ENTER_KEY,
    L1.BANNER,
    L1.PRODUCT_IMAGE,
    L1.ADD_TO_CART,
)
result_box = L1.result_box
inside = L1.inside
Widget = L1.Widget
# Home grid: 3 x 3 slots of equal size (a uniformly random tap is equally likely to hit each).
_COLS = ((0.05, 0.31), (0.37, 0.63), (0.69, 0.95))
_ROWS = ((0.08, 0.23), (0.29, 0.44), (0.50, 0.65))
SETTINGS_ROWS = MAIN_TOGGLES + len(PAGES)  # 4 toggle rows, then one row per sub-page


def home_slot_box(slot: int) -> Box:
    return L1.grid_box(_ROWS, _COLS, slot)


def settings_row_box(row: int) -> Box:
    return L1.row_box(row, 0.16, 0.115, 0.1)


PAGE_TOGGLE_BOX: Box = settings_row_box(0)


@dataclasses.dataclass(frozen=True)
class Episode:
    """What an episode seed draws: the home grid (slot -> app), the results list (position -> product
    variant) and the toggle values at reset (before the goal's toggle is set against the goal)."""

    app_order: tuple[int, ...]
    result_order: tuple[int, ...]
    toggles: tuple[bool, ...]

    @functools.cached_property
    def app_slot(self) -> tuple[int, ...]:
        slots = [0] * len(self.app_order)
        for slot, app in enumerate(self.app_order):
            slots[app] = slot
        return tuple(slots)


class _Stream:
    """Uniform integers from SHA-256 in counter mode: frozen across Python / numpy versions."""

    def __init__(self, label: str) -> None:
        self.label, self.n = label, 0

    def below(self, k: int) -> int:
        h = hashlib.sha256(f"{self.label}#{self.n}".encode()).digest()
        self.n += 1
        return int.from_bytes(h[:8], "big") % k

    def permutation(self, n: int) -> tuple[int, ...]:
        out = list(range(n))
        for i in range(n - 1, 0, -1):  # Fisher-Yates
            j = self.below(i + 1)
            out[i], out[j] = out[j], out[i]
        return tuple(out)


@functools.lru_cache(maxsize=65536)
def episode(task_id: str, seed: int) -> Episode:
    """The randomised start of ``task_id`` under episode ``seed`` (frozen: tests pin a hash of a few)."""
    rng = _Stream(f"digiq-sim-v2|{task_id}|{seed}")
    apps = rng.permutation(len(APPS))
    results = rng.permutation(NUM_RESULTS)
    toggles = tuple(rng.below(2) == 1 for _ in range(NUM_TOGGLES))
    return Episode(apps, results, toggles)


@dataclasses.dataclass(frozen=True)
class StateV2:
    """One screen of one v2 episode. ``seed`` names the episode's layout; ``steps`` is not part of the key."""

    task_id: str
    seed: int = 0
    screen: str = HOME
    shop: int = -1
    query: int = Q_EMPTY
    scroll: int = 0
    item: int = 0  # the results-list position of the open product
    added: bool = False
    toggles: tuple[bool, ...] = (False,) * NUM_TOGGLES
    steps: int = dataclasses.field(default=0, compare=False)

    @property
    def key(self) -> str:
        bits = "".join("1" if t else "0" for t in self.toggles)
        return (
            f"{self.task_id}|{self.seed}|{self.screen}|{self.shop}|{self.query}|{self.scroll}|{self.item}|"
            f"{int(self.added)}|{bits}"
        )

    @property
    def abstract_key(self) -> str:
        """The key without the task, the seed and the toggles that are not the goal's (:mod:`device`)."""
        return self.key.split("|", 2)[2]


def state_from_key(key: str) -> StateV2:
    """Inverse of ``StateV2.key`` (raises ValueError naming the key when malformed)."""
    parts = key.split("|")
    if len(parts) != 9 or not parts[0].startswith(PREFIX):
        raise ValueError(f"malformed sim v2 state key {key!r}: expected 9 '|'-separated fields")
    task_id, seed, screen, shop, query, scroll, item, added, bits = parts
    if (
        screen not in SCREENS
        or len(bits) != NUM_TOGGLES
        or set(bits) - {"0", "1"}
        or added not in ("0", "1")
        or not seed.isdigit()
    ):
        raise ValueError(f"malformed sim v2 state key {key!r}")
    try:
        return StateV2(task_id, int(seed), screen, *L1.key_fields(shop, query, scroll, item, added, bits))
    except ValueError:
        raise ValueError(f"malformed sim v2 state key {key!r}: non-integer field") from None


def widgets(s: StateV2) -> list[Widget]:
    """The interactive widgets of a screen, in an order that does not depend on the episode's layout (the
    home icons are listed by app, wherever the episode put them)."""
    seed = s.seed if s.screen == HOME else 0  # only the home grid depends on the episode
    return list(_widgets(s.task_id if s.screen == HOME else "", seed, s.screen, s.scroll, s.query, s.added))


@functools.lru_cache(maxsize=8192)
def _widgets(
    task_id: str, seed: int, screen: str, scroll: int, query: int, added: bool
) -> tuple[Widget, ...]:
    s = StateV2(task_id, seed, screen, scroll=scroll, query=query, added=added)
    return tuple(_make_widgets(s))


def _make_widgets(s: StateV2) -> list[Widget]:
    if s.screen == HOME:
        slot = episode(s.task_id, s.seed).app_slot
        return [Widget(f"app:{APPS[a]}", home_slot_box(slot[a]), f"open:{a}") for a in range(len(APPS))]
    if s.screen == SETTINGS:
        out = [
            Widget(f"toggle:{TOGGLES[i]}", settings_row_box(i), f"toggle:{i}") for i in range(MAIN_TOGGLES)
        ]
        for p, name in enumerate(PAGES):
            out.append(Widget(f"page:{name}", settings_row_box(MAIN_TOGGLES + p), f"page:{p}"))
        return out
    if s.screen in PAGE_SCREENS:
        i = MAIN_TOGGLES + PAGE_SCREENS.index(s.screen)
        return [Widget(f"toggle:{TOGGLES[i]}", PAGE_TOGGLE_BOX, f"toggle:{i}")]
    return L1.shop_widgets(s)  # browser, clock: static pages, no widgets


def hit(s: StateV2, point: tuple[float, float]) -> Widget | None:
    return L1.first_hit(widgets(s), point)


def empty_point(s: StateV2) -> tuple[float, float] | None:
    """A point that hits no widget (the status bar never has one)."""
    return L1.free_point(widgets(s), (0.02, 0.5, 0.99))


def is_v2_id(task_id: str) -> bool:
    return task_id.startswith(PREFIX)


def task_page(task: TaskV2) -> int:
    """The sub-page of a toggle task's toggle (-1 for a main-page toggle)."""
    return task.toggle - MAIN_TOGGLES if task.toggle >= MAIN_TOGGLES else -1
