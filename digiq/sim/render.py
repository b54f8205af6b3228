"""Pillow rendering of simulated screens: big flat high-contrast widgets that a tiny VLM can read.

Every screen is a pure function of (state, task, size). Colour and layout carry the meaning (each shop
has its own colour, a toggle that is on paints its whole row green, an added-to-cart button turns
green), text is a bonus. The status bar shows a fixed "12:00" and the toggle icons: no clock, no
animation, so an unchanged state always renders to identical pixels.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw, ImageFont

from digiq.sim import layout as L
from digiq.sim.tasks import ALL_QUERIES, SHOPS, TOGGLES, Task

if TYPE_CHECKING:
    from digiq.sim.v2.layout import StateV2
    from digiq.sim.v2.tasks import TaskV2

SHOP_COLOURS = ((25, 90, 200), (235, 120, 20), (30, 150, 70))
SETTINGS_COLOUR = (100, 104, 116)
BROWSER_COLOUR = (130, 60, 170)
HOME_BG = (20, 30, 48)
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
ON_ROW = (120, 220, 140)
ADDED = (255, 215, 0)  # gold: far from every shop colour, so 'added' is a clear change
# Distinct item swatch colours; 5 consecutive entries are always distinct.
ITEM_PALETTE = (
    (220, 40, 40),
    (40, 40, 220),
    (240, 200, 20),
    (20, 180, 180),
    (200, 40, 200),
    (120, 70, 20),
    (250, 140, 170),
)
VARIANTS = ("Basic", "Pro", "Mini", "Max", "Plus")


@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except Exception:  # noqa: BLE001 - pillow without FreeType: bitmap default font
        return ImageFont.load_default()


def item_name(query: str, i: int) -> str:
    return f"{query.title()} {VARIANTS[i % len(VARIANTS)]}"


def item_colour(query: str, i: int) -> tuple[int, int, int]:
    return ITEM_PALETTE[(zlib.crc32(query.encode()) + i) % len(ITEM_PALETTE)]


def query_colour(query: str) -> tuple[int, int, int]:
    """The search field's swatch colour. By catalogue position, so a query and its decoy (the next query in
    the catalogue) never share a colour and typing the wrong query is a visible change (> eps)."""

    if query in ALL_QUERIES:
        return ITEM_PALETTE[ALL_QUERIES.index(query) % len(ITEM_PALETTE)]
    return item_colour(query, 0)


def item_price(query: str, i: int) -> str:
    return f"${5 + (zlib.crc32(f'{query}:{i}'.encode()) % 90)}.99"


def shown_query(state: L.State | StateV2, task: Task | TaskV2) -> str:
    """The text in the search field: the task's query, its decoy (any wrong text), or nothing."""
    if state.query == L.Q_OK:
        return task.query
    if state.query == L.Q_BAD:
        return task.decoy or "asdf"
    return ""


class _Canvas:
    """Draw in normalised (y0, x0, y1, x1) boxes."""

    def __init__(self, width: int, height: int, bg: tuple[int, int, int]) -> None:
        self.w, self.h = width, height
        self.img = Image.new("RGB", (width, height), bg)
        self.d = ImageDraw.Draw(self.img)
        self.font = _font(max(8, round(height * 0.032)))
        self.big = _font(max(9, round(height * 0.042)))

    def px(self, box: L.Box) -> tuple[int, int, int, int]:
        y0, x0, y1, x1 = box
        return (round(x0 * self.w), round(y0 * self.h), round(x1 * self.w) - 1, round(y1 * self.h) - 1)

    def rect(self, box: L.Box, fill, outline=None, width: int = 1) -> None:
        self.d.rectangle(self.px(box), fill=fill, outline=outline, width=width)

    def text(self, y: float, x: float, s: str, fill=BLACK, big: bool = False) -> None:
        self.d.text((round(x * self.w), round(y * self.h)), s, fill=fill, font=self.big if big else self.font)


