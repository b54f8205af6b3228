"""The AutoUI action string: parse/render of every AitW type, hostile text, malformed input, round trips."""

from __future__ import annotations

import math
import random

import pytest

from digiq.actions import (
    AITW_IDS,
    VALID_TYPES,
    Action,
    ActionType,
    goal_from_observation,
    make_observation,
    parse_action,
    render_action,
)

# Verbatim from the DigiRL issue #1 dump (https://github.com/DigiRL-agent/digirl/issues/1).
OFFICIAL = (
    'Action Plan: [DUAL_POINT,DUAL_POINT,PRESS_HOME,DUAL_POINT] ; Action Decision: "action_type": "DUAL_POINT", '
    '"touch_point": "[0.7852, 0.6779]", "lift_point": "[0.7852, 0.6779]", "typed_text": ""'
)
OFFICIAL_NEXT_OBS = (
    'Previous Actions: "action_type": "DUAL_POINT", "touch_point": "[0.7852, 0.6779]", "lift_point": '
    '"[0.7852, 0.6779]", "typed_text": "" Goal: What\'s a good restaurant in Los Angeles?</s>'
)


def _decision(atype: str, touch: str = "[-1.0, -1.0]", lift: str = "[-1.0, -1.0]", text: str = "") -> str:
    return (
        f'Action Plan: [{atype}] ; Action Decision: "action_type": "{atype}", "touch_point": "{touch}", '
        f'"lift_point": "{lift}", "typed_text": "{text}"'
    )


# -- the official strings --------------------------------------------------------------------------


def test_official_dual_point_string() -> None:
    a = parse_action(OFFICIAL)
    assert a.type is ActionType.DUAL_POINT and a.is_valid and a.error == ""
    assert a.touch == (0.7852, 0.6779) and a.lift == (0.7852, 0.6779)
    assert a.is_tap and not a.is_swipe
    assert a.plan == ("DUAL_POINT", "DUAL_POINT", "PRESS_HOME", "DUAL_POINT")
    assert a.aitw_id == 4
    # rendering with the same plan gives back the byte-identical official string
    assert a.render() == OFFICIAL


def test_official_observation_round_trip() -> None:
    prev = parse_action(OFFICIAL)
    obs = make_observation("What's a good restaurant in Los Angeles?", prev)
    assert obs == OFFICIAL_NEXT_OBS
    assert goal_from_observation(obs) == "What's a good restaurant in Los Angeles?"
    assert make_observation("x", None) == "Previous Actions:  Goal: x</s>"
    # the official to_autoui writes TaskImpossible as STATUS_TASK_COMPLETE in the history
    impossible = Action.key(ActionType.STATUS_TASK_IMPOSSIBLE)
    assert '"action_type": "STATUS_TASK_COMPLETE"' in make_observation("x", impossible)


@pytest.mark.parametrize(
    "action",
    [
        Action.tap(0.25, 0.75),
        Action.swipe((0.8, 0.5), (0.2, 0.5)),
        Action.type_text("hello world"),
        Action.key(ActionType.PRESS_BACK),
        Action.key(ActionType.PRESS_HOME),
        Action.key(ActionType.PRESS_ENTER),
        Action.key(ActionType.STATUS_TASK_COMPLETE),
        Action.key(ActionType.STATUS_TASK_IMPOSSIBLE),
    ],
    ids=lambda a: a.type.value + ("-swipe" if a.is_swipe else ""),
)
def test_every_type_round_trips(action: Action) -> None:
    s = action.render()
    assert s.startswith(f"Action Plan: [{action.type.value}] ; Action Decision: ")
    back = parse_action(s)
    assert back == action and back.is_valid
    assert render_action(back) == s
    if action.type not in (ActionType.DUAL_POINT,):
        assert '"touch_point": "[-1.0, -1.0]", "lift_point": "[-1.0, -1.0]"' in s


def test_every_valid_type_has_an_aitw_id() -> None:
    assert set(AITW_IDS) == set(VALID_TYPES)
    assert Action.invalid("x", "bad").aitw_id is None


def test_swipe_is_not_tap() -> None:
    swipe = parse_action(_decision("DUAL_POINT", "[0.8, 0.5]", "[0.2, 0.5]"))
    assert swipe.is_swipe and not swipe.is_tap
    near = parse_action(_decision("DUAL_POINT", "[0.5, 0.5]", "[0.52, 0.51]"))
    assert near.is_tap  # within AitW's 0.04 tap distance


