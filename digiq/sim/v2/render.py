"""Pillow rendering of v2 screens, in v1's style (:mod:`digiq.sim.render`: its canvas, header, search bar,
keyboard, item colours and prices), with text on every icon, row and result so the screen can be read.

A screen is a pure function of (state, task, episode layout, size). :func:`render_key` names what is
visible, so screens that look alike in two episodes are rendered once.
"""

from __future__ import annotations

import re

from PIL import Image

from digiq.sim import render as R1
from digiq.sim.v2 import layout as L
from digiq.sim.v2.tasks import ALL_QUERIES, APPS, MAIN_TOGGLES, PAGES, SITES, TOGGLES, TaskV2

SHOP_COLOURS = (*R1.SHOP_COLOURS, (200, 40, 60), (20, 130, 140), (150, 100, 20))
APP_COLOURS = (*SHOP_COLOURS, R1.SETTINGS_COLOUR, R1.BROWSER_COLOUR, (45, 45, 45))
# Status-bar slots of the main-page toggles (wifi, bluetooth, airplane mode, location), drawn when on.
_STATUS_COLOURS = (R1.WHITE, (80, 140, 255), (255, 160, 40), (240, 80, 80))


def item_name(query: str, variant: int) -> str:
    return R1.item_name(query, variant)


def query_colour(query: str) -> tuple[int, int, int]:
    """By catalogue position: a query and its decoy (the next query of its group) never share a colour. Text
    that is no catalogue query (typed on a task without one) is drawn grey."""
    if query not in ALL_QUERIES:
        return (150, 150, 150)
    return R1.ITEM_PALETTE[ALL_QUERIES.index(query) % len(R1.ITEM_PALETTE)]


shown_query = R1.shown_query


def render_key(s: L.StateV2, task: TaskV2) -> str:
    """Everything the screenshot shows (the seed only through the part of the layout that is on screen)."""
    ep = L.episode(s.task_id, s.seed)
    shown = ""
    if s.screen == L.HOME:
        shown = ",".join(map(str, ep.app_order))
    elif s.screen in (L.RESULTS, L.PRODUCT):
        shown = ",".join(map(str, ep.result_order))
    text = shown_query(s, task) if s.shop >= 0 else ""
    return f"{s.abstract_key}|{text}|{shown}"


def _label_lines(name: str) -> list[str]:
    """CamelCase names on two lines ("Mega" / "Basket"), so a 3-column grid fits them at 180 px."""
    return re.findall(r"[A-Z][a-z]*", name) or [name]


def _status_bar(c: R1._Canvas, toggles: tuple[bool, ...]) -> None:
    R1.status_bar(c, toggles, _STATUS_COLOURS, 0.5, 0.1, 0.07)


def _toggle_row(c: R1._Canvas, box: L.Box, name: str, on: bool) -> None:
    c.rect(box, R1.ON_ROW if on else R1.WHITE, outline=(160, 160, 160), width=2)
    c.text(box[0] + 0.03, 0.08, name[0].upper() + name[1:], R1.BLACK)
    knob = (box[0] + 0.02, 0.72, box[2] - 0.02, 0.92)
    c.rect(knob, (30, 140, 60) if on else (170, 170, 170))
    c.text(box[0] + 0.03, 0.76, "ON" if on else "OFF", R1.WHITE)


def render_state(s: L.StateV2, task: TaskV2, width: int, height: int) -> Image.Image:
    """The RGB screenshot of ``s`` (portrait ``width`` x ``height``)."""
    ep = L.episode(s.task_id, s.seed)
    if s.screen == L.HOME:
        c = R1._Canvas(width, height, R1.HOME_BG)
        small = R1._font(max(7, round(height * 0.028)))
        for slot, app in enumerate(ep.app_order):
            box = L.home_slot_box(slot)
            c.rect(box, APP_COLOURS[app], outline=R1.WHITE, width=2)
            lines = _label_lines(APPS[app])
            for k, line in enumerate(lines):
                y = box[0] + 0.03 + k * 0.04
                c.d.text((round((box[1] + 0.02) * c.w), round(y * c.h)), line, fill=R1.WHITE, font=small)
        c.rect((0.8, 0.08, 0.86, 0.92), (60, 70, 90))  # dock (decoration)
    elif s.screen in (L.SHOP, L.SEARCH, L.RESULTS, L.PRODUCT):
        colour = SHOP_COLOURS[s.shop]
        name = SITES[s.shop][0]
        c = R1._Canvas(width, height, R1.WHITE)
        R1.draw_shop(c, s, name, colour, shown_query(s, task), query_colour, ep.result_order)
    elif s.screen == L.SETTINGS:
        c = R1._Canvas(width, height, (236, 238, 242))
        R1._header(c, "Settings", R1.SETTINGS_COLOUR)
        for i in range(MAIN_TOGGLES):
            _toggle_row(c, L.settings_row_box(i), TOGGLES[i], s.toggles[i])
        for p, name in enumerate(PAGES):
            box = L.settings_row_box(MAIN_TOGGLES + p)
            c.rect(box, (225, 230, 240), outline=(160, 160, 160), width=2)
            c.text(box[0] + 0.03, 0.08, name, R1.BLACK)
            c.text(box[0] + 0.03, 0.86, ">", (90, 90, 90), big=True)
    elif s.screen in L.PAGE_SCREENS:
        p = L.PAGE_SCREENS.index(s.screen)
        c = R1._Canvas(width, height, (236, 238, 242))
        R1._header(c, f"< {PAGES[p]}", R1.SETTINGS_COLOUR)
        i = MAIN_TOGGLES + p
        _toggle_row(c, L.PAGE_TOGGLE_BOX, TOGGLES[i], s.toggles[i])
    elif s.screen == L.CLOCK:
        c = R1._Canvas(width, height, (30, 30, 36))
        R1._header(c, "Clock", APP_COLOURS[-1])
        c.text(0.3, 0.25, "12:00", R1.WHITE, big=True)
        c.rect((0.4, 0.2, 0.6, 0.8), (70, 70, 80))
    else:  # browser: a static start page
        c = R1._Canvas(width, height, R1.WHITE)
        c.rect((0.045, 0.0, 0.13, 1.0), (235, 235, 240))
        c.rect((0.06, 0.04, 0.115, 0.96), R1.WHITE, outline=(170, 170, 170))
        c.text(0.072, 0.08, "google.com", (60, 60, 60))
        c.rect((0.25, 0.2, 0.35, 0.8), R1.BROWSER_COLOUR)
        c.text(0.28, 0.3, "Browser", R1.WHITE, big=True)
    _status_bar(c, s.toggles)
    return c.img
