"""An endless stream of randomised GUI screens and screen-reading questions, for ``digiq pretrain-vlm``.

The paper's models start from VLMs that already read screens (LLaVA-1.5 for the critic's features, AutoUI
for the policy; Digi-Q, arXiv:2502.15760, Sec. 5). Our tiny VLMs start from random weights, so we pretrain
them on *general* screen reading, drawn with the simulator's renderer (same fonts, colours and widget
styles) but with everything randomised: which screen, how many widgets, where and how big, their labels
(made-up words as well as real ones), colours, list contents, text-field contents, toggle values.

Skills (each a question in the chat template with a short text answer):

* ``ground``:  'Where is "Blorp"?' / a policy-style 'Goal: Tap "Blorp"' -> ``tap y x`` (the widget's centre);
* ``refer``:   'What is at 0.42 0.61?' (or the point drawn as the overlay cursor) -> the label or ``nothing``;
* ``read``:    the title, or the search field's text;
* ``state``:   'Is <toggle> on?' on a settings-like screen -> ``yes`` / ``no``;
* ``screen``:  the kind of screen (home, list, search, settings, product, browser);
* ``parse``:   the site, the quoted query or the toggle and value of an AitW-style goal of made-up words;
* ``type``:    'Goal: Type "<text>"' on a search screen -> ``type <text>`` (copying unseen text).
* ``match``:   which home-screen app a goal's site names ('Go to blorfzap.com, ...' -> ``BlorfZap``, or with
  the overlay cursor on an app: is it that app? -> ``yes`` / ``no``), and whether a typed text is the goal's
  quoted query (ignoring case) -> ``yes`` / ``no``. Reading and comparing, the pieces a critic needs to
  tell a candidate that serves the goal from one that does not; never a step of a task.
* ``grid`` (in ``GRID_SKILLS``, weight 0 unless a config asks): a full 3 x 3 app grid drawn as benchmark v2's
  home screen is (its slots, font, two-line CamelCase labels, dock), the tiles in random order, and a goal
  naming one made-up app ('Tap "Blorf Zap"', 'Open the BlorfZap app', 'Go to blorfzap.com, ...') -> ``tap y
  x`` (the tile's centre): binding a goal's name to the tile that shows it. v2's own apps appear only as
  distractor tiles, never in the text, so no v2 goal (train, val or test) or its first action is in it.
* ``grid_colour`` (in ``GRID_SKILLS``, weight 0 unless a config asks): the same grid with 9 distinct named
  colours (``GRID_COLOURS``) and made-up labels, and a goal naming a colour ('Tap the teal tile') -> ``tap y
  x``: the pointer from a goal's word to the tile, on a cue 16 image tokens carry. Colours only, never an
  app, site or goal of v2.

What it never contains: the simulator's task solutions. No question is about a catalogue task, no answer is
a next action of a task, a success, a screen-change or a value label; the goal sites and queries are made-up
words, never the catalogue's (tests/test_pretrain.py checks both). The module reads the renderer and the
catalogue's *names* only (to exclude them from the made-up words), never the device's dynamics.
"""

from __future__ import annotations

import dataclasses
import random

from PIL import Image

from digiq.actions import Action
from digiq.config import check
from digiq.models.prompts import render_image
from digiq.sim import render as R
from digiq.sim.layout import Box, inside
from digiq.sim.tasks import ALL_QUERIES, SHOPS, TOGGLES
from digiq.sim.v2.layout import home_slot_box as v2_home_slot_box
from digiq.sim.v2.render import APP_COLOURS as V2_APP_COLOURS
from digiq.sim.v2.render import _label_lines as v2_label_lines
from digiq.sim.v2.tasks import APPS as V2_APPS

SKILLS = ("ground", "refer", "read", "state", "screen", "parse", "type", "match")
# Skills outside SKILLS: existing tests and evaluations iterate SKILLS, and these are opt-in.
GRID_SKILLS = ("grid", "grid_colour")
SCREEN_KINDS = ("home", "list", "search", "settings", "product", "browser")