# -- typed text --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "pizza, near me",  # ", " broke the official 6-field split
        'he said "hi", then left',
        '"',
        'ends with a quote"',
        "line one\nline two\n",
        "ünïcödé 日本語 🚀",
        'x", "typed_text": "y',  # looks like another field
        '"action_type": "DUAL_POINT", "touch_point": "[0.1, 0.1]"',
        "Action Decision: nested",
        "a</s>",
        "",
        "  padded  ",
        "back\\slash",
    ],
)
def test_hostile_typed_text_round_trips(text: str) -> None:
    a = Action.type_text(text)
    back = parse_action(a.render())
    assert back.type is ActionType.TYPE
    assert back.text == text
    assert back == a


def test_type_with_trailing_eos_and_padding() -> None:
    base = _decision("TYPE", text="best pizza")
    assert parse_action(base + "</s>").text == "best pizza"
    assert parse_action(base + " </s>\n").text == "best pizza"
    assert parse_action(base + "<pad>").text == "best pizza"  # loose fallback to the last quote
    assert parse_action(base + "<pad>").type is ActionType.TYPE


def test_decision_without_plan_and_unquoted_points() -> None:
    a = parse_action('"action_type": "DUAL_POINT", "touch_point": [0.1, 0.2], "lift_point": [0.3, 0.4]')
    assert a.type is ActionType.DUAL_POINT and a.touch == (0.1, 0.2) and a.lift == (0.3, 0.4)
    assert a.plan == ()
    spaced = parse_action(
        'Action Plan: [ TYPE , PRESS_ENTER ] ; Action Decision: "action_type" : "TYPE", '
        '"touch_point": "[-1.0, -1.0]", "lift_point": "[-1.0, -1.0]", "typed_text" : "abc"'
    )
    assert spaced.type is ActionType.TYPE and spaced.text == "abc" and spaced.plan == ("TYPE", "PRESS_ENTER")


# -- aliases -----------------------------------------------------------------------------------------


def test_task_impossible_aliases() -> None:
    for name in ("TASK_IMPOSSIBLE", "STATUS_TASK_IMPOSSIBLE", "status_task_impossible"):
        assert parse_action(_decision(name)).type is ActionType.STATUS_TASK_IMPOSSIBLE, name
    assert parse_action(_decision("TASK_COMPLETE")).type is ActionType.STATUS_TASK_COMPLETE
    assert parse_action(_decision("dual_point", "[0.5, 0.5]", "[0.5, 0.5]")).type is ActionType.DUAL_POINT


# -- malformed input ---------------------------------------------------------------------------------

MALFORMED = {
    "empty": ("", "no action_type"),
    "whitespace": ("   \n", "no action_type"),
    "garbage": ("tap the red button please", "no action_type"),
    "plan only": ("Action Plan: [DUAL_POINT] ; Action Decision:", "no action_type"),
    "unknown type": (_decision("LONG_PRESS"), "unknown action_type 'LONG_PRESS'"),
    "explicit invalid": (_decision("INVALID"), "INVALID"),
    "dual point no points": ('"action_type": "DUAL_POINT", "typed_text": ""', "touch_point"),
    "dual point missing lift": ('"action_type": "DUAL_POINT", "touch_point": "[0.5, 0.5]"', "lift_point"),
    "dual point with -1": (_decision("DUAL_POINT"), "outside [0, 1]"),
    "y above 1": (_decision("DUAL_POINT", "[1.5, 0.5]", "[0.5, 0.5]"), "outside [0, 1]"),
    "x below 0": (_decision("DUAL_POINT", "[0.5, 0.5]", "[0.5, -0.01]"), "outside [0, 1]"),
    "exponent out of range": (_decision("DUAL_POINT", "[1e3, 0.5]", "[0.5, 0.5]"), "outside [0, 1]"),
    "nan": (_decision("DUAL_POINT", "[nan, 0.5]", "[0.5, 0.5]"), "touch_point"),
    "inf": (_decision("DUAL_POINT", "[0.5, 0.5]", "[inf, 0.5]"), "lift_point"),
    "one coordinate": (_decision("DUAL_POINT", "[0.5]", "[0.5, 0.5]"), "touch_point"),
    "words as point": (_decision("DUAL_POINT", "[top, left]", "[0.5, 0.5]"), "touch_point"),
    "type without text": ('"action_type": "TYPE", "touch_point": "[-1.0, -1.0]"', "typed_text"),
    "unterminated text": ('"action_type": "TYPE", "typed_text": "abc', "typed_text"),
}


