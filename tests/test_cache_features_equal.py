"""Prefix-shared and batched features equal plain per-pair full forwards (llava and qwen2-vl tiny models)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw

from digiq.actions import Action, ActionType
from digiq.models import featurize
from digiq.models.featurize import Featurizer, reference_features
from digiq.models.vlm import TinySpec, build_tiny_vlm

SPEC = TinySpec(hidden=64, layers=3, heads=4, kv_heads=2, vision_hidden=64, vision_layers=1, image_size=56)
GOAL = 'Go to shopmart.com, search for "usb cable", and select the first entry'
PREV = Action.tap(0.1, 0.5).render()
ACTIONS = [
    Action.tap(0.3, 0.4).render(),
    Action.type_text("usb cable").render(),
    Action.key(ActionType.PRESS_BACK).render(),
    Action.swipe((0.8, 0.5), (0.2, 0.5)).render(),
    Action(ActionType.STATUS_TASK_COMPLETE).render(),
]


def _screen() -> Image.Image:
    img = Image.new("RGB", (90, 160), (240, 240, 240))
    d = ImageDraw.Draw(img)
    d.rectangle([5, 10, 85, 30], fill=(30, 90, 200))
    d.rectangle([10, 60, 60, 80], fill=(200, 40, 40))
    return img


@pytest.fixture(scope="module", params=["llava", "qwen2-vl"])
def vlm(request):
    model, proc = build_tiny_vlm(request.param, spec=SPEC, seed=1)
    return model, proc


def _reference(model, proc, img, rendering, layer, prev=PREV):
    items = [None, *ACTIONS]
    return torch.stack([reference_features(model, proc, img, GOAL, prev, a, rendering, layer) for a in items])


@pytest.mark.parametrize(
    ("rendering", "layer"), [("text", None), ("overlay", None), ("text", -1), ("text", 1)]
)
def test_features_equal_per_pair_forward(vlm, rendering: str, layer: int | None) -> None:
    model, proc = vlm
    img = _screen()
    ref = _reference(model, proc, img, rendering, layer)
    f = Featurizer(model, proc, layer=layer, rendering=rendering, batch_size=4)  # 6 prompts -> 2 chunks
    assert f.prefix_sharing == (rendering == "text")
    state, acts = f.features(img, GOAL, PREV, ACTIONS)
    assert f.num_prefix_fallbacks == 0
    got = torch.cat([state[None], acts])
    assert got.shape == (len(ACTIONS) + 1, SPEC.hidden)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    # the features depend on the action (a constant would also "match" a constant reference)
    assert (ref[1:] - ref[1]).abs().max() > 1e-3


def test_features_many_batches_across_states(vlm) -> None:
    """Full forwards batched across states (left padding, different goals) equal per-pair forwards."""
    model, proc = vlm
    img = _screen()
    f = Featurizer(model, proc, rendering="overlay", batch_size=5)
    rows = [(img, GOAL, PREV, ACTIONS[:3]), (img.rotate(180), "Turn on wifi", "", ACTIONS[2:])]
    out = f.features_many(rows)
    for (im, goal, prev, acts), (s, a) in zip(rows, out, strict=True):
        ref = torch.stack(
            [reference_features(model, proc, im, goal, prev, x, "overlay") for x in [None, *acts]]
        )
        torch.testing.assert_close(torch.cat([s[None], a]), ref, atol=1e-4, rtol=0)


def test_duplicate_candidates_are_computed_once(vlm, monkeypatch) -> None:
    """Repeated actions in a row (a behaviour policy's candidates repeat "back", "complete") cost one forward
    each, and every copy still equals its per-pair reference."""
    model, proc = vlm
    img = _screen()
    acts = [ACTIONS[2], ACTIONS[0], ACTIONS[2], ACTIONS[4], ACTIONS[0], ACTIONS[2]]
    seen = []
    real = featurize.extract_features
    monkeypatch.setattr(
        featurize,
        "extract_features",
        lambda m, inputs, layer: seen.append(len(inputs["input_ids"])) or real(m, inputs, layer),
    )
    f = Featurizer(model, proc, rendering="overlay", batch_size=64)
    ((s, a),) = f.features_many([(img, GOAL, PREV, acts)])
    assert sum(seen) == 4  # state + 3 distinct actions, not 7 prompts
    ref = torch.stack([reference_features(model, proc, img, GOAL, PREV, x, "overlay") for x in [None, *acts]])
    torch.testing.assert_close(torch.cat([s[None], a]), ref, atol=1e-4, rtol=0)


def test_qwen_mrope_offset_matters() -> None:
    """Sanity of the Qwen2-VL test: continuing the text at Lp instead of Lp + rope_delta is detectably wrong."""
    # A larger image than SPEC's: more merged patches, so the M-RoPE delta (h*w - max(h, w)) is large.
    spec = TinySpec(
        hidden=64, layers=3, heads=4, kv_heads=2, vision_hidden=64, vision_layers=1, image_size=112
    )
    model, proc = build_tiny_vlm("qwen2-vl", spec=spec, seed=1)
    img = _screen()
    f = Featurizer(model, proc)
    right = f.features(img, GOAL, PREV, ACTIONS[:1])[0]
    orig = f._rope_index
    f._rope_index = lambda inputs: (orig(inputs)[0], orig(inputs)[1] * 0)
    wrong = f.features(img, GOAL, PREV, ACTIONS[:1])[0]
    ref = reference_features(model, proc, img, GOAL, PREV, None, "text")
    torch.testing.assert_close(right, ref, atol=1e-4, rtol=0)
    assert (wrong - ref).abs().max() > 1e-4


def test_unsupported_family_falls_back_to_full_forwards(caplog) -> None:
    model, proc = build_tiny_vlm("paligemma", spec=SPEC, seed=1)
    with caplog.at_level("WARNING"):
        f = Featurizer(model, proc, rendering="text")
    assert not f.prefix_sharing and "prefix sharing is not supported" in caplog.text
    img = _screen()
    s, a = f.features(img, GOAL, PREV, ACTIONS[:2])
    ref = torch.stack(
        [reference_features(model, proc, img, GOAL, PREV, x, "text") for x in [None, *ACTIONS[:2]]]
    )
    torch.testing.assert_close(torch.cat([s[None], a]), ref, atol=1e-4, rtol=0)


def test_common_prefix_len() -> None:
    assert featurize._common_prefix_len([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert featurize._common_prefix_len([[5], [6]]) == 0
