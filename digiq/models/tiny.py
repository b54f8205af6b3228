"""``tiny:<family>`` models: random VLMs of a real family's classes, built offline from config objects.

A tiny model is named by its family, a :class:`TinySpec` and a seed, and saved adapters and feature caches
rebuild their ``tiny:`` base from that name alone, so the same name must give the same model on every
machine and in every later version. Everything it depends on is therefore pinned here: the byte-level BPE
tokenizer (its training text and special tokens) and, per family, a processor and a model config of the real
classes. Each :class:`digiq.models.families.FamilySpec` points at its family's two builders below.

Torchvision is absent where this runs (CPU CI images), so every image processor is a ``*ImageProcessorPil``.
Nothing is downloaded.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from digiq.errors import DigiqError


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a tiny random VLM. The defaults train Stage 1 on the simulated device in minutes on 2 CPUs."""

    # Text model width / depth (the feature layer is one of these layers' outputs).
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    # Vision tower.
    vision_hidden: int = 128
    vision_layers: int = 2
    # Square side (LLaVA / PaliGemma / Idefics3) or pixel budget side (Qwen) the screen is resized to.
    image_size: int = 112
    # LLaVA/PaliGemma patch; Qwen uses 14 (merge 2x2) as the real models.
    patch: int = 8
    vocab_size: int = 2048


def parse_tiny_name(name: str) -> tuple[str, TinySpec]:
    """``tiny:<family>[@key=value,...]`` -> (family, TinySpec); e.g. ``tiny:qwen2-vl@image_size=168,hidden=192``."""
    body = name.split(":", 1)[1]
    family, _, opts = body.partition("@")
    spec = TinySpec()
    if opts:
        known = {f.name for f in fields(TinySpec)}
        kwargs = {}
        for item in opts.split(","):
            key, eq, value = item.partition("=")
            if not eq or key.strip() not in known or not value.strip().isdigit():
                raise DigiqError(
                    f"bad tiny model option {item!r} in {name!r}; options: {sorted(known)} (integers)"
                )
            kwargs[key.strip()] = int(value)
        spec = replace(spec, **kwargs)
    return family, spec


# --------------------------------------------------------------------------------------------------
# Offline tokenizer
# --------------------------------------------------------------------------------------------------

# Every family's special tokens, in one shared vocabulary. Frozen with the training text: a family that needs
# another special token adds it in its own tiny processor builder (``tokenizer.add_special_tokens`` appends
# ids after the existing ones, as PaliGemma's processor does with its loc / seg tokens), so the other
# families' ids never move.
SPECIAL_TOKENS = [
    "<pad>",
    "<s>",
    "</s>",
    "<unk>",
    "<image>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|im_start|>",
    "<|im_end|>",
    "<fake_token_around_image>",
    "<global-img>",
    "<end_of_utterance>",
    "<|begin_of_text|>",
]


@functools.lru_cache(maxsize=4)
def tokenizer_json(texts: tuple[str, ...], vocab_size: int) -> str:
    """A byte-level BPE with :data:`SPECIAL_TOKENS` trained on ``texts``, as JSON (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer)
    return tk.to_str()


def build_tokenizer(texts: Sequence[str], vocab_size: int = 2048):
    """A fresh ``PreTrainedTokenizerFast`` (left padding) of the BPE trained on ``texts``.

    Fresh on every call: processors add tokens to their tokenizer (PaliGemma), so it is never shared.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer_json(tuple(texts), vocab_size)),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    tok.padding_side = "left"
    return tok


# --------------------------------------------------------------------------------------------------
# Per-family builders: ``processor(family, tokenizer, spec)`` and ``config(tokenizer, spec)``
# --------------------------------------------------------------------------------------------------


def _text_config(tok, spec: TinySpec, **extra: Any) -> dict[str, Any]:
    return dict(
        vocab_size=len(tok),
        hidden_size=spec.hidden,
        intermediate_size=spec.hidden * 2,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        **extra,
    )


def _vision_config(spec: TinySpec, **extra: Any) -> dict[str, Any]:
    """A CLIP / SigLIP-style vision tower (LLaVA, Idefics3, SmolVLM, PaliGemma)."""
    return dict(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_hidden * 2,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=4,
        image_size=spec.image_size,
        patch_size=spec.patch,
        **extra,
    )