_SYLLABLES = (
    "ba be bi bo bu da de di do du fa fe fi fo ga ge go ka ke ki ko ku la le li lo lu ma me mi mo mu na ne "
    "ni no nu pa pe pi po ra re ri ro ru sa se si so ta te ti to tu va ve vi vo za ze zi zo bra dri flo gro "
    "kli pra sta tri zor mex quo wyn"
).split()
# Common words of real apps and shops (not the catalogue's queries, see _CATALOGUE_WORDS).
_WORDS = (
    "camera photos music video maps mail notes clock weather calendar news games books radio chat wallet "
    "fitness travel food taxi bank shop store market cloud files scan print backup sound display battery "
    "location privacy storage apps account language update keyboard brightness hotspot sync vpn nfc "
    "lamp chair table pillow blanket mug kettle knife spoon fork plate towel soap brush comb mirror jacket "
    "scarf gloves socks hat belt wallet watch ring bag tent rope torch map compass drill hammer saw tape "
    "glue paper pencil marker eraser stapler folder charger headset cable router tablet stand tripod"
).split()
_CATALOGUE_WORDS = (
    {w for q in ALL_QUERIES for w in q.split()} | {s for _, s in SHOPS} | {a.lower() for a, _ in SHOPS}
)
_PALETTE = (
    (25, 90, 200), (235, 120, 20), (30, 150, 70), (100, 104, 116), (130, 60, 170), (200, 40, 60),
    (20, 140, 150), (160, 110, 20), (60, 60, 60), (210, 70, 150),
)  # fmt: skip
_BUTTONS = ("Add to cart", "Buy now", "Save", "Share", "Follow", "Subscribe", "Install", "Open", "Play")


@dataclasses.dataclass
class Element:
    label: str
    box: Box


@dataclasses.dataclass
class Screen:
    image: Image.Image
    kind: str
    title: str
    field: str = ""  # the search field's text ("" = empty or none)
    elements: list[Element] = dataclasses.field(default_factory=list)
    toggles: dict[str, bool] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Sample:
    image: Image.Image
    question: str
    answer: str
    skill: str
    box: Box | None = None  # ground: the target widget (a predicted point inside it is correct)


def made_up_word(rng: random.Random) -> str:
    """A pronounceable word that is not one of the catalogue's query words or shop names."""
    while True:
        w = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3)))
        if w not in _CATALOGUE_WORDS:
            return w


def word(rng: random.Random, p_made_up: float = 0.5) -> str:
    return made_up_word(rng) if rng.random() < p_made_up else rng.choice(_WORDS)


def phrase(rng: random.Random, max_words: int = 2) -> str:
    """One or two words; never a catalogue query (so a pretrained model never saw a task's query)."""
    while True:
        p = " ".join(word(rng) for _ in range(rng.randint(1, max_words)))
        if p not in ALL_QUERIES:
            return p


def _distinct(rng: random.Random, n: int, make) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        w = make(rng)
        if w.lower() not in {o.lower() for o in out}:
            out.append(w)
    return out


def _colour(rng: random.Random) -> tuple[int, int, int]:
    base = rng.choice(_PALETTE)
    return tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in base)  # type: ignore[return-value]


def _toggle_bits(rng: random.Random) -> tuple[bool, bool, bool]:
    return tuple(rng.random() < 0.5 for _ in range(3))  # type: ignore[return-value]


