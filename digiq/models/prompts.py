"""Prompts for the VLM critic: one place that turns (screenshot, goal, previous action, action) into inputs.

The official Stage 1 asks one Yes/No question per action type (DigiRL-agent/digiq @ 8181379,
``postprocess_data/get_more_actions/construct_sft_data.py:60-78``): a "cursor" question for taps, "will this
action effectively ..." for TYPE / PRESS_*, and "Is this action effective?" as the fallback. We keep those
questions and add the goal and the previous action to the text, which the official LLaVA prompt leaves out
(the critic there gets them from separate RoBERTa encoders; here the VLM feature has to carry them).

Two renderings of the candidate action:

* ``overlay`` (the official one): a cursor is drawn at the tap point (an arrow for swipes) on the
  screenshot, and the coordinates are also written in the question;
* ``text``: the image is untouched and the action lives in text only. Then the prompt is exactly
  ``prefix + suffix``: the prefix (chat header, image, goal, previous action) is identical for every
  candidate of a state, the suffix holds the action, its question, the answer instruction and the
  assistant generation prompt. Stage 2 shares the prefix's KV cache across the N candidates.

The feature position is the **last prompt token**: the one whose next-token distribution is the Yes/No
answer (the official gradio path mean-pools the generated tokens' states, ``host.py:78-84``, which for a
one-token answer is the state at that same decision point, but with sampling; we take it deterministically).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from PIL import Image, ImageDraw

from digiq.actions import Action, ActionType, parse_action
from digiq.models.families import FAMILIES

Rendering = Literal["text", "overlay"]
RENDERINGS = ("text", "overlay")

# The official answer instruction (construct_sft_data.py:60-78), after a newline as in the training path.
ANSWER_INSTRUCTION = (
    "\nRespond only 'Yes' or 'No' (without period / quotation marks) and don't respond anything else."
)
# The state-only question for f(s): no action, the same decision point at the end of the prompt.
STATE_QUESTION = "Is the goal already complete on this screen?"

# family -> (head, tail, answer_prefix): full prompt text = head + user_text + tail, the answer follows
# as answer_prefix + "Yes"/"No". A view of the registry (digiq.models.families), where each template is
# described, for readers of the tuples (policy export, tests).
TEMPLATES: dict[str, tuple[str, str, str]] = {name: f.template for name, f in FAMILIES.items()}


def family_name(family_or_processor: Any) -> str:
    """Accept a family string or a processor built by :mod:`digiq.models.vlm` (``.digiq_family``)."""
    if isinstance(family_or_processor, str):
        fam = family_or_processor
    else:
        fam = getattr(family_or_processor, "digiq_family", None)
        if fam is None:
            raise ValueError("processor has no digiq_family: load it with digiq.models.vlm.load_vlm")
    if fam not in FAMILIES:
        raise ValueError(f"no prompt template for VLM family {fam!r}; known: {sorted(FAMILIES)}")
    return fam


# --------------------------------------------------------------------------------------------------
# Action text
# --------------------------------------------------------------------------------------------------


def _pt(p: tuple[float, float] | None) -> str:
    return "[-1.0, -1.0]" if p is None else f"[{p[0]:.4f}, {p[1]:.4f}]"


def _as_action(a: Action | str | None) -> Action | None:
    if a is None or isinstance(a, Action):
        return a
    if a.strip() == "":
        return None
    return parse_action(a)


def describe_action(action: Action | str | None) -> str:
    """A short description of an action (used for the previous action in the prompt)."""
    a = _as_action(action)
    if a is None:
        return "none"
    if a.type is ActionType.DUAL_POINT:
        return f"tap {_pt(a.touch)}" if a.is_tap else f"swipe {_pt(a.touch)} to {_pt(a.lift)}"
    if a.type is ActionType.TYPE:
        return f'type "{a.text}"'
    if a.type is ActionType.INVALID:
        return f"invalid: {a.raw}"
    return {
        ActionType.PRESS_BACK: "press back",
        ActionType.PRESS_HOME: "press home",
        ActionType.PRESS_ENTER: "press enter",
        ActionType.STATUS_TASK_COMPLETE: "task complete",
        ActionType.STATUS_TASK_IMPOSSIBLE: "task impossible",
    }[a.type]


def action_text(action: Action | str, rendering: Rendering = "text") -> str:
    """The action-dependent part of the prompt: the action and its per-type question (the official
    ``construct_sft_data.py:60-78``)."""
    a = _as_action(action) or Action.invalid("", "empty action")
    if a.type is ActionType.DUAL_POINT and a.is_tap:
        if rendering == "overlay":
            return (
                f"There is a cursor in the screen. The touch point is located at {_pt(a.touch)}. "
                "Is this cursor clicking on any interactive elements?"
            )
        return (
            f"The action taps the screen at the touch point {_pt(a.touch)} (y, x as fractions of the "
            "screen height and width). Is this touch point on any interactive elements?"
        )
    if a.type is ActionType.DUAL_POINT:
        seen = "There is an arrow in the screen. " if rendering == "overlay" else ""
        return f"{seen}The action swipes from {_pt(a.touch)} to {_pt(a.lift)}. Will this swipe change the screen?"
    if a.type is ActionType.TYPE:
        return (
            f'The action types the text "{a.text}". '
            "Will this action effectively type the text into a text field?"
        )
    if a.type is ActionType.PRESS_HOME:
        return "The action presses the home button. Will this action effectively go to the home screen?"
    if a.type is ActionType.PRESS_BACK:
        return (
            "The action presses the back button. Will this action effectively go back to the previous screen?"
        )
    if a.type is ActionType.PRESS_ENTER:
        return "The action presses the enter key. Will this action effectively submit the typed text?"
    # STATUS_* and invalid strings: the official fallback question.
    return f"The action is: {describe_action(a)}. Is this action effective?"


def user_prefix(goal: str, previous_action: Action | str | None) -> str:
    """The action-independent user text that follows the image: goal and previous action."""
    return f"Goal: {goal}\nPrevious action: {describe_action(previous_action)}\n"


# --------------------------------------------------------------------------------------------------
# Prompt text
# --------------------------------------------------------------------------------------------------


def split_prompt(
    family_or_processor: Any,
    goal: str,
    previous_action: Action | str | None,
    action: Action | str | None = None,
    rendering: Rendering = "text",
) -> tuple[str, str]:
    """``(prefix_text, suffix_text)`` with ``prefix + suffix == build_prompt(...)``.

    The prefix depends only on the state (family header, image placeholder, goal, previous action); the
    suffix holds the action (``None`` = the state-only prompt for f(s)), its question, the answer
    instruction and the assistant generation prompt. With ``rendering="overlay"`` the text split is the
    same, but the image differs per action, so only ``text`` prompts can share a prefix KV cache.
    """
    fam = FAMILIES[family_name(family_or_processor)]
    prefix = fam.head + user_prefix(goal, previous_action)
    question = STATE_QUESTION if action is None else "Action: " + action_text(action, rendering)
    return prefix, question + ANSWER_INSTRUCTION + fam.tail


def build_prompt(
    family_or_processor: Any,
    goal: str,
    previous_action: Action | str | None,
    action: Action | str | None = None,
    rendering: Rendering = "text",
) -> str:
    """The full prompt text (the processor expands the image placeholder). ``action=None``: state-only."""
    prefix, suffix = split_prompt(family_or_processor, goal, previous_action, action, rendering)
    return prefix + suffix


def answer_prefix(family_or_processor: Any) -> str:
    return FAMILIES[family_name(family_or_processor)].answer_prefix


def previous_action_from_observation(observation: str) -> str:
    """The previous-action string inside an AutoUI observation (``Previous Actions: ... Goal: ...``)."""
    text = observation.split("Goal:", 1)[0]
    if "Previous Actions:" in text:
        text = text.split("Previous Actions:", 1)[1]
    return text.strip()


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


# The cursor: a filled disc of a saturated colour that screens rarely use (pure magenta), inside a black
# ring, so that a tiny vision tower trained from scratch finds it in one or two patches. Its radius is a
# fraction of the screen width (the official click icon is ~23% of the width; see render_image).
CURSOR_RADIUS = 0.15
CURSOR_FILL = (255, 0, 255)
CURSOR_RING = (0, 0, 0)
ARROW_FILL = (255, 0, 255)


def render_image(
    screenshot: Image.Image,
    action: Action | str | None,
    rendering: Rendering = "text",
    cursor_radius: float | None = None,
) -> Image.Image:
    """The image the VLM sees: the screenshot, plus a cursor / arrow for pointer actions with ``overlay``.

    The official pastes a 250x250 click icon on the 1080-wide screenshot (about 23% of the width) at the
    tap, then downsizes 4x (generate_more_click_images_batched.py:67-74). We draw a filled magenta disc with
    a black ring of radius ``cursor_radius`` x width (default :data:`CURSOR_RADIUS`): big and
    high-contrast enough to survive the VLM's resize and cover a 14-px patch of a 112-px-wide input, where
    the earlier thin red ring (6% of the width) was found by a tiny vision tower only for non-tap actions
    (taps were answered "Yes" wherever the cursor was); on the simulated device radius 0.15 lifted
    held-out Stage-1 accuracy from 0.773 to 0.805 (AUC 0.839 -> 0.875, configs/finetune-vlm/tiny.yaml). Swipes get an arrow from touch to lift (the
    official draws nothing for swipes) and the same disc at the touch point.
    """
    img = screenshot.convert("RGB")
    a = _as_action(action)
    if rendering == "text" or a is None or a.type is not ActionType.DUAL_POINT or a.touch is None:
        return img
    img = img.copy()
    w, h = img.size
    d = ImageDraw.Draw(img)
    r = max(3.0, (CURSOR_RADIUS if cursor_radius is None else cursor_radius) * w)
    ring = max(1, round(r / 4))
    ty, tx = a.touch[0] * h, a.touch[1] * w
    if not a.is_tap and a.lift is not None:
        import math

        ly, lx = a.lift[0] * h, a.lift[1] * w
        lw = max(2, round(r / 2))
        d.line([(tx, ty), (lx, ly)], fill=ARROW_FILL, width=lw)
        ang = math.atan2(ly - ty, lx - tx)
        for da in (2.6, -2.6):  # arrow head at the lift point
            d.line(
                [(lx, ly), (lx + r * 1.5 * math.cos(ang + da), ly + r * 1.5 * math.sin(ang + da))],
                fill=ARROW_FILL,
                width=lw,
            )
    d.ellipse([tx - r, ty - r, tx + r, ty + r], fill=CURSOR_FILL, outline=CURSOR_RING, width=ring)
    return img


# --------------------------------------------------------------------------------------------------
# Model inputs
# --------------------------------------------------------------------------------------------------


def make_inputs(
    processor: Any,
    screenshots: Sequence[Image.Image],
    goals: Sequence[str],
    previous_actions: Sequence[Action | str | None],
    actions: Sequence[Action | str | None],
    rendering: Rendering = "text",
) -> dict[str, torch.Tensor]:
    """A padded (left) batch of model inputs; ``actions[i] = None`` gives the state-only prompt."""
    fam = family_name(processor)
    texts = [
        build_prompt(fam, g, p, a, rendering)
        for g, p, a in zip(goals, previous_actions, actions, strict=True)
    ]
    images = [render_image(s, a, rendering) for s, a in zip(screenshots, actions, strict=True)]
    return processor_call(processor, images, texts)


def processor_call(
    processor: Any, images: Sequence[Image.Image], texts: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Run the processor with its family's image-input quirks; never returns labels."""
    fam = FAMILIES[family_name(processor)]
    processor.tokenizer.padding_side = "left"
    imgs: Any = [[im] for im in images] if fam.nested_images else list(images)
    out = processor(images=imgs, text=list(texts), padding=True, return_tensors="pt")
    out = dict(out)
    out.pop("labels", None)  # PaliGemma returns labels when it sees a suffix; we never pass one
    if not fam.keeps_token_type_ids:
        out.pop("token_type_ids", None)
    return out


def yes_no_token_ids(processor: Any) -> tuple[int, int]:
    """``(yes_id, no_id)``: the first token of the answer "Yes" / "No" right after the generation prompt."""
    fam = FAMILIES[family_name(processor)]
    tok = processor.tokenizer
    ans = fam.answer_prefix
    base = "x" + fam.tail + fam.implicit_tail
    ids = []
    for word in ("Yes", "No"):
        a = tok(base, add_special_tokens=False)["input_ids"]
        b = tok(base + ans + word, add_special_tokens=False)["input_ids"]
        k = 0
        while k < len(a) and k < len(b) and a[k] == b[k]:
            k += 1
        if k >= len(b):
            raise ValueError(f"tokenizer cannot encode the answer {word!r}")
        ids.append(int(b[k]))
    if ids[0] == ids[1]:
        raise ValueError("'Yes' and 'No' start with the same token; the answer is not one token decision")
    return ids[0], ids[1]
