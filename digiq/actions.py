"""The AitW action space and the AutoUI / DigiRL action string.

The official agents emit AutoUI strings (the format of https://github.com/DigiRL-agent/digirl/issues/1)::

    Action Plan: [DUAL_POINT,TYPE] ; Action Decision: "action_type": "DUAL_POINT",
    "touch_point": "[0.7852, 0.6779]", "lift_point": "[0.7852, 0.6779]", "typed_text": ""

Points are normalised ``[y, x]``; non-pointer actions carry ``[-1.0, -1.0]``. We differ from the official
parser (which splits on ``", "`` and expects exactly six fields) in three ways:

* typed text may contain ``", "``, quotes or newlines: ``typed_text`` is the last field, so it runs to
  the last quote of the string;
* ``STATUS_TASK_IMPOSSIBLE`` is recognised (the official checks ``TASK_IMPOSSIBLE`` and falls to Idle);
* a malformed string never raises: :func:`parse_action` returns an ``INVALID`` action holding the raw
  text, which the critic and the Best-of-N filter treat like any other (bad) action.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re


class ActionType(str, enum.Enum):
    DUAL_POINT = "DUAL_POINT"
    TYPE = "TYPE"
    PRESS_BACK = "PRESS_BACK"
    PRESS_HOME = "PRESS_HOME"
    PRESS_ENTER = "PRESS_ENTER"
    STATUS_TASK_COMPLETE = "STATUS_TASK_COMPLETE"
    STATUS_TASK_IMPOSSIBLE = "STATUS_TASK_IMPOSSIBLE"
    INVALID = "INVALID"


# AitW integer ids (android_in_the_wild/action_type.py); INVALID has none.
AITW_IDS: dict[ActionType, int] = {
    ActionType.TYPE: 3,
    ActionType.DUAL_POINT: 4,
    ActionType.PRESS_BACK: 5,
    ActionType.PRESS_HOME: 6,
    ActionType.PRESS_ENTER: 7,
    ActionType.STATUS_TASK_COMPLETE: 10,
    ActionType.STATUS_TASK_IMPOSSIBLE: 11,
}
VALID_TYPES = tuple(t for t in ActionType if t is not ActionType.INVALID)
# AitW action_matching.py: a DUAL_POINT whose touch and lift are within 0.04 is a tap.
TAP_DISTANCE = 0.04
NO_POINT = (-1.0, -1.0)

Point = tuple[float, float]


@dataclasses.dataclass(frozen=True)
class Action:
    """One AitW action. ``touch``/``lift`` are normalised ``(y, x)``; ``None`` for non-pointer actions."""

    type: ActionType
    touch: Point | None = None
    lift: Point | None = None
    text: str = ""
    # The "Action Plan" (upcoming action types) that AutoUI prints before its decision; informational, so
    # it takes no part in equality: ``parse_action(a.render()) == a`` although render adds a default plan.
    plan: tuple[str, ...] = dataclasses.field(default=(), compare=False)
    # The string an INVALID action was parsed from, and why it is invalid.
    raw: str = ""
    error: str = ""

    # -- constructors -----------------------------------------------------------------------------
    @classmethod
    def tap(cls, y: float, x: float) -> Action:
        return cls(ActionType.DUAL_POINT, (float(y), float(x)), (float(y), float(x)))

    @classmethod
    def swipe(cls, touch: Point, lift: Point) -> Action:
        return cls(
            ActionType.DUAL_POINT, (float(touch[0]), float(touch[1])), (float(lift[0]), float(lift[1]))
        )

    @classmethod
    def type_text(cls, text: str) -> Action:
        return cls(ActionType.TYPE, text=text)

    @classmethod
    def key(cls, kind: ActionType | str) -> Action:
        """A key or status action (PRESS_* / STATUS_*); pointer, TYPE and INVALID need other constructors."""
        atype = ActionType(kind)
        if atype in (ActionType.DUAL_POINT, ActionType.TYPE, ActionType.INVALID):
            raise ValueError(f"Action.key takes a key or status action type, not {atype.value}")
        return cls(atype)

    @classmethod
    def invalid(cls, raw: str, error: str) -> Action:
        return cls(ActionType.INVALID, raw=raw, error=error)

    # -- properties -------------------------------------------------------------------------------
    @property
    def is_valid(self) -> bool:
        return self.type is not ActionType.INVALID

    @property
    def is_tap(self) -> bool:
        if self.type is not ActionType.DUAL_POINT or self.touch is None or self.lift is None:
            return False
        return math.dist(self.touch, self.lift) <= TAP_DISTANCE

    @property
    def is_swipe(self) -> bool:
        return self.type is ActionType.DUAL_POINT and not self.is_tap

    @property
    def aitw_id(self) -> int | None:
        return AITW_IDS.get(self.type)

    # -- rendering --------------------------------------------------------------------------------
    def render_decision(self, precision: int = 4) -> str:
        """The ``"action_type": ..., "typed_text": "..."`` part (also used in 'Previous Actions')."""
        if not self.is_valid:
            return self.raw
        touch = self.touch if self.touch is not None else NO_POINT
        lift = self.lift if self.lift is not None else NO_POINT
        return (
            f'"action_type": "{self.type.value}", '
            f'"touch_point": "{_fmt_point(touch, precision)}", '
            f'"lift_point": "{_fmt_point(lift, precision)}", '
            f'"typed_text": "{self.text}"'
        )

    def render(self, precision: int = 4, plan: tuple[str, ...] | None = None) -> str:
        """The full AutoUI string; ``render`` then :func:`parse_action` returns an equal action."""
        if not self.is_valid:
            return self.raw
        plan = self.plan if plan is None else plan
        if not plan:
            plan = (self.type.value,)
        return f"Action Plan: [{','.join(plan)}] ; Action Decision: {self.render_decision(precision)}"

    def __str__(self) -> str:
        return self.render()


def _fmt_point(p: Point, precision: int) -> str:
    y, x = p
    if (y, x) == NO_POINT:
        return "[-1.0, -1.0]"
    return f"[{y:.{precision}f}, {x:.{precision}f}]"


_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_TYPE_RE = re.compile(r'"action_type"\s*:\s*"([A-Za-z_]+)"')
_POINT_RE = {
    key: re.compile(rf'"{key}"\s*:\s*"?\[\s*({_NUM})\s*,\s*({_NUM})\s*\]"?')
    for key in ("touch_point", "lift_point")
}
_TEXT_RE = re.compile(r'"typed_text"\s*:\s*"(.*)"\s*$', re.DOTALL)
# Fallback when something follows the closing quote (e.g. an unstripped "<pad>"): run to the last quote.
_TEXT_LOOSE_RE = re.compile(r'"typed_text"\s*:\s*"(.*)"', re.DOTALL)
# End-of-sequence tokens a decoder may leave at the end of a generation (T5 / LLaMA style).
_EOS_SUFFIXES = ("</s>", "<eos>", "<|endoftext|>", "<|im_end|>")
_PLAN_RE = re.compile(r"Action Plan\s*:\s*\[([^\]]*)\]")
_ALIASES = {"TASK_IMPOSSIBLE": "STATUS_TASK_IMPOSSIBLE", "TASK_COMPLETE": "STATUS_TASK_COMPLETE"}


def parse_action(text: str | None) -> Action:
    """Parse an AutoUI / DigiRL action string. Never raises: bad input gives an ``INVALID`` action."""
    if not isinstance(text, str):
        return Action.invalid(repr(text), f"expected a string, got {type(text).__name__}")
    raw = text
    text = _strip_eos(text)
    decision = text.split("Action Decision:", 1)[1] if "Action Decision:" in text else text
    plan_match = _PLAN_RE.search(text.split("Action Decision:", 1)[0]) if "Action Decision:" in text else None
    plan = tuple(p.strip() for p in plan_match.group(1).split(",") if p.strip()) if plan_match else ()

    m = _TYPE_RE.search(decision)
    if m is None:
        return Action.invalid(raw, "no action_type field")
    name = _ALIASES.get(m.group(1).upper(), m.group(1).upper())
    try:
        atype = ActionType(name)
    except ValueError:
        return Action.invalid(raw, f"unknown action_type {m.group(1)!r}")
    if atype is ActionType.INVALID:
        return Action.invalid(raw, "action_type INVALID")

    if atype is ActionType.DUAL_POINT:
        points = []
        for key in ("touch_point", "lift_point"):
            pm = _POINT_RE[key].search(decision)
            if pm is None:
                return Action.invalid(raw, f"DUAL_POINT without a parsable {key}")
            y, x = float(pm.group(1)), float(pm.group(2))
            if not (math.isfinite(y) and math.isfinite(x)) or not (0.0 <= y <= 1.0 and 0.0 <= x <= 1.0):
                return Action.invalid(raw, f"{key} [{pm.group(1)}, {pm.group(2)}] is outside [0, 1]")
            points.append((y, x))
        return Action(atype, points[0], points[1], plan=plan)

    if atype is ActionType.TYPE:
        tm = _TEXT_RE.search(decision) or _TEXT_LOOSE_RE.search(decision)
        if tm is None:
            return Action.invalid(raw, "TYPE without a typed_text field")
        return Action(atype, text=tm.group(1), plan=plan)
    # Key and status actions ignore their (dummy) points and text, as the official executor does.
    return Action(atype, plan=plan)


def _strip_eos(text: str) -> str:
    stripped = text.rstrip()
    changed = True
    while changed:
        changed = False
        for suffix in _EOS_SUFFIXES:
            if stripped.endswith(suffix):
                stripped = stripped[: -len(suffix)].rstrip()
                changed = True
    return stripped


def action_label(a: Action) -> str:
    """A short human-readable form of an action for reports (the Q-value viewer's table, evaluation traces):
    ``tap (0.180, 0.740)``, ``type "yoga mat"``, ``press_back``, ..."""
    if a.type is ActionType.DUAL_POINT and a.touch is not None and a.lift is not None:
        if a.is_tap:
            return f"tap ({a.touch[0]:.3f}, {a.touch[1]:.3f})"
        return f"swipe ({a.touch[0]:.2f}, {a.touch[1]:.2f}) \u2192 ({a.lift[0]:.2f}, {a.lift[1]:.2f})"
    if a.type is ActionType.TYPE:
        return f'type "{a.text}"'
    if a.type is ActionType.INVALID:
        return f"invalid: {a.raw[:60]}"
    return a.type.value


def render_action(action: Action, precision: int = 4) -> str:
    return action.render(precision)


def make_observation(task: str, previous: Action | None) -> str:
    """The AutoUI prompt text: ``Previous Actions: <last action> Goal: <task></s>`` (autoui_utils.py).

    Only the last action is kept, written without its plan; both STATUS actions are written as
    STATUS_TASK_COMPLETE, as the official ``to_autoui`` does.
    """
    prev = ""
    if previous is not None:
        if previous.type is ActionType.STATUS_TASK_IMPOSSIBLE:
            previous = Action(ActionType.STATUS_TASK_COMPLETE)
        prev = previous.render_decision()
    return f"Previous Actions: {prev} Goal: {task}</s>"


_GOAL_RE = re.compile(r"Goal:\s*(.*?)(?:</s>|$)", re.DOTALL)


def goal_from_observation(observation: str) -> str:
    """The goal inside an AutoUI observation (the official critic uses the regex ``Goal: (.*?)</s>``)."""
    m = _GOAL_RE.search(observation)
    return m.group(1).strip() if m else observation.strip()
