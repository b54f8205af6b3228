"""The VLM layer: tiny models of every family build, run, save/load identically; features; LoRA."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from digiq.actions import Action, ActionType
from digiq.config import LoraConfig, ModelConfig
from digiq.models import prompts as P
from digiq.models.vlm import (
    FAMILIES,
    answer_logits,
    apply_lora,
    build_tiny_vlm,
    extract_features,
    load_vlm,
    save_vlm,
)

PORTRAIT = Image.new("RGB", (90, 160), (200, 100, 50))


def _inputs(processor, rendering="text"):
    img2 = PORTRAIT.copy()
    img2.paste((10, 200, 10), (0, 0, 90, 40))
    acts = [Action.tap(0.3, 0.4), Action.type_text("usb cable"), None]
    return P.make_inputs(
        processor,
        [PORTRAIT, img2, PORTRAIT],
        ["Turn on wifi"] * 3,
        [None, "press back", None],
        acts,
        rendering,
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_family_builds_runs_and_round_trips(family, tmp_path):
    model, processor = build_tiny_vlm(family)
    inputs = _inputs(processor)
    # left padding: the rows have different lengths, so pads sit at the start
    assert inputs["attention_mask"][:, -1].all()
    with torch.no_grad():
        logits = answer_logits(model, inputs)
        full = model(**inputs).logits[:, -1]
    assert logits.shape == (3, model.config.get_text_config().vocab_size)
    torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5)
    yes, no = P.yes_no_token_ids(processor)
    assert (
        processor.tokenizer.decode([yes]).strip() == "Yes"
        and processor.tokenizer.decode([no]).strip() == "No"
    )
    save_vlm(model, processor, tmp_path / "m")
    model2, processor2 = load_vlm(str(tmp_path / "m"))
    assert processor2.digiq_family == family
    inputs2 = _inputs(processor2)
    for k in inputs:
        torch.testing.assert_close(inputs2[k], inputs[k])
    with torch.no_grad():
        torch.testing.assert_close(answer_logits(model2, inputs2), logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llava", "qwen2-vl", "idefics3", "paligemma"])
def test_extract_features_equals_full_forward_hidden_state(family):
    # extract_features stops the forward at the feature layer (a pre-hook); the reference runs every layer.
    model, processor = build_tiny_vlm(family)
    inputs = _inputs(processor, "overlay")
    with torch.no_grad():
        full = model(**inputs, output_hidden_states=True)
        n = len(full.hidden_states) - 1
        last = inputs["attention_mask"].shape[1] - 1  # left padding: the last column is the last real token
        for layer in (0, 2, -1, -2, None):
            got = extract_features(model, inputs, layer)
            idx = {None: (3 * n) // 4, -1: n, -2: n - 1}.get(layer, layer)
            torch.testing.assert_close(got, full.hidden_states[idx][:, last], atol=1e-5, rtol=1e-5)
        # -1 is after the final norm: the LM head applied to it gives the logits
        feat = extract_features(model, inputs, -1)
        torch.testing.assert_close(model.lm_head(feat), full.logits[:, -1], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="out of range"):
        extract_features(model, inputs, 99)


def test_extract_features_skips_layers_above_the_feature_layer():
    from digiq.models.vlm import decoder_layers

    model, processor = build_tiny_vlm("qwen2-vl")
    inputs = _inputs(processor)
    layers = decoder_layers(model.model)
    calls = [0] * len(layers)
    hooks = [
        layer.register_forward_pre_hook(lambda *_a, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, layer in enumerate(layers)
    ]
    with torch.no_grad():
        extract_features(model, inputs, 2)
    for h in hooks:
        h.remove()
    # layers 0, 1 run; layer 2's pre-hooks fire (ours first, then the early exit); nothing above runs
    assert calls == [1, 1, 1] + [0] * (len(layers) - 3)
    assert not layers[2]._forward_pre_hooks  # the early-exit hook is removed


def test_features_ignore_padding():
    """A row's feature does not depend on what it is batched with (left padding + attention mask)."""
    model, processor = build_tiny_vlm("qwen2-vl")
    batch = _inputs(processor)
    single = P.make_inputs(processor, [PORTRAIT], ["Turn on wifi"], [None], [None], "text")
    with torch.no_grad():
        a = extract_features(model, batch, 2)[2]
        b = extract_features(model, single, 2)[0]
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_lora_step_changes_adapters_not_base(tmp_path):
    model, processor = build_tiny_vlm("llava")
    model = apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    yes, no = P.yes_no_token_ids(processor)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    logits = answer_logits(model, _inputs(processor))
    torch.nn.functional.cross_entropy(logits, torch.tensor([yes, no, yes])).backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert any("lora_B" in n for n in changed)
    with pytest.raises(Exception, match="twice"):
        apply_lora(model, LoraConfig(enabled=True))
    # adapter-only save -> load rebuilds the tiny base from its seed and gives the same logits
    model.eval()
    with torch.no_grad():
        ref = answer_logits(model, _inputs(processor))
    save_vlm(model, processor, tmp_path / "adapter", merge_lora=False, base="tiny:llava")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    m2, p2 = load_vlm(str(tmp_path / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(answer_logits(m2, _inputs(p2)), ref, atol=1e-5, rtol=1e-5)
    # merged save -> plain model, same logits
    save_vlm(model, processor, tmp_path / "merged", merge_lora=True)
    m3, p3 = load_vlm(str(tmp_path / "merged"))
    with torch.no_grad():
        torch.testing.assert_close(answer_logits(m3, _inputs(p3)), ref, atol=1e-4, rtol=1e-4)


def test_load_vlm_lora_and_checkpointing_flags():
    model, _ = load_vlm(
        ModelConfig(name_or_path="tiny:qwen2-vl", gradient_checkpointing=True), LoraConfig(enabled=True)
    )
    assert model.is_gradient_checkpointing
    assert sum(p.requires_grad for p in model.parameters()) > 0


def test_portrait_screens_are_resized_not_cropped():
    _, processor = build_tiny_vlm("llava")
    ip = processor.image_processor
    assert not ip.do_center_crop
    # a marker at the very bottom of the portrait screen survives preprocessing (a centre crop cuts it)
    img = Image.new("RGB", (90, 160), (255, 255, 255))
    img.paste((0, 0, 0), (0, 150, 90, 160))
    px = processor.image_processor(images=[img], return_tensors="pt")["pixel_values"][0]
    assert px.shape[-1] == px.shape[-2]
    assert px[:, -2:, :].mean() < px[:, :10, :].mean() - 0.5
    # Qwen keeps the aspect ratio: a portrait grid
    _, qp = build_tiny_vlm("qwen2-vl")
    grid = qp.image_processor(images=[img], return_tensors="pt")["image_grid_thw"][0]
    assert grid[1] > grid[2]


def test_unknown_family_is_a_clear_error():
    from digiq.errors import DigiqError

    with pytest.raises(DigiqError, match="choose one of"):
        load_vlm("tiny:gpt5")
    assert ActionType.TYPE  # keep the import used for readers of the test


@pytest.mark.parametrize("family", ["llava", "qwen2-vl"])
def test_prefix_tokens_are_a_prefix_of_the_full_prompt_tokens(family):
    """Stage 2 caches the prefix's KV once per state: its tokens must not merge across the split."""
    _, processor = build_tiny_vlm(family)
    tok = processor.tokenizer
    for action in [
        Action.tap(0.3, 0.4),
        Action.type_text("yoga mat"),
        Action.key(ActionType.PRESS_BACK),
        None,
    ]:
        prefix, suffix = P.split_prompt(processor, "Turn on wifi", Action.tap(0.1, 0.1), action, "text")
        full = tok(prefix + suffix, add_special_tokens=False)["input_ids"]
        assert (
            tok(prefix, add_special_tokens=False)["input_ids"]
            + tok(suffix, add_special_tokens=False)["input_ids"]
            == full
        )


def test_tiny_name_options():
    from digiq.errors import DigiqError
    from digiq.models.vlm import TinySpec, parse_tiny_name

    assert parse_tiny_name("tiny:llava") == ("llava", TinySpec())
    fam, spec = parse_tiny_name("tiny:qwen2-vl@image_size=168,layers=2")
    assert fam == "qwen2-vl" and spec.image_size == 168 and spec.layers == 2
    with pytest.raises(DigiqError, match="bad tiny model option"):
        parse_tiny_name("tiny:llava@depth=3")
    model, processor = load_vlm("tiny:qwen2-vl@image_size=168,layers=2")
    assert model.config.text_config.num_hidden_layers == 2
    grid = processor.image_processor(images=[PORTRAIT], return_tensors="pt")["image_grid_thw"][0]
    assert int(grid[1] * grid[2]) * 14 * 14 <= 168 * 168