@pytest.mark.parametrize("raw, error", MALFORMED.values(), ids=list(MALFORMED))
def test_malformed_strings_are_invalid_not_exceptions(raw: str, error: str) -> None:
    a = parse_action(raw)
    assert a.type is ActionType.INVALID and not a.is_valid
    assert error in a.error
    assert a.raw == raw
    assert a.render() == raw  # an INVALID action renders as the text it came from
    assert not a.is_tap and not a.is_swipe


@pytest.mark.parametrize("value", [None, 3, 0.5, b'"action_type": "TYPE"', ["DUAL_POINT"], {"a": 1}, True])
def test_wrong_python_types_are_invalid(value: object) -> None:
    a = parse_action(value)  # type: ignore[arg-type]
    assert a.type is ActionType.INVALID
    assert "expected a string" in a.error and type(value).__name__ in a.error


def test_nan_action_renders_to_an_invalid_string() -> None:
    s = Action.tap(float("nan"), 0.5).render()
    assert parse_action(s).type is ActionType.INVALID


def test_key_constructor_rejects_non_key_types() -> None:
    for bad in (ActionType.DUAL_POINT, ActionType.TYPE, ActionType.INVALID):
        with pytest.raises(ValueError, match="key or status"):
            Action.key(bad)
    with pytest.raises(ValueError):
        Action.key("NOT_A_TYPE")
    assert Action.key("PRESS_BACK").type is ActionType.PRESS_BACK


# -- property tests ----------------------------------------------------------------------------------

_ALPHABET = list("abcXYZ 019,.:;[]{}()'\"\\/\n\t-_=+") + ["ü", "日", "🚀", ", ", '", "', "</s>"]


def _random_action(rng: random.Random) -> Action:
    kind = rng.choice(VALID_TYPES)
    if kind is ActionType.DUAL_POINT:
        if rng.random() < 0.5:
            return Action.tap(rng.random(), rng.random())
        return Action.swipe((rng.random(), rng.random()), (rng.random(), rng.random()))
    if kind is ActionType.TYPE:
        return Action.type_text("".join(rng.choice(_ALPHABET) for _ in range(rng.randint(0, 24))))
    return Action.key(kind)


def _rounded(p: tuple[float, float] | None, precision: int) -> tuple[float, float] | None:
    return None if p is None else (round(p[0], precision), round(p[1], precision))


@pytest.mark.parametrize("precision", [4, 2, 6])
def test_random_round_trip(precision: int) -> None:
    rng = random.Random(1234 + precision)
    seen = set()
    for _ in range(400):
        a = _random_action(rng)
        seen.add(a.type)
        plan = tuple(rng.choice(VALID_TYPES).value for _ in range(rng.randint(0, 4)))
        s = a.render(precision=precision, plan=plan or None)
        b = parse_action(s)
        assert b.is_valid, (s, b.error)
        assert b.type is a.type and b.text == a.text
        if plan:
            assert b.plan == plan
        assert _rounded(b.touch, precision) == _rounded(a.touch, precision), s
        assert _rounded(b.lift, precision) == _rounded(a.lift, precision), s
        for p, q in ((a.touch, b.touch), (a.lift, b.lift)):
            if p is not None:
                assert math.isclose(p[0], q[0], abs_tol=0.5 * 10**-precision + 1e-12)
        # a second round is exact: rendering the parsed action is a fixed point
        assert parse_action(b.render(precision=precision)) == b
        assert b.render(precision=precision, plan=plan or None) == s
    assert seen == set(VALID_TYPES)


def test_random_garbage_never_raises() -> None:
    rng = random.Random(7)
    pieces = [
        '"action_type": ',
        '"DUAL_POINT"',
        '"TYPE"',
        '"touch_point": ',
        '"[0.5, 0.5]"',
        "[nan, 1]",
        '"typed_text": "',
        '"',
        "Action Plan: [",
        "]",
        "Action Decision:",
        "</s>",
        ",",
        " ",
        "\n",
        "1e999",
        "-",
    ]
    kinds = set()
    for _ in range(500):
        s = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        a = parse_action(s)  # must not raise
        kinds.add(a.type)
        if a.is_valid and a.type is ActionType.DUAL_POINT:
            assert all(0.0 <= v <= 1.0 for v in (*a.touch, *a.lift))
        if not a.is_valid:
            assert a.error and a.raw == s
    assert ActionType.INVALID in kinds and len(kinds) > 1
