"""A scripted expert and a noisy behaviour policy for MiniWoB++ pages, read from the DOM in ``Observation.info``.

:func:`expert_action` computes the next action of a shortest solution from ``info`` alone (no memory): it
reads progress from the page itself (what the text fields hold, which boxes are checked, which buttons were
already clicked, which folders are open). The core is task-agnostic: it parses the DOM into elements with
their full text, labels and boxes, matches the goal's ``fields`` values to element texts and field labels,
and finds the submit button; each task *kind* (click a named element, close a dialog, tick options and
submit, fill a form and submit, focus a field, click buttons in order, open folders until the name shows)
is a few lines on top, picked by task name or, for tasks not listed, by the goal's wording.

:class:`MiniWoBBehaviour` mirrors :mod:`digiq.sim.behaviour` (AutoUI-like data): with probability
``p_optimal`` the expert's action (taps jittered inside the element), otherwise a mistake drawn from
``mistakes``: a random tap, a tap on another element, a wrong string typed, a premature
STATUS_TASK_COMPLETE, or a BACK / HOME (no-ops on a page, but wasted steps, as on a phone). Typing cannot be
undone in the AitW action space (there is no select-all or delete), so a wrong string in a field spoils the
episode; the expert then submits anyway, which ends it. The caller passes the numpy Generator (one per
episode), so a run does not depend on how workers are scheduled.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from digiq.actions import Action, ActionType
from digiq.config import ConfigError, check, suggest

MISTAKES = ("random_tap", "wrong_element", "wrong_text", "complete", "back", "home")

# Tags a user would tap on purpose (wrong-element mistakes and occlusion tests draw from these).
_CLICKABLE_TAGS = {"button", "a", "select", "textarea", "label"}
_TEXT_INPUTS = {
    "input_text",
    "input_password",
    "input_email",
    "input_number",
    "input_tel",
    "input_search",
    "textarea",
}
_CHOICE_INPUTS = {"input_checkbox", "input_radio"}
# Made-up words for wrong-text mistakes (not from MiniWoB's name lists; the right value is filtered out).
_MADE_UP = ("qwerty", "hello", "test123", "asdf", "Submit", "okay", "zebra", "password", "user", "xyz")


# ---------------------------------------------------------------------------------------------------------
# Page model
# ---------------------------------------------------------------------------------------------------------
def _norm(s: str) -> str:
    return " ".join(str(s).split()).casefold()


def _tokens(s: str) -> list[str]:
    return re.findall(r"[0-9a-z]+", str(s).casefold())


@dataclasses.dataclass(frozen=True)
class Element:
    """One DOM element (or text node, ``ref < 0``) with the facts the expert reads."""

    index: int  # document order
    ref: int
    parent: int
    tag: str
    text: str
    value: str
    id: str
    classes: tuple[str, ...]
    left: float
    top: float
    width: float
    height: float
    focused: bool
    tampered: bool

    @property
    def is_text_node(self) -> bool:
        return self.ref < 0

    @property
    def checked(self) -> bool:
        # MiniWoB serialises a checkbox's / radio's ``checked`` as str(bool): "True" or "".
        return self.value == "True"


class Page:
    """The DOM of one observation: elements in document order, their tree, full texts and visibility."""

    def __init__(self, info: Mapping[str, Any]) -> None:
        self.task = str(info.get("task") or "")
        self.utterance = str(info.get("utterance") or "")
        self.fields: list[tuple[str, str]] = [(str(k), str(v)) for k, v in info.get("fields") or ()]
        self.step = int(info.get("step") or 0)
        w, h = info.get("screen_size") or (160, 210)
        self.width, self.height = int(w), int(h)
        self.elements: list[Element] = []
        for i, e in enumerate(info.get("dom_elements") or ()):
            flags = [int(f) for f in np.asarray(e.get("flags", (0, 0, 0, 0))).reshape(-1)] + [0, 0]
            self.elements.append(
                Element(
                    index=i,
                    ref=int(e["ref"]),
                    parent=int(e.get("parent", 0)),
                    tag=str(e.get("tag", "")),
                    text=str(e.get("text") or ""),
                    value=str(e.get("value") or ""),
                    id=str(e.get("id") or ""),
                    classes=tuple(str(e.get("classes") or "").split()),
                    left=float(e["left"]),
                    top=float(e["top"]),
                    width=float(e["width"]),
                    height=float(e["height"]),
                    focused=bool(flags[0]),
                    tampered=bool(flags[1]),
                )
            )
        self.by_ref = {e.ref: e for e in self.elements}
        self.children: dict[int, list[Element]] = {}
        for e in self.elements:
            self.children.setdefault(e.parent, []).append(e)
        self._text: dict[int, str] = {}

    # -- tree and text ----------------------------------------------------------------------------
    def full_text(self, el: Element) -> str:
        """The element's own text plus its descendants' (a <label>'s text sits in a child text node)."""
        if el.ref not in self._text:
            parts = [el.text] + [self.full_text(c) for c in self.children.get(el.ref, ())]
            self._text[el.ref] = " ".join(p for p in parts if p).strip()
        return self._text[el.ref]

    def ancestors(self, el: Element) -> list[Element]:
        out, cur = [], self.by_ref.get(el.parent)
        while cur is not None and len(out) < 64:
            out.append(cur)
            cur = self.by_ref.get(cur.parent)
        return out

    def is_inside(self, el: Element, other: Element) -> bool:
        return other in self.ancestors(el)

    def label_of(self, el: Element) -> str:
        """What a user reads as the field's name: an enclosing <label>, else the nearest label or text just
        before it under the same parent, else its id."""
        for a in self.ancestors(el):
            if a.tag == "label":
                return self.full_text(a)
        before = [s for s in self.children.get(el.parent, ()) if s.index < el.index and s.tag != "br"]
        for s in reversed(before):
            t = self.full_text(s)
            if t and (s.tag in ("label", "span", "t", "div") or s.is_text_node):
                return t
        return el.id

    # -- geometry ---------------------------------------------------------------------------------
    def visible_box(self, el: Element) -> tuple[float, float, float, float] | None:
        """(x0, y0, x1, y1) of the element's part on the screenshot, or None when it is off screen."""
        x0, y0 = max(el.left, 0.0), max(el.top, 0.0)
        x1, y1 = min(el.left + el.width, float(self.width)), min(el.top + el.height, float(self.height))
        if x1 - x0 < 1 or y1 - y0 < 1:
            return None
        return x0, y0, x1, y1

    def is_visible(self, el: Element) -> bool:
        return self.visible_box(el) is not None

    def visible(self, tags: set[str] | None = None) -> list[Element]:
        return [e for e in self.elements if (tags is None or e.tag in tags) and self.is_visible(e)]

    def _occluders(self, el: Element) -> list[Element]:
        # Later interactive elements that are neither inside nor around ``el`` can sit on top of it
        # (click-button-sequence places its two buttons absolutely, and TWO may cover ONE).
        around = set(self.ancestors(el))
        return [
            o
            for o in self.elements
            if o.index > el.index
            and (o.tag in _CLICKABLE_TAGS or o.tag.startswith("input"))
            and o not in around
            and not self.is_inside(o, el)
            and self.is_visible(o)
        ]

    def covered(self, el: Element, x: float, y: float, occluders: list[Element] | None = None) -> bool:
        for o in self._occluders(el) if occluders is None else occluders:
            b = self.visible_box(o)
            if b is not None and b[0] <= x < b[2] and b[1] <= y < b[3]:
                return True
        return False

    def tap_point(self, el: Element) -> tuple[float, float]:
        """Pixel (x, y) to tap: the centre of the visible box, or the first uncovered point of a grid."""
        box = self.visible_box(el)
        if box is None:
            raise ValueError(f"element {el.ref} is off screen")
        x0, y0, x1, y1 = box
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        occluders = self._occluders(el)
        if not self.covered(el, cx, cy, occluders):
            return cx, cy
        for fy in (0.5, 0.3, 0.7, 0.15, 0.85):
            for fx in (0.5, 0.3, 0.7, 0.15, 0.85):
                x, y = x0 + fx * (x1 - x0), y0 + fy * (y1 - y0)
                if not self.covered(el, x, y, occluders):
                    return x, y
        return cx, cy

    def tap_at(self, x: float, y: float) -> Action:
        """A tap at pixel (x, y), normalised the way the adapter maps it back (``x * (w - 1)``)."""
        ny = min(max(y / max(self.height - 1, 1), 0.0), 1.0)
        nx = min(max(x / max(self.width - 1, 1), 0.0), 1.0)
        return Action.tap(round(ny, 4), round(nx, 4))

    def tap(self, el: Element) -> Action:
        return self.tap_at(*self.tap_point(el))

    # -- goal -------------------------------------------------------------------------------------
    def field(self, *keys: str) -> str | None:
        for k, v in self.fields:
            if k in keys:
                return v
        return None

    def targets(self) -> list[str]:
        """Values of the ``target`` / ``target 0``, ``target 1`` ... fields, in order."""
        return [v for k, v in self.fields if k == "target" or re.fullmatch(r"target \d+", k)]

    def quoted(self) -> list[str]:
        return re.findall(r'"([^"]+)"', self.utterance)

    def find_by_text(self, target: str) -> Element | None:
        """The best visible element showing ``target``: exact text, then case-folded, then as a whole word
        (``Tab #2`` for ``2``); ties go to tappable tags, then to the innermost element, then document order."""
        pool = [e for e in self.visible() if not e.is_text_node and e.tag not in ("body", "html")]
        want, want_tokens = _norm(target), _tokens(target)
        best: tuple[int, int, int, int] | None = None
        found = None
        for e in pool:
            text = self.full_text(e)
            if not text:
                continue
            if text.strip() == target.strip():
                score = 3
            elif _norm(text) == want:
                score = 2
            elif want_tokens and _contains_run(_tokens(text), want_tokens):
                score = 1
            else:
                continue
            tappable = int(e.tag in _CLICKABLE_TAGS or e.tag.startswith("input") or "alink" in e.classes)
            key = (score, tappable, -len(text), -e.index)
            if best is None or key > best:
                best, found = key, e
        return found

    def buttons(self) -> list[Element]:
        return [
            e
            for e in self.visible()
            if e.tag == "button" or e.tag in ("input_button", "input_submit") or "ui-button" in e.classes
        ]

    def submit_button(self) -> Element | None:
        """The goal's button: one named by a ``button`` field or by a word of the goal ("press login"), else
        the page's submit button (``#subbtn``), else the last button."""
        buttons = [b for b in self.buttons() if self.full_text(b) or b.value]
        named = self.field("button")
        words = set(_tokens(self.utterance)) | ({_norm(named)} if named else set())
        for b in buttons:
            if _norm(self.full_text(b) or b.value) in words:
                return b
        for b in buttons:
            if b.id in ("subbtn", "submit") or "submit" in _norm(b.id):
                return b
        return buttons[-1] if buttons else None


def _contains_run(tokens: list[str], run: list[str]) -> bool:
    n = len(run)
    return any(tokens[i : i + n] == run for i in range(len(tokens) - n + 1))


# ---------------------------------------------------------------------------------------------------------
# The expert
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Move:
    """The expert's next move: a tap on ``element`` (realised at its tap point, or jittered) or ``action``."""

    element: Element | None = None
    action: Action | None = None
    # Elements a tap on which is just as good (a second "okay" button, a second file of the target's name):
    # mistakes avoid them, so that a mistake never solves the task by chance.
    also: tuple[Element, ...] = ()

    def canonical(self, page: Page) -> Action:
        if self.element is not None:
            return page.tap(self.element)
        assert self.action is not None
        return self.action


GIVE_UP = Move(action=Action.key(ActionType.STATUS_TASK_IMPOSSIBLE))


def _fill(page: Page, field: Element, want: str) -> Move | None:
    """The next move towards ``field`` holding ``want``, or None when it is done or cannot be fixed (typing
    only appends, so a field holding anything but a prefix of ``want`` stays wrong)."""
    have = field.value
    if have == want or not want.startswith(have):
        return None
    if field.focused:
        return Move(action=Action.type_text(want[len(have) :]))
    return Move(element=field)


def _apply_case(page: Page, value: str) -> str:
    # enter-text-2 style goals ask for the value in another case via a ``case`` field.
    case = _norm(page.field("case") or "")
    return value.lower() if case == "lower" else value.upper() if case == "upper" else value


def plan_fill(page: Page) -> Move:
    """Fill every text field with its value, then press the goal's button.

    A field is matched to a goal field by its label or id (``username`` -> the field labelled Username);
    values whose key names no field (``target``, ``text``) go to all the remaining text fields (enter-text:
    one field; enter-password: the password and its verification)."""
    inputs = page.visible(_TEXT_INPUTS)
    goal = [(k, v) for k, v in page.fields if k not in ("button", "case")]
    wants: dict[int, str] = {}
    free: list[str] = []
    for key, value in goal:
        k = _norm(key)
        hit = [
            f
            for f in inputs
            if f.index not in wants
            and (k == _norm(page.label_of(f)) or k == _norm(f.id) or k in _tokens(f.id))
        ]
        if not hit:
            hit = [f for f in inputs if f.index not in wants and k in _tokens(page.label_of(f))]
        if hit:
            wants[hit[0].index] = value
        else:
            free.append(value)
    rest = [f for f in inputs if f.index not in wants]
    if free and rest:
        if len(free) == len(rest):
            wants.update({f.index: v for f, v in zip(rest, free)})
        else:
            wants.update({f.index: free[0] for f in rest})
    for f in inputs:  # document order: top to bottom, as a person fills a form
        if f.index in wants:
            move = _fill(page, f, _apply_case(page, wants[f.index]))
            if move is not None:
                return move
    button = page.submit_button()
    return Move(element=button) if button is not None else Move(action=Action.key(ActionType.PRESS_ENTER))


def plan_select(page: Page) -> Move:
    """Tick exactly the goal's options (checkboxes) or the goal's option (radio buttons), then submit."""
    boxes = page.visible(_CHOICE_INPUTS)
    labels = [page.label_of(b) for b in boxes]
    wanted: set[int] = set()
    for t in page.targets():
        # Option names are random strings: an exact match first ("oB" and "Ob" may both be there).
        hits = [b.index for b, lab in zip(boxes, labels) if lab == t] or [
            b.index for b, lab in zip(boxes, labels) if _norm(lab) == _norm(t)
        ]
        wanted.update(hits[:1])
    for box in boxes:
        want = box.index in wanted
        if box.tag == "input_radio" and not want:
            continue  # picking the right radio button clears the others
        if want != box.checked:
            return Move(element=box)
    button = page.submit_button()
    return Move(element=button) if button is not None else GIVE_UP


def plan_click(page: Page) -> Move:
    """Click the element that shows the goal's target (a button, link, tab, dialog button...)."""
    targets = page.targets() or page.quoted()
    if not targets:
        return GIVE_UP
    if _norm(targets[0]) in ("x", "\u00d7"):  # click-dialog-2: the "x" is an icon; its text is "Close"
        return plan_close(page)
    el = page.find_by_text(targets[0])
    if el is None:
        return GIVE_UP
    text = page.full_text(el)
    twins = [e for e in page.visible({el.tag}) if e is not el and page.full_text(e) == text]
    return Move(element=el, also=tuple(twins))


def plan_close(page: Page) -> Move:
    """Close the dialog: its close button (jQuery UI's titlebar "x", whose text "Close" is off screen)."""
    for b in page.buttons():
        text = _norm(page.full_text(b))
        if any("close" in c for c in b.classes) or text in ("x", "\u00d7", "close"):
            return Move(element=b)
    return GIVE_UP


def plan_focus(page: Page) -> Move:
    """Tap a text field (the n-th when the goal names one: "the 2nd input textbox")."""
    inputs = page.visible(_TEXT_INPUTS)
    if not inputs:
        return GIVE_UP
    target = page.field("target")
    n = int(target) if target is not None and target.isdigit() else 1
    field = inputs[min(max(n, 1), len(inputs)) - 1]
    return Move(element=field) if not field.focused else GIVE_UP


def plan_sequence(page: Page) -> Move:
    """Click the buttons in the order the goal names them; a clicked button is flagged ``tampered``.

    MiniWoB marks the click that ends an episode with the *next* episode's id, so the previous episode's
    last button may still read as tampered on a new page (one stale flag at most). Hence nothing counts as
    clicked at step 0, progress is the run of clicked buttons from the first, and a run covering every
    button (the episode would have ended) includes the stale one: the last button is still to click."""
    words = _tokens(page.utterance)
    order: list[tuple[int, Element]] = []
    for b in page.buttons():
        name = _tokens(page.full_text(b))
        pos = next((i for i in range(len(words)) if name and words[i : i + len(name)] == name), None)
        if pos is not None:
            order.append((pos, b))
    seq = [b for _, b in sorted(order, key=lambda t: t[0])]
    if not seq:
        return GIVE_UP
    done = 0 if page.step == 0 else next((i for i, b in enumerate(seq) if not b.tampered), len(seq))
    return Move(element=seq[min(done, len(seq) - 1)])


def plan_tree(page: Page) -> Move:
    """Click the target's name once it shows; until then open the topmost closed folder (its "+" handle).
    What a closed folder holds is not in the DOM (hidden elements are not reported), so folders are opened
    top to bottom."""
    targets = page.targets() or page.quoted()
    if not targets:
        return GIVE_UP
    names = [
        e
        for e in page.visible({"span", "a", "li", "div"})
        if page.full_text(e) and not page.children.get(e.ref)
    ]
    exact = [e for e in names if e.text == targets[0]]
    if exact:
        return Move(element=exact[0], also=tuple(exact[1:]))
    for li in page.visible({"li"}):
        if "expandable" in li.classes:
            handles = [
                c for c in page.children.get(li.ref, ()) if "hitarea" in c.classes and page.is_visible(c)
            ]
            spans = [c for c in page.children.get(li.ref, ()) if c.tag == "span" and page.is_visible(c)]
            pick = handles or spans
            if pick:
                return Move(element=pick[0])
    return GIVE_UP


KINDS: dict[str, Callable[[Page], Move]] = {
    "click": plan_click,
    "close": plan_close,
    "select": plan_select,
    "fill": plan_fill,
    "focus": plan_focus,
    "sequence": plan_sequence,
    "tree": plan_tree,
}
# Tasks whose kind is known; others are classified from the goal's wording (guess_kind).
TASK_KINDS: dict[str, str] = {
    "click-button": "click",
    "click-link": "click",
    "click-tab": "click",
    "click-dialog": "close",
    "click-dialog-2": "click",
    "click-checkboxes": "select",
    "click-checkboxes-large": "select",
    "click-checkboxes-transfer": "select",
    "click-option": "select",
    "focus-text": "focus",
    "focus-text-2": "focus",
    "enter-text": "fill",
    "enter-text-2": "fill",
    "enter-text-dynamic": "fill",
    "enter-password": "fill",
    "login-user": "fill",
    "click-button-sequence": "sequence",
    "navigate-tree": "tree",
}
_KIND_PATTERNS = (
    (r"\bclose the dialog\b", "close"),
    (r"\bfile tree\b|\bnavigate\b", "tree"),
    (r"\bfocus\b", "focus"),
    (r",? then click\b", "sequence"),
    (r"^(enter|type)\b", "fill"),
    (r"^select\b.*\b(submit|click)\b", "select"),
)


def guess_kind(info: Mapping[str, Any]) -> str:
    """The task kind: from the task name when known, else from the goal's wording (default: click)."""
    kind = TASK_KINDS.get(str(info.get("task") or ""))
    if kind is not None:
        return kind
    goal = str(info.get("utterance") or "").strip().casefold()
    return next((k for pattern, k in _KIND_PATTERNS if re.search(pattern, goal)), "click")


def dismiss_popup(page: Page) -> Move | None:
    """An interrupting popup (login-user-popup's "Exit to home page?") disables the page under it: decline
    it first. A dialog that is itself the goal (click-dialog) is not a popup here: its id names no popup."""
    for box in page.visible():
        if "popup" in _norm(box.id) and not box.id.startswith("popup-"):
            inside = [b for b in page.buttons() if page.is_inside(b, box)]
            for b in inside:
                if _norm(page.full_text(b)) in ("cancel", "no", "close", "x", "\u00d7"):
                    return Move(element=b)
    return None


def expert_move(info: Mapping[str, Any]) -> tuple[Page, Move]:
    """The parsed page and the expert's next move (the behaviour policy jitters its tap, or avoids it)."""
    page = Page(info)
    return page, dismiss_popup(page) or KINDS[guess_kind(info)](page)


def expert_action(info: Mapping[str, Any]) -> Action:
    """The next action of a shortest solution, from the DOM alone (taps at the element's tap point; the
    STATUS_TASK_IMPOSSIBLE action when no element fits the goal)."""
    page, move = expert_move(info)
    return move.canonical(page)


# ---------------------------------------------------------------------------------------------------------
# The noisy behaviour policy
# ---------------------------------------------------------------------------------------------------------
# Per-task p_optimal, tuned so that the mixture solves 25-35% of episodes (AutoUI's range on AitW). Measured
# with max_steps=10 and one Generator per episode seeded with the page seed: successes over seeds 0..59, then
# over seeds 0..179, with Wilson 95% intervals. Single-step pages need a low p: there most mistakes are
# harmless misses, and the right tap comes sooner or later unless a premature STATUS_TASK_COMPLETE or a wrong
# button ends the episode first; forms need most of their 3-5 steps right in a row.
TUNED_P_OPTIMAL: dict[str, float] = {
    "click-button": 0.095,  # 18/60 = 0.30 [0.20, 0.43]; 59/180 = 0.33 [0.26, 0.40]
    "click-link": 0.16,  # 18/60 = 0.30 [0.20, 0.43]; 54/180 = 0.30 [0.24, 0.37]
    "click-tab": 0.145,  # 18/60 = 0.30 [0.20, 0.43]; 54/180 = 0.30 [0.24, 0.37]
    "click-dialog": 0.07,  # 20/60 = 0.33 [0.23, 0.46]; 51/180 = 0.28 [0.22, 0.35]
    "click-checkboxes": 0.38,  # 16/60 = 0.27 [0.17, 0.39]; 64/180 = 0.36 [0.29, 0.43]
    "focus-text": 0.08,  # 16/60 = 0.27 [0.17, 0.39]; 50/180 = 0.28 [0.22, 0.35]
    "enter-text": 0.41,  # 17/60 = 0.28 [0.19, 0.41]; 51/180 = 0.28 [0.22, 0.35]
    "login-user": 0.615,  # 20/60 = 0.33 [0.23, 0.46]; 55/180 = 0.31 [0.24, 0.38]
    "click-option": 0.30,  # 15/60 = 0.25 [0.16, 0.37]; 61/180 = 0.34 [0.27, 0.41]
    "enter-password": 0.61,  # 19/60 = 0.32 [0.21, 0.44]; 55/180 = 0.31 [0.24, 0.38]
    "click-button-sequence": 0.44,  # 17/60 = 0.28 [0.19, 0.41]; 55/180 = 0.31 [0.24, 0.38]
    "navigate-tree": 0.16,  # 20/60 = 0.33 [0.23, 0.46]; 62/180 = 0.34 [0.28, 0.42]
}


@dataclasses.dataclass
class MiniWoBBehaviourConfig:
    # Probability of the expert's action at each step for tasks not in `p_optimal_by_task` (the rest is a
    # mistake drawn from `mistakes`).
    p_optimal: float = 0.30
    # Per-task p_optimal (defaults: TUNED_P_OPTIMAL, with the measured success rates).
    p_optimal_by_task: dict[str, float] = dataclasses.field(default_factory=lambda: dict(TUNED_P_OPTIMAL))
    # p_optimal of sample_candidates for tasks without an override; tasks with one keep the same ratio
    # (p_task * p_optimal_candidates / p_optimal): the same extra noise, as the official candidates are
    # sampled at a higher temperature than the data (see digiq.sim.behaviour).
    p_optimal_candidates: float = 0.22
    # Relative weights of the mistakes: random_tap, wrong_element, wrong_text, complete, back, home. A
    # premature STATUS_TASK_COMPLETE is AutoUI's most damaging habit, hence its large share.
    mistakes: tuple[float, float, float, float, float, float] = (0.25, 0.30, 0.10, 0.20, 0.075, 0.075)
    # Taps land uniformly in the central `jitter` fraction of the intended element's box (0 = its centre).
    jitter: float = 0.8

    def validate(self, where: str = "miniwob_behaviour") -> None:
        check(0 <= self.p_optimal <= 1, f"{where}.p_optimal must be in [0, 1]")
        check(0 <= self.p_optimal_candidates <= 1, f"{where}.p_optimal_candidates must be in [0, 1]")
        check(
            all(0 <= p <= 1 for p in self.p_optimal_by_task.values()),
            f"{where}.p_optimal_by_task: probabilities in [0, 1]",
        )
        check(
            len(self.mistakes) == len(MISTAKES)
            and all(w >= 0 for w in self.mistakes)
            and sum(self.mistakes) > 0,
            f"{where}.mistakes: {len(MISTAKES)} weights >= 0 ({', '.join(MISTAKES)}), not all 0",
        )
        check(0 <= self.jitter <= 1, f"{where}.jitter must be in [0, 1]")

    def check_tasks(self, tasks: list[str], where: str = "miniwob_behaviour") -> None:
        """Every key of ``p_optimal_by_task`` is a task of the run (``tasks``) or of the tuned table: a
        misspelt task (``click_button``, ``click-buton``) would otherwise be ignored without a word."""
        stray = sorted(set(self.p_optimal_by_task) - set(tasks) - set(TUNED_P_OPTIMAL))
        if stray:
            k = stray[0]
            raise ConfigError(
                f"{where}.p_optimal_by_task names {stray}, not a task of miniwob.tasks"
                f"{suggest(k, list(tasks) + list(TUNED_P_OPTIMAL))}"
            )

    def p_for(self, task: str, candidates: bool = False) -> float:
        """p_optimal for ``task``'s steps (or for its Best-of-N candidates)."""
        p = self.p_optimal_by_task.get(task, self.p_optimal)
        if not candidates:
            return p
        if task not in self.p_optimal_by_task or self.p_optimal == 0:
            return self.p_optimal_candidates
        return min(1.0, p * self.p_optimal_candidates / self.p_optimal)


class MiniWoBBehaviour:
    """``act(info, rng) -> Action``: the expert's action with probability p_optimal, else a mistake."""

    def __init__(self, config: MiniWoBBehaviourConfig | None = None) -> None:
        self.config = config or MiniWoBBehaviourConfig()
        self.config.validate()
        w = np.asarray(self.config.mistakes, dtype=np.float64)
        self._mistake_p = w / w.sum()

    # -- building blocks --------------------------------------------------------------------------
    def _jittered_tap(self, page: Page, el: Element, rng: np.random.Generator) -> Action:
        box = page.visible_box(el)
        if box is None or self.config.jitter == 0:
            return page.tap(el)
        x0, y0, x1, y1 = box
        m = (1 - self.config.jitter) / 2
        x = rng.uniform(x0 + m * (x1 - x0), x1 - m * (x1 - x0))
        y = rng.uniform(y0 + m * (y1 - y0), y1 - m * (y1 - y0))
        # A jittered tap on the intended element, not on one lying over it.
        return page.tap(el) if page.covered(el, x, y) else page.tap_at(x, y)

    @staticmethod
    def _good(page: Page, move: Move) -> list[Element]:
        """The expert's element, its twins, and <label>s around them (a tap on a label ticks its box)."""
        good = [e for e in (move.element, *move.also) if e is not None]
        return good + [a for e in good for a in page.ancestors(e) if a.tag == "label"]

    def _random_tap(self, page: Page, move: Move, rng: np.random.Generator) -> Action:
        """A tap anywhere on the screen but on the expert's element (a mistake never solves by chance)."""
        zones = [b for b in (page.visible_box(e) for e in self._good(page, move)) if b is not None]
        for _ in range(32):
            x, y = rng.uniform(0, page.width - 1), rng.uniform(0, page.height - 1)
            if not any(x0 <= x <= x1 and y0 <= y <= y1 for x0, y0, x1, y1 in zones):
                break
        return page.tap_at(x, y)

    def _wrong_text(self, page: Page, rng: np.random.Generator, right: str) -> Action:
        """Another field's value, the right value cut short or in the wrong case, or a made-up word."""
        pool = [v for _, v in page.fields if v and v != right]
        if right:
            pool += [right[: max(1, len(right) // 2)], right.swapcase()]
        pool = [p for p in pool if p != right] + [w for w in _MADE_UP if w != right]
        return Action.type_text(pool[int(rng.integers(len(pool)))])

    def _mistake(self, page: Page, move: Move, rng: np.random.Generator) -> Action:
        kind = MISTAKES[int(rng.choice(len(MISTAKES), p=self._mistake_p))]
        if kind == "random_tap":
            return self._random_tap(page, move, rng)
        if kind == "wrong_element":
            # Another element a person might tap: visible controls and leaves (text, icons), not containers,
            # and neither the expert's element nor anything inside it.
            good = self._good(page, move)
            pool = [
                e
                for e in page.visible()
                if e not in good
                and not any(page.is_inside(e, g) for g in good)
                and not e.is_text_node
                and e.tag not in ("body", "html")
                and (e.tag in _CLICKABLE_TAGS or e.tag.startswith("input") or not page.children.get(e.ref))
            ]
            if not pool:
                return self._random_tap(page, move, rng)
            return self._jittered_tap(page, pool[int(rng.integers(len(pool)))], rng)
        if kind == "wrong_text":
            right = (
                move.action.text if move.action is not None and move.action.type is ActionType.TYPE else ""
            )
            return self._wrong_text(page, rng, right)
        if kind == "complete":
            return Action.key(ActionType.STATUS_TASK_COMPLETE)
        return Action.key(ActionType.PRESS_BACK if kind == "back" else ActionType.PRESS_HOME)

    def _sample(self, page: Page, move: Move, p: float, rng: np.random.Generator) -> Action:
        if rng.random() < p:
            return (
                self._jittered_tap(page, move.element, rng)
                if move.element is not None
                else move.canonical(page)
            )
        return self._mistake(page, move, rng)

    # -- public API -------------------------------------------------------------------------------
    def act(
        self, info: Mapping[str, Any], rng: np.random.Generator, p_optimal: float | None = None
    ) -> Action:
        page, move = expert_move(info)
        p = self.config.p_for(page.task) if p_optimal is None else p_optimal
        return self._sample(page, move, p, rng)

    def sample_candidates(self, info: Mapping[str, Any], n: int, rng: np.random.Generator) -> list[Action]:
        """``n`` actions from the same mixture with more noise (for Best-of-N candidate sets)."""
        page, move = expert_move(info)
        p = self.config.p_for(page.task, candidates=True)
        return [self._sample(page, move, p, rng) for _ in range(n)]
