"""Prompts for every action type in both renderings, the prefix/suffix contract, labels and metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from digiq.actions import Action, ActionType, make_observation
from digiq.data.labels import label_stats, screen_changed, screen_diff
from digiq.models import prompts as P
from digiq.stages.finetune_vlm import confusion, p_yes, roc_auc, yes_no_loss

ACTIONS = [
    Action.tap(0.25, 0.5),
    Action.swipe((0.8, 0.5), (0.2, 0.5)),
    Action.type_text("usb cable"),
    Action.key(ActionType.PRESS_BACK),
    Action.key(ActionType.PRESS_HOME),
    Action.key(ActionType.PRESS_ENTER),
    Action(ActionType.STATUS_TASK_COMPLETE),
    Action(ActionType.STATUS_TASK_IMPOSSIBLE),
    Action.invalid("click the thing", "no action_type field"),
]
QUESTION_BITS = [
    "Is this",
    "swipe",
    "type the text",
    "go back",
    "home screen",
    "submit",
    "effective",
    "effective",
    "effective",
]


@pytest.mark.parametrize("family", sorted(P.TEMPLATES))
@pytest.mark.parametrize("rendering", P.RENDERINGS)
def test_prompt_for_every_action_type(family, rendering):
    goal, prev = "Turn on wifi", Action.tap(0.1, 0.2)
    prefixes = set()
    for action, bit in zip(ACTIONS, QUESTION_BITS, strict=True):
        full = P.build_prompt(family, goal, prev, action, rendering)
        prefix, suffix = P.split_prompt(family, goal, prev, action, rendering)
        assert prefix + suffix == full
        assert bit in suffix and goal in prefix and "tap [0.1000, 0.2000]" in prefix
        assert full.rstrip().endswith(P.TEMPLATES[family][1].rstrip())
        assert P.ANSWER_INSTRUCTION in suffix
        prefixes.add(prefix)
    assert len(prefixes) == 1  # the prefix is the same for every candidate action of a state
    # also for the action strings as stored in datasets
    assert P.split_prompt(family, goal, prev, ACTIONS[0].render(), rendering) == P.split_prompt(
        family, goal, prev, ACTIONS[0], rendering
    )
    s_prefix, s_suffix = P.split_prompt(family, goal, prev, None, rendering)
    assert s_prefix in prefixes and P.STATE_QUESTION in s_suffix


def test_tap_question_depends_on_rendering_and_coordinates():
    a, b = Action.tap(0.25, 0.5), Action.tap(0.75, 0.5)
    assert "cursor" in P.action_text(a, "overlay") and "cursor" not in P.action_text(a, "text")
    assert P.action_text(a, "text") != P.action_text(b, "text")
    assert "[0.2500, 0.5000]" in P.action_text(a, "text")


def test_overlay_draws_only_for_pointer_actions():
    img = Image.new("RGB", (90, 160), (255, 255, 255))
    for action in ACTIONS:
        text_img = P.render_image(img, action, "text")
        assert np.array_equal(np.asarray(text_img), np.asarray(img))
        over = np.asarray(P.render_image(img, action, "overlay"))
        drawn = action.type is ActionType.DUAL_POINT
        assert (not np.array_equal(over, np.asarray(img))) == drawn
    # the cursor sits at the tap point (normalised y, x)
    over = np.asarray(P.render_image(img, Action.tap(0.25, 0.5), "overlay")).astype(int)
    assert over[40, 45].tolist() == list(P.CURSOR_FILL) and over[120, 45].tolist() == [255, 255, 255]
    # a filled disc of radius CURSOR_RADIUS x width, black-ringed: fill inside, ring at the edge
    r = P.CURSOR_RADIUS * 90
    assert over[40, round(45 + 0.5 * r)].tolist() == list(P.CURSOR_FILL)
    assert over[40, round(45 + r) - 1].tolist() == list(P.CURSOR_RING)
    assert over[40, round(45 + r) + 2].tolist() == [255, 255, 255]
    # the radius knob scales it
    small = np.asarray(P.render_image(img, Action.tap(0.25, 0.5), "overlay", cursor_radius=0.04)).astype(int)
    assert small[40, round(45 + 0.5 * r)].tolist() == [255, 255, 255]
    assert np.asarray(img).max() == 255  # the input image is not modified


def test_previous_action_from_observation_round_trip():
    prev = Action.type_text("yoga mat")
    obs = make_observation("Search yoga mat", prev)
    got = P.previous_action_from_observation(obs)
    assert P.describe_action(got) == 'type "yoga mat"'
    assert P.describe_action(P.previous_action_from_observation(make_observation("x", None))) == "none"


def _direct_label(a: Image.Image, b: Image.Image, eps: float = 30.0) -> int:
    small = [
        np.asarray(im.resize((im.width // 4, im.height // 4), Image.Resampling.BILINEAR), dtype=np.float64)
        for im in (a, b)
    ]
    return int(((small[0] - small[1]) ** 2).mean() > eps)


def test_labels_match_direct_numpy():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (160, 92, 3), dtype=np.uint8)
    for _ in range(12):
        other = base.copy()
        h = int(rng.integers(0, 160))
        other[:h] = rng.integers(0, 256, (h, 92, 3), dtype=np.uint8)
        a, b = Image.fromarray(base), Image.fromarray(other)
        small = [
            np.asarray(im.resize((23, 40), Image.Resampling.BILINEAR), dtype=np.float64) for im in (a, b)
        ]
        direct = float(((small[0] - small[1]) ** 2).mean())
        assert screen_diff(a, b) == pytest.approx(direct)
        assert screen_changed(a, b) == _direct_label(a, b) == int(direct > 30)
        assert screen_changed(a, b, eps=direct + 1) == 0 and screen_changed(
            a, b, eps=max(0, direct - 1)
        ) == int(direct > 0)
    same = Image.fromarray(base)
    assert screen_changed(same, same.copy()) == 0
    st = label_stats([1, 1, 0, 1])
    assert st["positive_fraction"] == 0.75 and st["majority_accuracy"] == 0.75 and st["count"] == 4


def test_auc_equals_pairwise_definition_and_confusion():
    rng = np.random.default_rng(1)
    scores = np.round(rng.random(60), 1)  # many ties
    labels = rng.integers(0, 2, 60)
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairwise = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert roc_auc(scores, labels) == pytest.approx(pairwise)
    assert roc_auc(labels.astype(float), labels) == 1.0
    assert np.isnan(roc_auc(scores, np.ones(60)))
    assert confusion(np.array([1, 0, 1, 0]), np.array([1, 1, 0, 0])) == [[1, 1], [1, 1]]


def test_yes_no_loss_and_probability():
    logits = torch.zeros(2, 10)
    logits[0, 3] = 5.0  # row 0 says yes (id 3), row 1 says no (id 4)
    logits[1, 4] = 5.0
    assert p_yes(logits, 3, 4)[0] > 0.99 and p_yes(logits, 3, 4)[1] < 0.01
    good = yes_no_loss(logits, torch.tensor([1, 0]), 3, 4)
    bad = yes_no_loss(logits, torch.tensor([0, 1]), 3, 4)
    assert good < 0.1 < bad


def test_yes_no_loss_builds_its_target_on_the_logits_device():
    """Labels come from the CPU batch, logits from the accelerator: the target must follow the logits (on a
    GPU the held-out evaluation crashed here). The meta device stands in for the GPU."""
    logits = torch.zeros(3, 10, device="meta")
    loss = yes_no_loss(logits, torch.tensor([1, 0, 1]), 3, 4, reduction="none")
    assert loss.device.type == "meta" and tuple(loss.shape) == (3,)