def llava_processor(family, tok, spec: TinySpec):
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    s = spec.image_size
    ip = CLIPImageProcessorPil(
        size={"height": s, "width": s}, crop_size={"height": s, "width": s}, do_center_crop=False
    )
    return LlavaProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=spec.patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def llava_config(tok, spec: TinySpec):
    import transformers as tf

    return tf.LlavaConfig(
        vision_config=tf.CLIPVisionConfig(**_vision_config(spec)),
        text_config=tf.LlamaConfig(**_text_config(tok, spec)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )


def qwen_processor(family, tok, spec: TinySpec):
    """Native aspect ratio: the portrait screen becomes a portrait grid of 28x28 merged patches."""
    from transformers import Qwen2VLImageProcessorPil

    s = spec.image_size
    ip = Qwen2VLImageProcessorPil(
        min_pixels=(s // 2) * (s // 2),
        max_pixels=s * s,
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
    )
    return family.processor_loader()(image_processor=ip, tokenizer=tok)


def _qwen_text_and_ids(tok, spec: TinySpec) -> tuple[dict[str, Any], dict[str, int]]:
    head_dim = spec.hidden // spec.heads
    half = head_dim // 2
    mrope = [half - 2 * (half // 3), half // 3, half // 3]  # M-RoPE's (t, h, w) split of the rotary dims
    text = _text_config(
        tok, spec, rope_parameters={"rope_type": "default", "mrope_section": mrope, "rope_theta": 1e4}
    )
    ids = dict(
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
    )
    return text, ids


def qwen2_vl_config(tok, spec: TinySpec):
    from transformers import Qwen2VLConfig

    text, ids = _qwen_text_and_ids(tok, spec)
    vision = dict(
        depth=spec.vision_layers,
        embed_dim=spec.vision_hidden,
        hidden_size=spec.hidden,
        mlp_ratio=2,
        num_heads=4,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    return Qwen2VLConfig(text_config=text, vision_config=vision, **ids)


def qwen2_5_vl_config(tok, spec: TinySpec):
    from transformers import Qwen2_5_VLConfig

    text, ids = _qwen_text_and_ids(tok, spec)
    vision = dict(
        depth=spec.vision_layers,
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_hidden * 2,
        num_heads=4,
        out_hidden_size=spec.hidden,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=56,
        fullatt_block_indexes=[spec.vision_layers - 1],
    )
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)


def idefics3_processor(family, tok, spec: TinySpec, image_processor: str = "Idefics3ImageProcessorPil"):
    """One un-split image per prompt. Also SmolVLM's: SmolVLMProcessor needs a video processor and num2words,
    and for one un-split image both expand the same tokens (transformers' ``Idefics3Processor.replace_image_token``
    and ``processing_smolvlm._prompt_single_image``)."""
    import transformers as tf

    s = spec.image_size
    ip = getattr(tf, image_processor)(
        do_image_splitting=False, size={"longest_edge": s}, max_image_size={"longest_edge": s}
    )
    return tf.Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=(s // spec.patch // 2) ** 2)


def idefics3_config(tok, spec: TinySpec, config: str = "Idefics3Config"):
    import transformers as tf

    return getattr(tf, config)(
        vision_config=_vision_config(spec),
        text_config=_text_config(tok, spec),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=2,
        pad_token_id=tok.pad_token_id,
    )


def paligemma_processor(family, tok, spec: TinySpec):
    """PaliGemma's processor adds ``<image>`` and the 1024 loc / 128 seg tokens to the tokenizer."""
    from transformers import PaliGemmaProcessor, SiglipImageProcessorPil

    s = spec.image_size
    ip = SiglipImageProcessorPil(size={"height": s, "width": s})
    ip.image_seq_length = (s // spec.patch) ** 2
    return PaliGemmaProcessor(image_processor=ip, tokenizer=tok)


def paligemma_config(tok, spec: TinySpec):
    from transformers import PaliGemmaConfig

    return PaliGemmaConfig(
        vision_config=_vision_config(spec, projection_dim=spec.hidden),
        text_config=_text_config(tok, spec, head_dim=spec.hidden // spec.heads),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        projection_dim=spec.hidden,
        hidden_size=spec.hidden,
    )
