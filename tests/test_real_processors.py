"""Image processors set up as the real checkpoints ship them, on phone-shaped screenshots, offline.

The tiny models of the other tests use tiny square processors; a real LLaVA-1.5 / Qwen2-VL / Idefics3 /
SmolVLM / PaliGemma processor has its own sizes (values below from each checkpoint's
``preprocessor_config.json`` on the HF hub, written out here because nothing may be downloaded). Each test
saves a tiny model of the family at the real image size together with the real processor, loads the folder
through :func:`digiq.models.vlm.load_vlm` (which adapts the processor to portrait screens), builds the digiq
prompt for a 1080 x 2400 and a 1440 x 3120 screenshot, checks the pixel tensors have the shape the real
model accepts and runs a forward.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from digiq.actions import Action
from digiq.models import prompts as P
from digiq.models.tiny import TinySpec
from digiq.models.tiny_text import default_tokenizer
from digiq.models.vlm import answer_logits, build_tiny_vlm, load_vlm, save_vlm

PHONES = [(1080, 2400), (1440, 3120)]
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
# Small text and vision stacks: the image sizes are the real ones, the widths are not.
SMALL = dict(hidden=32, layers=2, heads=2, kv_heads=1, vision_hidden=32, vision_layers=1)


def _screen(size: tuple[int, int]) -> Image.Image:
    img = Image.new("RGB", size, (235, 235, 240))
    d = ImageDraw.Draw(img)
    d.rectangle([0, 0, size[0], size[1] // 12], fill=(30, 60, 160))  # a status / app bar
    d.rectangle(
        [size[0] // 10, size[1] // 3, size[0] * 9 // 10, size[1] // 3 + size[1] // 15], fill=(20, 20, 20)
    )
    return img


def _run(model, processor, tmp_path: Path, screen: Image.Image):
    """Save + load through load_vlm, build the digiq prompt (overlay rendering), run the model."""
    save_vlm(model, processor, tmp_path / "m")
    model2, processor2 = load_vlm(str(tmp_path / "m"))
    inputs = P.make_inputs(
        processor2, [screen], ["Turn on wifi"], [None], [Action.tap(0.4, 0.5)], rendering="overlay"
    )
    with torch.no_grad():
        logits = answer_logits(model2, inputs)
    assert torch.isfinite(logits).all()
    return inputs


@pytest.mark.slow
@pytest.mark.parametrize("size", PHONES)
def test_llava_1_5_clip_336(size, tmp_path):
    """llava-hf/llava-1.5-7b-hf: CLIP, shortest edge 336 then a 336 centre crop. The crop would cut a
    portrait screen's top and bottom; load_vlm resizes the whole screen to 336 x 336 instead (transformers
    5 keeps sizes in a SizeDict, which the earlier dict check missed: 746 x 336 pixels, refused by CLIP)."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    model, _ = build_tiny_vlm("llava", TinySpec(image_size=336, patch=14, **SMALL))
    ip = CLIPImageProcessorPil(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        do_center_crop=True,
        resample=3,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    processor = LlavaProcessor(
        image_processor=ip,
        tokenizer=default_tokenizer(),
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    inputs = _run(model, processor, tmp_path, _screen(size))
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 336, 336)
    assert int((inputs["input_ids"] == model.config.image_token_index).sum()) == 576  # (336 / 14)^2


@pytest.mark.slow
@pytest.mark.parametrize("size", PHONES)
def test_qwen2_vl_min_max_pixels(size, tmp_path):
    """Qwen/Qwen2-VL-2B-Instruct: native aspect ratio between min_pixels 56*56 and max_pixels 28*28*16384,
    14-px patches merged 2 x 2. The forward uses the model card's lighter max_pixels = 1280*28*28."""
    from transformers import Qwen2VLImageProcessorPil

    from digiq.models.families import FAMILIES

    real = Qwen2VLImageProcessorPil(
        min_pixels=56 * 56, max_pixels=28 * 28 * 16384, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    out = real(images=[_screen(size)], return_tensors="pt")
    t, h, w = out["image_grid_thw"][0].tolist()
    assert t == 1 and h % 2 == 0 and w % 2 == 0 and h > w  # a portrait grid of whole 2 x 2 merges
    assert abs(h * 14 - size[1]) <= 28 and abs(w * 14 - size[0]) <= 28  # below max_pixels: the real size
    assert tuple(out["pixel_values"].shape) == (h * w, 3 * 2 * 14 * 14)

    model, _ = build_tiny_vlm("qwen2-vl", TinySpec(**SMALL))
    ip = Qwen2VLImageProcessorPil(
        min_pixels=256 * 28 * 28,
        max_pixels=1280 * 28 * 28,
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
    )
    processor = FAMILIES["qwen2-vl"].processor_loader()(image_processor=ip, tokenizer=default_tokenizer())
    inputs = _run(model, processor, tmp_path, _screen(size))
    t, h, w = inputs["image_grid_thw"][0].tolist()
    assert 256 * 4 <= h * w <= 1280 * 4 and h > w
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == h * w // 4


def _idefics_like(family: str, tile: int, scale: int, screen: tuple[int, int], tmp_path: Path, **ip_kwargs):
    import transformers as tf

    from digiq.models.families import FAMILIES

    fam = FAMILIES[family]
    spec = TinySpec(image_size=tile, patch=14, **SMALL)
    tok = default_tokenizer()
    ip_cls = tf.SmolVLMImageProcessorPil if family == "smolvlm" else tf.Idefics3ImageProcessorPil
    ip = ip_cls(do_image_splitting=True, **ip_kwargs)
    seq = (tile // 14 // scale) ** 2
    processor = tf.Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=seq)
    config = fam.tiny_config(processor.tokenizer, spec)
    config.scale_factor = scale
    model = tf.AutoModelForImageTextToText.from_config(config).eval()
    inputs = _run(model, processor, tmp_path, _screen(screen))
    pv = inputs["pixel_values"]
    n_tiles = pv.shape[1]
    assert tuple(pv.shape[2:]) == (3, tile, tile) and n_tiles > 2  # split into tiles plus the global view
    assert int((inputs["input_ids"] == config.image_token_id).sum()) == n_tiles * seq
    return n_tiles


@pytest.mark.slow
@pytest.mark.parametrize("size", PHONES)
def test_idefics3_longest_edge_and_splitting(size, tmp_path):
    """HuggingFaceM4/Idefics3-8B-Llama3: longest edge 4 * 364, split into 364-px tiles + a global view,
    169 tokens per tile (26 x 26 patches, pixel shuffle 2)."""
    n = _idefics_like(
        "idefics3",
        364,
        2,
        size,
        tmp_path,
        size={"longest_edge": 4 * 364},
        max_image_size={"longest_edge": 364},
    )
    assert n == 4 * 2 + 1  # a portrait screen: 4 rows x 2 columns of tiles


@pytest.mark.slow
@pytest.mark.parametrize("size", PHONES)
def test_smolvlm_longest_edge_and_splitting(size, tmp_path):
    """HuggingFaceTB/SmolVLM-Instruct: longest edge 4 * 384, 384-px tiles, 81 tokens per tile (pixel shuffle
    3)."""
    n = _idefics_like(
        "smolvlm",
        384,
        3,
        size,
        tmp_path,
        size={"longest_edge": 4 * 384},
        max_image_size={"longest_edge": 384},
    )
    assert n == 4 * 2 + 1


@pytest.mark.slow
@pytest.mark.parametrize("side", [224, 448])
def test_paligemma_224_and_448(side, tmp_path):
    """google/paligemma-3b-pt-224 / -448: SigLIP, the whole screen resized to side x side, 14-px patches."""
    from transformers import PaliGemmaProcessor, SiglipImageProcessorPil

    model, _ = build_tiny_vlm("paligemma", TinySpec(image_size=side, patch=14, **SMALL))
    ip = SiglipImageProcessorPil(size={"height": side, "width": side}, resample=3)
    ip.image_seq_length = (side // 14) ** 2
    processor = PaliGemmaProcessor(image_processor=ip, tokenizer=default_tokenizer())
    inputs = _run(model, processor, tmp_path, _screen(PHONES[0]))
    assert tuple(inputs["pixel_values"].shape) == (1, 3, side, side)
    assert int((inputs["input_ids"] == model.config.image_token_index).sum()) == (side // 14) ** 2


def _qwen2_vl_folder(tmp_path: Path) -> Path:
    """A tiny Qwen2-VL saved with the real checkpoint's image processor (min_pixels 56*56, max_pixels
    28*28*16384, from Qwen/Qwen2-VL-2B-Instruct's preprocessor_config.json)."""
    from transformers import Qwen2VLImageProcessorPil

    from digiq.models.families import FAMILIES

    model, _ = build_tiny_vlm("qwen2-vl", TinySpec(**SMALL))
    ip = Qwen2VLImageProcessorPil(
        min_pixels=56 * 56, max_pixels=28 * 28 * 16384, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    processor = FAMILIES["qwen2-vl"].processor_loader()(image_processor=ip, tokenizer=default_tokenizer())
    save_vlm(model, processor, tmp_path / "qwen")
    return tmp_path / "qwen"


def _image_tokens(cfg, screen: tuple[int, int]) -> int:
    model, processor = load_vlm(cfg)
    inputs = P.make_inputs(
        processor, [_screen(screen)], ["Turn on wifi"], [None], [Action.tap(0.4, 0.5)], "overlay"
    )
    t, h, w = inputs["image_grid_thw"][0].tolist()
    n = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n == t * h * w // 4  # the prompt holds one token per merged 2 x 2 patch
    return n


@pytest.mark.parametrize("size", PHONES)
def test_qwen2_vl_max_pixels_sets_the_image_tokens(size, tmp_path):
    """model.max_pixels reaches the real Qwen2-VL image processor: with the checkpoint's budget a phone screen
    keeps its resolution (each side rounded to 28 px: 86 x 39 merged patches for 1080 x 2400, 111 x 51 for
    1440 x 3120); with max_pixels = 1280*28*28 it drops under the budget. digiq.training.memory (the memory
    table) counts the same tokens."""
    from digiq.config import ModelConfig
    from digiq.training.memory import qwen2_vl_tokens

    folder = str(_qwen2_vl_folder(tmp_path))
    w, h = size
    native = round(h / 28) * round(w / 28)  # the processor's formula below max_pixels
    assert native == {(1080, 2400): 3354, (1440, 3120): 5661}[size]
    assert _image_tokens(ModelConfig(name_or_path=folder), size) == native == qwen2_vl_tokens(w, h)[0]
    budget = 1280 * 28 * 28
    capped = _image_tokens(ModelConfig(name_or_path=folder, max_pixels=budget), size)
    assert capped == qwen2_vl_tokens(w, h, max_pixels=budget)[0]
    assert capped * 4 * 14 * 14 <= budget and capped < native / 2
    # a budget above the screen changes nothing; min_pixels above it upscales
    assert _image_tokens(ModelConfig(name_or_path=folder, max_pixels=4 * w * h), size) == native
    assert (
        _image_tokens(ModelConfig(name_or_path=folder, min_pixels=2 * w * h, max_pixels=4 * w * h), size)
        > native
    )


def test_max_pixels_is_refused_where_it_does_not_apply(tmp_path):
    from digiq.config import ModelConfig
    from digiq.errors import DigiqError

    with pytest.raises(
        DigiqError, match=r"model.max_pixels / model.min_pixels apply to the Qwen-VL .* llava model"
    ):
        load_vlm(ModelConfig(name_or_path="tiny:llava", max_pixels=1280 * 28 * 28))
    folder = str(_qwen2_vl_folder(tmp_path))
    with pytest.raises(DigiqError, match=r"need 0 < model.min_pixels \(5000\) <= model.max_pixels \(4000\)"):
        load_vlm(ModelConfig(name_or_path=folder, min_pixels=5000, max_pixels=4000))