def status_bar(c: _Canvas, toggles: tuple[bool, ...], colours: tuple, x0: float, dx: float, w: float) -> None:
    """The clock, the battery and one fixed slot per toggle in ``colours``, drawn only when it is on; slot i
    spans x0 + i dx .. + w."""
    c.rect(L.STATUS_BAR, BLACK)
    c.text(0.006, 0.03, "12:00", WHITE)
    for i, colour in enumerate(colours):
        if toggles[i]:
            c.rect((0.008, x0 + i * dx, 0.037, x0 + i * dx + w), colour)
    c.rect((0.01, 0.93, 0.035, 0.98), (90, 220, 90))  # battery


def _status_bar(c: _Canvas, toggles: tuple[bool, bool, bool]) -> None:
    # wifi (white), bluetooth (blue), airplane (orange).
    status_bar(c, toggles, (WHITE, (80, 140, 255), (255, 160, 40)), 0.62, 0.12, 0.08)


def _header(c: _Canvas, title: str, colour) -> None:
    c.rect(L.HEADER, colour)
    c.text(0.07, 0.05, title, WHITE, big=True)


def _search_bar(c: _Canvas, text: str, placeholder: str, colour, focused: bool) -> None:
    c.rect(L.SEARCH_BAR, WHITE, outline=colour if focused else (150, 150, 150), width=4 if focused else 2)
    if text:
        c.text(0.19, 0.09, text, BLACK)
    else:
        c.text(0.19, 0.09, placeholder, (150, 150, 150))


def _keyboard(c: _Canvas) -> None:
    c.rect(L.KEYBOARD, (205, 210, 218))
    for r in range(3):
        for k in range(8):
            y0, x0 = 0.645 + r * 0.08, 0.03 + k * 0.12
            c.rect((y0, x0, y0 + 0.065, x0 + 0.1), WHITE)
    c.rect((0.89, 0.2, 0.98, 0.68), WHITE)  # space bar (decoration: only TYPE actions type)
    c.rect(L.ENTER_KEY, (30, 110, 230))
    c.text(0.915, 0.78, "Go", WHITE, big=True)


def draw_shop(
    c: _Canvas,
    s: L.State | StateV2,
    name: str,
    colour: tuple[int, int, int],
    query: str,
    swatch: Callable[[str], tuple[int, int, int]],
    order: Sequence[int],
) -> None:
    """A shop screen (shop, search, results or product; v2 shares them) of the shop ``name`` in ``colour``,
    ``query`` in the search field. ``swatch`` colours a typed query; ``order[i]`` is the product variant at
    position i of the results list (v1: position i is variant i)."""
    _header(c, name, colour)
    if s.screen == L.SHOP:
        _search_bar(c, "", f"Search {name}", colour, focused=False)
        light = tuple(min(255, v + 120) for v in colour)
        c.rect(L.BANNER, light)
        c.text(0.33, 0.1, "Deals of the day", BLACK, big=True)
    elif s.screen == L.SEARCH:
        _search_bar(c, query, f"Search {name}", colour, focused=True)
        if query:
            c.rect(L.SUGGESTION, (255, 240, 170), outline=(200, 180, 80), width=2)
            # A swatch coloured by the query: typing a different query is a visible change, not 8 px of text.
            c.rect((L.SUGGESTION[0] + 0.02, 0.08, L.SUGGESTION[2] - 0.02, 0.28), swatch(query))
            c.text(0.30, 0.32, query, BLACK)
        _keyboard(c)
    elif s.screen == L.RESULTS:
        _search_bar(c, query, "", colour, focused=False)
        for row in range(L.VISIBLE_RESULTS):
            i = order[s.scroll + row]
            box = L.result_box(row)
            c.rect(box, (245, 245, 245), outline=(180, 180, 180), width=2)
            c.rect((box[0] + 0.02, 0.07, box[2] - 0.02, 0.3), item_colour(query, i))
            c.text(box[0] + 0.03, 0.34, item_name(query, i), BLACK)
            c.text(box[0] + 0.09, 0.34, item_price(query, i), (200, 30, 30))
        # scroll bar: where the visible window sits in the list
        frac0 = s.scroll / L.NUM_RESULTS
        frac1 = (s.scroll + L.VISIBLE_RESULTS) / L.NUM_RESULTS
        c.rect((0.28 + 0.58 * frac0, 0.975, 0.28 + 0.58 * frac1, 0.995), (90, 90, 90))
        c.text(0.89, 0.05, f"{s.scroll + 1}-{s.scroll + L.VISIBLE_RESULTS} of {L.NUM_RESULTS}", (90, 90, 90))
    else:
        i = order[s.item]
        c.rect(L.PRODUCT_IMAGE, item_colour(query, i))
        c.text(0.47, 0.08, item_name(query, i), BLACK, big=True)
        c.text(0.54, 0.08, item_price(query, i), (200, 30, 30), big=True)
        if s.added:
            c.rect(L.ADD_TO_CART, ADDED)
            c.text(0.655, 0.2, "Added to cart", BLACK, big=True)
            c.rect((0.76, 0.08, 0.84, 0.92), (40, 40, 40))
            c.text(0.785, 0.14, "1 item in cart", WHITE)
        else:
            c.rect(L.ADD_TO_CART, colour)
            c.text(0.655, 0.25, "Add to cart", WHITE, big=True)