def _home(c: R._Canvas, rng: random.Random, name=lambda r: word(r).title()) -> Screen:
    c.img.paste(_colour(rng) if rng.random() < 0.3 else R.HOME_BG, (0, 0, c.w, c.h))
    cols, rows = rng.randint(2, 3), rng.randint(2, 4)
    names = _distinct(rng, cols * rows, name)
    keep = rng.randint(max(2, len(names) // 2), len(names))
    slots = sorted(rng.sample(range(cols * rows), keep))
    cw, rh = 0.9 / cols, 0.7 / rows
    iw, ih = cw * rng.uniform(0.6, 0.85), rh * rng.uniform(0.6, 0.8)
    els = []
    for s in slots:
        r, k = divmod(s, cols)
        y0, x0 = 0.09 + r * rh + (rh - ih) / 2, 0.05 + k * cw + (cw - iw) / 2
        box = (y0, x0, y0 + ih, x0 + iw)
        c.rect(box, _colour(rng), outline=R.WHITE, width=2)
        c.text(box[2] - 0.045, box[1] + 0.02, names[s], R.WHITE)
        els.append(Element(names[s], box))
    return Screen(c.img, "home", "", elements=els)


def _list(c: R._Canvas, rng: random.Random) -> Screen:
    title, field = word(rng).title(), phrase(rng)
    R._header(c, title, _colour(rng))
    R._search_bar(c, field, "", _colour(rng), focused=False)
    n = rng.randint(2, 4)
    h = rng.uniform(0.13, 0.19)
    names = _distinct(rng, n, lambda r: f"{phrase(r).title()}")
    els = [Element("search field", (0.165, 0.05, 0.25, 0.95))]
    for i in range(n):
        y0 = 0.28 + i * (h + 0.02)
        box = (y0, 0.04, y0 + h, 0.96)
        c.rect(box, (245, 245, 245), outline=(180, 180, 180), width=2)
        c.rect((box[0] + 0.02, 0.07, box[2] - 0.02, 0.3), _colour(rng))
        c.text(box[0] + 0.03, 0.34, names[i], R.BLACK)
        c.text(box[0] + 0.08, 0.34, f"${rng.randint(1, 99)}.99", (200, 30, 30))
        els.append(Element(names[i], box))
    return Screen(c.img, "list", title, field, els)


def _search(c: R._Canvas, rng: random.Random) -> Screen:
    title = word(rng).title()
    colour = _colour(rng)
    R._header(c, title, colour)
    field = phrase(rng) if rng.random() < 0.7 else ""
    R._search_bar(c, field, f"Search {title}", colour, focused=True)
    els = [Element("search field", (0.165, 0.05, 0.25, 0.95)), Element("Go", (0.89, 0.72, 0.98, 0.97))]
    if field:
        box = (0.265, 0.05, 0.37, 0.95)
        c.rect(box, (255, 240, 170), outline=(200, 180, 80), width=2)
        c.rect((box[0] + 0.02, 0.08, box[2] - 0.02, 0.28), _colour(rng))
        c.text(0.30, 0.32, field, R.BLACK)
        els.append(Element(field, box))
    R._keyboard(c)
    return Screen(c.img, "search", title, field, els)


def _settings(c: R._Canvas, rng: random.Random) -> Screen:
    c.img.paste((236, 238, 242), (0, 0, c.w, c.h))
    title = rng.choice(("Settings", "Options", "Preferences", word(rng).title()))
    R._header(c, title, _colour(rng))
    n = rng.randint(2, 5)
    names = _distinct(rng, n, lambda r: r.choice(TOGGLES) if r.random() < 0.3 else word(r))
    h = rng.uniform(0.09, 0.12)
    els, toggles = [], {}
    for i, name in enumerate(names):
        y0 = 0.17 + i * (h + 0.02)
        box = (y0, 0.04, y0 + h, 0.96)
        on = rng.random() < 0.5
        c.rect(box, R.ON_ROW if on else R.WHITE, outline=(160, 160, 160), width=2)
        c.text(box[0] + 0.03, 0.08, name.capitalize(), R.BLACK)
        c.rect((box[0] + 0.02, 0.72, box[2] - 0.02, 0.92), (30, 140, 60) if on else (170, 170, 170))
        c.text(box[0] + 0.03, 0.76, "ON" if on else "OFF", R.WHITE)
        els.append(Element(name.capitalize(), box))
        toggles[name] = on
    return Screen(c.img, "settings", title, elements=els, toggles=toggles)


def _product(c: R._Canvas, rng: random.Random) -> Screen:
    title = word(rng).title()
    colour = _colour(rng)
    R._header(c, title, colour)
    c.rect((0.17, rng.uniform(0.1, 0.2), 0.44, rng.uniform(0.8, 0.9)), _colour(rng))
    name = phrase(rng).title()
    c.text(0.47, 0.08, name, R.BLACK, big=True)
    c.text(0.54, 0.08, f"${rng.randint(1, 99)}.99", (200, 30, 30), big=True)
    label = rng.choice(_BUTTONS)
    y0 = rng.uniform(0.6, 0.75)
    box = (y0, 0.08, y0 + 0.1, 0.92)
    c.rect(box, colour)
    c.text(y0 + 0.035, 0.25, label, R.WHITE, big=True)
    return Screen(c.img, "product", title, elements=[Element(label, box)])


def _browser(c: R._Canvas, rng: random.Random) -> Screen:
    site = f"{made_up_word(rng)}.{rng.choice(('com', 'org', 'net'))}"
    c.rect((0.045, 0.0, 0.13, 1.0), (235, 235, 240))
    c.rect((0.06, 0.04, 0.115, 0.96), R.WHITE, outline=(170, 170, 170))
    c.text(0.072, 0.08, site, (60, 60, 60))
    label = word(rng).title()
    y0, x0 = rng.uniform(0.2, 0.6), rng.uniform(0.05, 0.4)
    box = (y0, x0, y0 + 0.1, x0 + 0.5)
    c.rect(box, _colour(rng))
    c.text(y0 + 0.03, x0 + 0.05, label, R.WHITE, big=True)
    return Screen(
        c.img,
        "browser",
        site,
        elements=[Element("address bar", (0.06, 0.04, 0.115, 0.96)), Element(label, box)],
    )


_MAKERS = {
    "home": _home,
    "list": _list,
    "search": _search,
    "settings": _settings,
    "product": _product,
    "browser": _browser,
}


def random_screen(rng: random.Random, width: int = 180, height: int = 320, kind: str | None = None) -> Screen:
    """One randomised screen (portrait ``width`` x ``height``) with its widgets and their labels."""
    kind = kind or rng.choice(SCREEN_KINDS)
    return _draw(rng, width, height, _MAKERS[kind])


def _draw(rng: random.Random, width: int, height: int, make) -> Screen:
    """A blank screen drawn by ``make(canvas, rng)``, then the status bar."""
    c = R._Canvas(width, height, R.WHITE)
    screen = make(c, rng)
    R._status_bar(c, _toggle_bits(rng))
    return screen


def _pt(y: float, x: float) -> str:
    return f"{y:.2f} {x:.2f}"


def _centre(box: Box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def _hit(screen: Screen, y: float, x: float) -> Element | None:
    for e in screen.elements:
        if inside((y, x), e.box):
            return e
    return None


def make_sample(
    rng: random.Random, skill: str, width: int = 180, height: int = 320, grid_colour_tiles: int = 9
) -> Sample:
    """One question of ``skill`` on a fresh random screen (``grid_colour_tiles``: how many tiles of a
    ``grid_colour`` screen carry a named colour)."""
    if skill == "ground":
        s = random_screen(rng, width, height)
        e = rng.choice(s.elements)
        y, x = _centre(e.box)
        q = (
            f'Goal: Tap "{e.label}"\nPrevious: none\nAction:'
            if rng.random() < 0.5
            else f'Where is "{e.label}"?'
        )
        return Sample(s.image, q, f"tap {_pt(y, x)}", skill, e.box)
    if skill == "refer":
        s = random_screen(rng, width, height)
        if rng.random() < 0.6:
            y, x = _inner_point(rng, rng.choice(s.elements).box)
        else:
            y, x = rng.uniform(0.05, 0.98), rng.uniform(0.02, 0.98)
        hit = _hit(s, y, x)
        answer = hit.label if hit is not None else "nothing"
        if rng.random() < 0.5:  # the point drawn on the screen, as the critic's overlay rendering draws taps
            img = render_image(s.image, Action.tap(y, x), "overlay")
            return Sample(img, "What is under the cursor?", answer, skill)
        return Sample(s.image, f"What is at {_pt(y, x)}?", answer, skill)
    if skill == "read":
        if rng.random() < 0.5:
            s = random_screen(rng, width, height, rng.choice(("list", "search")))
            return Sample(s.image, "What is in the search field?", s.field or "empty", skill)
        s = random_screen(
            rng, width, height, rng.choice(("list", "search", "settings", "product", "browser"))
        )
        return Sample(s.image, "What is the title?", s.title, skill)
    if skill == "state":
        s = random_screen(rng, width, height, "settings")
        name = rng.choice(list(s.toggles))
        return Sample(s.image, f"Is {name} on?", "yes" if s.toggles[name] else "no", skill)
    if skill == "screen":
        s = random_screen(rng, width, height)
        return Sample(s.image, "What screen is this?", s.kind, skill)
    if skill == "parse":
        s = random_screen(rng, width, height)
        if rng.random() < 0.3:
            name, on = rng.choice((*TOGGLES, word(rng))), rng.random() < 0.5
            goal = f"Turn {'on' if on else 'off'} {name}"
            return Sample(s.image, f"Goal: {goal}\nWhich setting?", f"{name} {'on' if on else 'off'}", skill)
        site, query = f"{made_up_word(rng)}.com", phrase(rng)
        goal = _shop_goal(site, query, rng.choice(_SHOP_TAILS))
        if rng.random() < 0.5:
            return Sample(s.image, f"Goal: {goal}\nWhich site?", site, skill)
        return Sample(s.image, f"Goal: {goal}\nWhich query?", query, skill)
    if skill == "type":
        s = random_screen(rng, width, height, "search")
        text = phrase(rng)
        return Sample(s.image, f'Goal: Type "{text}"\nPrevious: none\nAction:', f"type {text}", skill)
    if skill == "match":
        return _match_sample(rng, width, height)
    if skill == "grid":
        return _grid_sample(rng, width, height)
    if skill == "grid_colour":
        return _grid_colour_sample(rng, width, height, grid_colour_tiles)
    raise ValueError(f"unknown pretraining skill {skill!r}; expected one of {SKILLS + GRID_SKILLS}")


# What may follow the query in an AitW-style shopping goal.
_SHOP_TAILS = ("", ", and select the first entry", ", select the first entry, and add it to the cart")


def _shop_goal(site: str, query: str, tail: str) -> str:
    return f'Go to {site}, search for "{query}"{tail}'


def _app_name(rng: random.Random) -> str:
    """One or two title-cased words run together, as apps named after their site are (never a catalogue
    shop, whose names are refused)."""
    while True:
        name = "".join(word(rng).title() for _ in range(rng.randint(1, 2)))
        if name.lower() not in _CATALOGUE_WORDS:
            return name


def _inner_point(rng: random.Random, box: Box) -> tuple[float, float]:
    h, w = box[2] - box[0], box[3] - box[1]
    return rng.uniform(box[0] + 0.2 * h, box[2] - 0.2 * h), rng.uniform(box[1] + 0.2 * w, box[3] - 0.2 * w)


def _match_sample(rng: random.Random, width: int, height: int) -> Sample:
    tail = rng.choice(_SHOP_TAILS)
    if rng.random() < 0.3:  # is a typed text the goal's query? (matching ignores case, as a search box does)
        s = random_screen(rng, width, height, "search")
        query = phrase(rng)
        goal = _shop_goal(f"{made_up_word(rng)}.com", query, tail)
        kind = rng.random()
        if kind < 0.5:
            typed = rng.choice((query, query.upper(), query.title(), query.capitalize()))
        elif kind < 0.75:
            typed = phrase(rng)
        else:  # near misses: a word of it, or one word more
            words = query.split()
            typed = rng.choice(words) if len(words) > 1 else f"{query} {word(rng)}"
        answer = "yes" if typed.lower() == query.lower() else "no"
        return Sample(s.image, f'Goal: {goal}\nTyped: "{typed}"\nIs this the query?', answer, "match")
    s = _draw(rng, width, height, lambda c, r: _home(c, r, _app_name))
    target = rng.choice(s.elements)
    goal = _shop_goal(f"{target.label.lower()}.com", phrase(rng), tail)
    if rng.random() < 0.5:
        return Sample(s.image, f"Goal: {goal}\nWhich app opens the site?", target.label, "match")
    e = target if rng.random() < 0.5 else rng.choice(s.elements)
    img = render_image(s.image, Action.tap(*_inner_point(rng, e.box)), "overlay")
    answer = "yes" if e is target else "no"
    return Sample(img, f"Goal: {goal}\nIs the cursor on the app that opens the site?", answer, "match")


# v2's home-screen apps, lower case: never a grid target nor in a grid question (they are distractor tiles).
_V2_APP_WORDS = {a.lower() for a in V2_APPS}


def _grid_app_name(rng: random.Random) -> str:
    """A made-up app name for the grid skill: never a catalogue shop (v1's or v2's) nor a v2 app."""
    while True:
        name = _app_name(rng)
        if name.lower() not in _V2_APP_WORDS:
            return name


def grid_screen(rng: random.Random, width: int = 180, height: int = 320) -> tuple[Screen, list[str]]:
    """A v2-like home grid: 9 tiles in random order, some of them v2's apps in their own colours, the rest
    (at least one) made-up apps in random ones; returns the screen and the made-up names."""
    n_v2 = rng.randint(0, 8)
    v2 = rng.sample(range(len(V2_APPS)), n_v2)
    made = _distinct(rng, 9 - n_v2, _grid_app_name)
    tiles = [(V2_APPS[a], V2_APP_COLOURS[a]) for a in v2] + [(m, rng.choice(V2_APP_COLOURS)) for m in made]
    rng.shuffle(tiles)
    return _grid_drawing(rng, width, height, tiles), made


def _grid_drawing(
    rng: random.Random, width: int, height: int, tiles: list[tuple[str, tuple[int, int, int]]]
) -> Screen:
    """v2's home screen (digiq/sim/v2/render.py) with ``tiles`` (label, fill) in slot order; draws nothing
    from ``rng`` but the status bar's toggles."""

    def draw(c: R._Canvas, r: random.Random) -> Screen:
        c.img.paste(R.HOME_BG, (0, 0, c.w, c.h))
        small = R._font(max(7, round(c.h * 0.028)))  # v2's label font (digiq/sim/v2/render.py)
        els = []
        for slot, (name, colour) in enumerate(tiles):
            box = v2_home_slot_box(slot)
            c.rect(box, colour, outline=R.WHITE, width=2)
            for k, line in enumerate(v2_label_lines(name)):
                y = box[0] + 0.03 + k * 0.04
                c.d.text((round((box[1] + 0.02) * c.w), round(y * c.h)), line, fill=R.WHITE, font=small)
            els.append(Element(name, box))
        c.rect((0.8, 0.08, 0.86, 0.92), (60, 70, 90))  # v2's dock (decoration)
        return Screen(c.img, "home", "", elements=els)

    return _draw(rng, width, height, draw)


def _grid_sample(rng: random.Random, width: int, height: int) -> Sample:
    """A goal naming one made-up app of :func:`grid_screen` -> a tap on its tile's centre."""
    s, made = grid_screen(rng, width, height)
    target = rng.choice([e for e in s.elements if e.label in made])
    form = rng.random()
    if form < 0.4:  # the label as the tile shows it, as the probe of the home grid asks
        goal = f'Tap "{" ".join(v2_label_lines(target.label))}"'
    elif form < 0.7:
        goal = f"Open the {target.label} app"
    else:
        goal = _shop_goal(f"{target.label.lower()}.com", phrase(rng), rng.choice(_SHOP_TAILS))
    y, x = _centre(target.box)
    return Sample(s.image, f"Goal: {goal}\nPrevious: none\nAction:", f"tap {_pt(y, x)}", "grid", target.box)


# Named tile colours of the grid_colour skill, each at least 72 apart in RGB from every other (jittered by at
# most 12 per channel when drawn, so two names never meet). Several sit on v2's app colours (so the colour a
# goal names is one the frozen image tokens already separate on v2's home screen); none is a v2 app's name.
GRID_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 40, 55), "orange": (240, 125, 20), "yellow": (230, 200, 30), "lime": (150, 215, 60),
    "green": (30, 150, 70), "teal": (20, 130, 140), "cyan": (60, 200, 235), "blue": (25, 90, 200),
    "navy": (20, 30, 120), "purple": (130, 60, 170), "pink": (235, 110, 180), "brown": (150, 100, 20),
    "grey": (100, 104, 116), "black": (40, 40, 40),
}  # fmt: skip
_GRID_COLOUR_JITTER = 12
# The uncoloured tiles' fill when a grid_colour screen colours fewer than 9: a beige at least 97 from every
# named colour (and far from the background), never named in a goal.
GRID_NEUTRAL = (215, 205, 185)
# The goal's forms: a colour word is the only cue (the labels are illegible at 128 px).
_GRID_COLOUR_GOALS = ("Tap the {} tile", "Open the {} app", "Tap the {} icon")


def grid_colour_screen(
    rng: random.Random, width: int = 180, height: int = 320, coloured: int = 9
) -> tuple[Screen, list[str]]:
    """A v2-like home grid whose tiles have distinct named colours (of :data:`GRID_COLOURS`) and made-up app
    labels; returns the screen and each slot's colour name. ``coloured`` < 9 colours that many random slots
    and draws the rest in :data:`GRID_NEUTRAL` (named ``""``: never in a goal), an easier stage of the
    skill; 9 draws exactly what it always drew."""
    check_grid_colour_tiles(coloured)
    names = rng.sample(sorted(GRID_COLOURS), coloured)
    if coloured < 9:
        slots = rng.sample(range(9), coloured)
        by_slot = dict(zip(slots, names))
        names = [by_slot.get(slot, "") for slot in range(9)]
    labels = _distinct(rng, 9, _grid_app_name)
    j = _GRID_COLOUR_JITTER
    tiles = [
        (
            label,
            tuple(max(0, min(255, v + rng.randint(-j, j))) for v in GRID_COLOURS[n]) if n else GRID_NEUTRAL,
        )
        for label, n in zip(labels, names)
    ]
    return _grid_drawing(rng, width, height, tiles), names  # type: ignore[arg-type]


def check_grid_colour_tiles(coloured: int) -> None:
    """Refuse a number of coloured tiles outside [2, 9] (1 would need no colour word at all)."""
    ok = isinstance(coloured, int) and not isinstance(coloured, bool) and 2 <= coloured <= 9
    check(ok, f"grid_colour_tiles must be an integer in [2, 9], got {coloured!r}")


def _grid_colour_sample(rng: random.Random, width: int, height: int, coloured: int = 9) -> Sample:
    """A goal naming one tile's colour on :func:`grid_colour_screen` -> a tap on its centre: the pointer from
    a word of the goal to an image token and its coordinates, with no app, site or goal of v2 in the text."""
    s, names = grid_colour_screen(rng, width, height, coloured)
    slot = rng.randrange(9) if coloured == 9 else rng.choice([k for k, n in enumerate(names) if n])
    goal = rng.choice(_GRID_COLOUR_GOALS).format(names[slot])
    box = s.elements[slot].box
    y, x = _centre(box)
    return Sample(s.image, f"Goal: {goal}\nPrevious: none\nAction:", f"tap {_pt(y, x)}", "grid_colour", box)


def sample_stream_item(
    seed: int,
    step: int,
    index: int,
    skills: list[str],
    weights: list[float],
    width: int,
    height: int,
    grid_colour_tiles: int = 9,
) -> Sample:
    """Sample ``index`` of optimiser step ``step``: a pure function of its arguments, so a resumed run sees
    exactly the data an uninterrupted one would."""
    rng = random.Random(f"{seed}:{step}:{index}")
    skill = rng.choices(skills, weights)[0]
    return make_sample(rng, skill, width, height, grid_colour_tiles)


def is_correct(sample: Sample, prediction: str) -> bool:
    """Grounding: the predicted tap lies in the widget; every other skill: the text matches (any case)."""
    pred = prediction.strip().lower()
    if sample.skill in ("ground", "web_ground", "grid", "grid_colour") and sample.box is not None:
        parts = pred.split()
        if len(parts) != 3 or parts[0] != "tap":
            return False
        try:
            y, x = float(parts[1]), float(parts[2])
        except ValueError:
            return False
        return inside((y, x), sample.box)
    return pred == sample.answer.strip().lower()