def render_state(state: L.State, task: Task, width: int, height: int) -> Image.Image:
    """The RGB screenshot of ``state`` (portrait ``width`` x ``height``)."""
    s = state
    if s.screen == L.HOME:
        c = _Canvas(width, height, HOME_BG)
        colours = [*SHOP_COLOURS, SETTINGS_COLOUR, BROWSER_COLOUR]
        names = [name for name, _ in SHOPS] + ["Settings", "Browser"]
        for i, (colour, name) in enumerate(zip(colours, names)):
            box = L.home_icon_box(i)
            c.rect(box, colour, outline=WHITE, width=2)
            c.text(box[2] - 0.045, box[1] + 0.02, name, WHITE)
        c.rect((0.8, 0.08, 0.86, 0.92), (60, 70, 90))  # dock (decoration)
    elif s.screen in (L.SHOP, L.SEARCH, L.RESULTS, L.PRODUCT):
        colour = SHOP_COLOURS[s.shop]
        name = SHOPS[s.shop][0]
        c = _Canvas(width, height, WHITE)
        draw_shop(c, s, name, colour, shown_query(s, task), query_colour, range(L.NUM_RESULTS))
    elif s.screen == L.SETTINGS:
        c = _Canvas(width, height, (236, 238, 242))
        _header(c, "Settings", SETTINGS_COLOUR)
        for i, name in enumerate(TOGGLES):
            box = L.toggle_box(i)
            on = s.toggles[i]
            c.rect(box, ON_ROW if on else WHITE, outline=(160, 160, 160), width=2)
            c.text(box[0] + 0.035, 0.08, name.capitalize(), BLACK)
            knob = (box[0] + 0.025, 0.72, box[2] - 0.025, 0.92)
            c.rect(knob, (30, 140, 60) if on else (170, 170, 170))
            c.text(box[0] + 0.035, 0.76, "ON" if on else "OFF", WHITE)
    else:  # browser: a static start page
        c = _Canvas(width, height, WHITE)
        c.rect((0.045, 0.0, 0.13, 1.0), (235, 235, 240))
        c.rect((0.06, 0.04, 0.115, 0.96), WHITE, outline=(170, 170, 170))
        c.text(0.072, 0.08, "google.com", (60, 60, 60))
        c.rect((0.25, 0.2, 0.35, 0.8), BROWSER_COLOUR)
        c.text(0.28, 0.3, "Browser", WHITE, big=True)
    _status_bar(c, s.toggles)
    return c.img
