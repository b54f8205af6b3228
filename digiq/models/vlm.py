"""The VLM layer: load any HF image-text-to-text model with its processor, or build a tiny random one.

``ModelConfig.name_or_path`` is one of

* a hub id (``llava-hf/llava-1.5-7b-hf``, the paper's default VLM; ``Qwen/Qwen2-VL-2B-Instruct``, ...),
* a local ``save_pretrained`` folder (ours or anyone's), or
* ``tiny:<family>`` with family in :data:`FAMILIES`: a randomly initialised model of the *same classes* as
  the real family, built from config objects with an offline byte-level BPE tokenizer. Tests, CI and the
  simulated-device default use these; nothing is downloaded (recipes: feasibility.md section 2).

Two environment quirks are handled here and nowhere else (feasibility.md section 1-2): torchvision is
absent, so every image processor is a ``*ImageProcessorPil``; and Qwen2-VL's processor wants a video
processor, so we use an image-only subclass, recorded in ``digiq_vlm.json`` so :func:`load_vlm` can
rebuild it from a saved folder. Image processors are set to *resize the whole screen* (no centre crop):
AitW / simulated screens are portrait and a crop would cut off the top and bottom bars.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from digiq.config import LoraConfig, ModelConfig
from digiq.errors import DigiqError
from digiq.utils.io import atomic_write_json
from digiq.utils.logging import get_logger

log = get_logger(__name__)

FAMILIES = ("llava", "qwen2-vl", "qwen2.5-vl", "idefics3", "smolvlm", "paligemma")
# Written next to save_pretrained output: the family and, where needed, our processor class.
META_FILE = "digiq_vlm.json"
# model_type (HF config) -> our family name.
MODEL_TYPE_FAMILY = {
    "llava": "llava",
    "qwen2_vl": "qwen2-vl",
    "qwen2_5_vl": "qwen2.5-vl",
    "idefics3": "idefics3",
    "smolvlm": "smolvlm",
    "paligemma": "paligemma",
}
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
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


# --------------------------------------------------------------------------------------------------
# Offline tokenizer
# --------------------------------------------------------------------------------------------------


def _tokenizer_corpus() -> list[str]:
    """Text the tiny BPE is trained on: AutoUI action strings, our prompts, chat templates and sim goals.

    Short tokens for these strings keep prompts short and let the behaviour-cloned policy (train-bc) emit
    actions in few decoding steps.
    """
    import random

    from digiq.actions import Action, ActionType, make_observation

    rng = random.Random(0)
    texts: list[str] = []
    goals = [
        "Turn on wifi",
        "Turn off bluetooth",
        "Open the settings",
        'Go to shopmart.com, search for "usb cable", and select the first entry',
    ]
    goals.extend(_frozen_sim_goals())
    actions: list[Action] = []
    for _ in range(400):
        y, x = rng.random(), rng.random()
        actions.append(Action.tap(y, x))
        actions.append(Action.swipe((y, x), (rng.random(), rng.random())))
    for word in ("usb cable", "yoga mat", "desk lamp", "phone case", "hello world", "wifi", "settings"):
        actions.append(Action.type_text(word))
    for t in (ActionType.PRESS_BACK, ActionType.PRESS_HOME, ActionType.PRESS_ENTER):
        actions.append(Action.key(t))
    actions += [Action(ActionType.STATUS_TASK_COMPLETE), Action(ActionType.STATUS_TASK_IMPOSSIBLE)]
    from digiq.models import prompts  # local import: prompts imports nothing from here at module level

    for i, a in enumerate(actions):
        goal = goals[i % len(goals)]
        prev = actions[(i * 7) % len(actions)]
        texts.append(a.render())
        texts.append(make_observation(goal, prev))
        for rendering in ("text", "overlay"):
            q = prompts.action_text(a, rendering)
            texts.append(prompts.user_prefix(goal, prev) + q + prompts.ANSWER_INSTRUCTION)
    texts.append(prompts.user_prefix(goals[0], None) + prompts.STATE_QUESTION + prompts.ANSWER_INSTRUCTION)
    for fam in FAMILIES:
        head, tail, ans = prompts.TEMPLATES[fam]
        for word in ("Yes", "No"):
            texts.extend([head + "x" + tail + ans + word + "</s>"] * 20)
    texts.extend(goals * 5)
    return texts


def _frozen_sim_goals() -> list[str]:
    """The simulated device's goals, frozen as package data (see the file's header for why)."""
    from importlib.resources import files

    text = (files("digiq.models") / "assets" / "tiny_tokenizer_goals.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line and not line.startswith("#")]


@functools.lru_cache(maxsize=4)
def _tokenizer_json(vocab_size: int) -> str:
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
    tk.train_from_iterator(_tokenizer_corpus(), trainer)
    return tk.to_str()


def build_tokenizer(vocab_size: int = 2048):
    """A deterministic offline byte-level BPE (``PreTrainedTokenizerFast``, left padding)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    tok.padding_side = "left"
    return tok


# --------------------------------------------------------------------------------------------------
# Processors
# --------------------------------------------------------------------------------------------------


def _qwen_image_only_class(base: type) -> type:
    """A subclass of a Qwen-VL processor without the video processor (it needs torchvision)."""
    from transformers import ProcessorMixin

    class _ImageOnly(base):  # type: ignore[misc, valid-type]
        attributes = ["image_processor", "tokenizer"]

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

        @classmethod
        def get_attributes(cls):  # transformers 5 derives attributes from __init__; pin them
            return ["image_processor", "tokenizer"]

    _ImageOnly.__name__ = base.__name__ + "ImageOnly"
    return _ImageOnly


def qwen_image_only_processor(family: str):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor

    return _qwen_image_only_class(Qwen2_5_VLProcessor if family == "qwen2.5-vl" else Qwen2VLProcessor)


def _no_crop(ip: Any, image_size: int | None) -> Any:
    """Resize the whole (portrait) screen, never centre-crop it."""
    if hasattr(ip, "do_center_crop"):
        ip.do_center_crop = False
    if image_size is not None and hasattr(ip, "size") and isinstance(ip.size, dict):
        if "shortest_edge" in ip.size or "height" in ip.size:
            ip.size = {"height": image_size, "width": image_size}
    return ip


def _tiny_processor(family: str, tok, spec: TinySpec):
    from transformers import (
        CLIPImageProcessorPil,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        LlavaProcessor,
        PaliGemmaProcessor,
        Qwen2VLImageProcessorPil,
        SiglipImageProcessorPil,
        SmolVLMImageProcessorPil,
    )

    s = spec.image_size
    if family == "llava":
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
    if family in ("qwen2-vl", "qwen2.5-vl"):
        # Native aspect ratio: the portrait screen becomes a portrait grid of 28x28 merged patches.
        ip = Qwen2VLImageProcessorPil(
            min_pixels=(s // 2) * (s // 2),
            max_pixels=s * s,
            patch_size=14,
            merge_size=2,
            temporal_patch_size=2,
        )
        return qwen_image_only_processor(family)(image_processor=ip, tokenizer=tok)
    if family in ("idefics3", "smolvlm"):
        cls = SmolVLMImageProcessorPil if family == "smolvlm" else Idefics3ImageProcessorPil
        ip = cls(do_image_splitting=False, size={"longest_edge": s}, max_image_size={"longest_edge": s})
        # SmolVLMProcessor needs a video processor and num2words: the Idefics3 processor is equivalent here.
        return Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=(s // spec.patch // 2) ** 2)
    if family == "paligemma":
        ip = SiglipImageProcessorPil(size={"height": s, "width": s})
        ip.image_seq_length = (s // spec.patch) ** 2
        return PaliGemmaProcessor(image_processor=ip, tokenizer=tok)
    raise DigiqError(f"unknown tiny VLM family {family!r}; choose one of {FAMILIES}")


# --------------------------------------------------------------------------------------------------
# Tiny random models
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


def _tiny_model_config(family: str, tok, spec: TinySpec):
    import transformers as tf

    s, p = spec.image_size, spec.patch
    if family == "llava":
        vision = tf.CLIPVisionConfig(
            hidden_size=spec.vision_hidden,
            intermediate_size=spec.vision_hidden * 2,
            num_hidden_layers=spec.vision_layers,
            num_attention_heads=4,
            image_size=s,
            patch_size=p,
        )
        text = tf.LlamaConfig(**_text_config(tok, spec))
        return tf.LlavaConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=tok.convert_tokens_to_ids("<image>"),
            vision_feature_select_strategy="default",
            vision_feature_layer=-1,
        )
    if family in ("qwen2-vl", "qwen2.5-vl"):
        head_dim = spec.hidden // spec.heads
        half = head_dim // 2
        mrope = [half - 2 * (half // 3), half // 3, half // 3]
        text = _text_config(
            tok, spec, rope_parameters={"rope_type": "default", "mrope_section": mrope, "rope_theta": 1e4}
        )
        ids = dict(
            image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
            video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
            vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
            vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
        )
        if family == "qwen2-vl":
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
            return tf.Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
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
        return tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    if family in ("idefics3", "smolvlm"):
        vision = dict(
            hidden_size=spec.vision_hidden,
            intermediate_size=spec.vision_hidden * 2,
            num_hidden_layers=spec.vision_layers,
            num_attention_heads=4,
            image_size=s,
            patch_size=p,
        )
        text = _text_config(tok, spec)
        cls = tf.SmolVLMConfig if family == "smolvlm" else tf.Idefics3Config
        return cls(
            vision_config=vision,
            text_config=text,
            image_token_id=tok.convert_tokens_to_ids("<image>"),
            scale_factor=2,
            pad_token_id=tok.pad_token_id,
        )
    if family == "paligemma":
        vision = dict(
            hidden_size=spec.vision_hidden,
            intermediate_size=spec.vision_hidden * 2,
            num_hidden_layers=spec.vision_layers,
            num_attention_heads=4,
            image_size=s,
            patch_size=p,
            projection_dim=spec.hidden,
        )
        text = _text_config(tok, spec, head_dim=spec.hidden // spec.heads)
        return tf.PaliGemmaConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=tok.convert_tokens_to_ids("<image>"),
            projection_dim=spec.hidden,
            hidden_size=spec.hidden,
        )
    raise DigiqError(f"unknown tiny VLM family {family!r}; choose one of {FAMILIES}")


def build_tiny_vlm(family: str, spec: TinySpec | None = None, seed: int = 0, dtype: str = "float32"):
    """A random tiny VLM of the real family's classes plus its processor: ``(model, processor)``."""
    from transformers import AutoModelForImageTextToText

    spec = spec or TinySpec()
    if family not in FAMILIES:
        raise DigiqError(f"unknown tiny VLM family {family!r}; choose one of {FAMILIES}")
    tok = build_tokenizer(spec.vocab_size)
    processor = _tiny_processor(family, tok, spec)
    # PaliGemma's processor adds <image> and 1024 loc / 128 seg tokens: size the vocab after building it.
    config = _tiny_model_config(family, processor.tokenizer, spec)
    with _fork_rng(seed):
        model = AutoModelForImageTextToText.from_config(config, dtype=DTYPES[dtype])
    model.eval()
    processor.digiq_family = family
    return model, processor


class _fork_rng:
    """Seed torch for building weights without disturbing the caller's RNG stream."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self.state = torch.get_rng_state()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc: object) -> None:
        torch.set_rng_state(self.state)


# --------------------------------------------------------------------------------------------------
# Loading, saving, LoRA
# --------------------------------------------------------------------------------------------------


def family_of(model_or_config: Any) -> str:
    """Our family name from a model / config's ``model_type`` (``llava``, ``qwen2-vl``, ...)."""
    cfg = getattr(model_or_config, "config", model_or_config)
    mt = getattr(cfg, "model_type", "")
    if mt not in MODEL_TYPE_FAMILY:
        # A PeftModel wraps the HF model: look one level down.
        base = getattr(model_or_config, "base_model", None)
        inner = getattr(base, "model", None)
        if inner is not None and inner is not model_or_config:
            return family_of(inner)
        raise DigiqError(f"unsupported VLM model_type {mt!r}; supported: {sorted(MODEL_TYPE_FAMILY)}")
    return MODEL_TYPE_FAMILY[mt]


def _load_processor(path: str, family: str | None, meta: dict[str, Any]):
    from transformers import AutoProcessor

    if meta.get("processor") == "qwen-image-only" or (family in ("qwen2-vl", "qwen2.5-vl")):
        try:
            return qwen_image_only_processor(family or "qwen2-vl").from_pretrained(path)
        except Exception:  # noqa: BLE001 - fall back to the stock class where torchvision exists
            pass
    if family in ("idefics3", "smolvlm"):
        from transformers import Idefics3Processor

        try:
            return Idefics3Processor.from_pretrained(path)
        except Exception:  # noqa: BLE001
            pass
    return AutoProcessor.from_pretrained(path)


def parse_tiny_name(name: str) -> tuple[str, TinySpec]:
    """``tiny:<family>[@key=value,...]`` -> (family, TinySpec); e.g. ``tiny:qwen2-vl@image_size=168,hidden=192``."""
    from dataclasses import fields, replace

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


def load_vlm(cfg: ModelConfig | str, lora: LoraConfig | None = None, for_training: bool = False):
    """Load ``(model, processor)`` from a hub id, a local folder or ``tiny:<family>``.

    A folder holding a peft adapter (``adapter_config.json``) loads its base model first, then the
    adapter (trainable when ``for_training``). ``lora.enabled`` wraps a *plain* model in fresh LoRA; an
    already loaded PeftModel is never wrapped twice (lerobot #3459).
    """
    from transformers import AutoModelForImageTextToText

    if isinstance(cfg, str):
        cfg = ModelConfig(name_or_path=cfg)
    name = cfg.name_or_path
    if name.startswith("tiny:"):
        family, spec = parse_tiny_name(name)
        model, processor = build_tiny_vlm(family, spec, seed=cfg.tiny_seed, dtype=cfg.dtype)
    else:
        path = Path(name)
        meta = json.loads((path / META_FILE).read_text()) if (path / META_FILE).is_file() else {}
        if (path / "adapter_config.json").is_file():
            from peft import PeftModel

            base_name = meta.get("base") or json.loads((path / "adapter_config.json").read_text()).get(
                "base_model_name_or_path"
            )
            base_cfg = ModelConfig(
                **{
                    **cfg.__dict__,
                    "name_or_path": base_name,
                    "tiny_seed": int(meta.get("tiny_seed", cfg.tiny_seed)),
                }
            )
            base, _ = load_vlm(base_cfg)
            model = PeftModel.from_pretrained(base, str(path), is_trainable=for_training)
            family = family_of(base)
            processor = _load_processor(str(path), family, meta)
        else:
            kwargs: dict[str, Any] = {"dtype": DTYPES[cfg.dtype]}
            if cfg.attn_implementation:
                kwargs["attn_implementation"] = cfg.attn_implementation
            try:
                model = AutoModelForImageTextToText.from_pretrained(name, **kwargs)
            except (OSError, ValueError) as e:
                raise DigiqError(f"cannot load VLM {name!r}: {e}") from e
            family = meta.get("family") or family_of(model)
            processor = _load_processor(name, family, meta)
        _configure_processor(processor, family)
    processor.digiq_family = family
    if hasattr(processor, "tokenizer"):
        processor.tokenizer.padding_side = "left"
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    if lora is not None and lora.enabled and not _is_peft(model):
        model = apply_lora(model, lora)
    return model, processor


def _configure_processor(processor, family: str) -> None:
    """Portrait screens: resize the whole image, never centre-crop (e.g. LLaVA's CLIP processor crops)."""
    ip = getattr(processor, "image_processor", None)
    if ip is not None and getattr(ip, "do_center_crop", False):
        crop = getattr(ip, "crop_size", None) or {}
        side = crop.get("height") if isinstance(crop, dict) else None
        _no_crop(ip, side)


def _is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


def apply_lora(model, lora: LoraConfig):
    """Wrap ``model`` in peft LoRA on the modules matching ``lora.target_modules`` (a regex)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    if _is_peft(model):
        raise DigiqError("model already has LoRA adapters; refusing to wrap a PeftModel twice")
    pattern = re.compile(lora.target_modules)
    if not any(pattern.fullmatch(n) for n, _ in model.named_modules()):
        raise DigiqError(f"lora.target_modules {lora.target_modules!r} matches no module of the model")
    pc = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias="none",
    )
    return get_peft_model(model, pc)


def save_vlm(
    model,
    processor,
    out_dir: str | Path,
    merge_lora: bool = True,
    base: str | None = None,
    tiny_seed: int = 0,
) -> Path:
    """``save_pretrained`` model + processor into ``out_dir`` (plus ``digiq_vlm.json``) for :func:`load_vlm`.

    A PeftModel is merged into plain weights when ``merge_lora``; else only the adapter is written and
    ``base`` (the base model's name_or_path) is recorded so loading can rebuild it. A ``tiny:`` base is
    rebuilt deterministically from its seed.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    family = getattr(processor, "digiq_family", None) or family_of(model)
    meta: dict[str, Any] = {"family": family}
    if _is_peft(model):
        if merge_lora:
            model = model.merge_and_unload()
        else:
            meta["base"] = base
            meta["tiny_seed"] = tiny_seed
    model.save_pretrained(str(out_dir), safe_serialization=True)
    processor.save_pretrained(str(out_dir))
    if family in ("qwen2-vl", "qwen2.5-vl"):
        meta["processor"] = "qwen-image-only"
    atomic_write_json(out_dir / META_FILE, meta)
    return out_dir


def num_text_layers(model) -> int:
    cfg = model.config
    text = getattr(cfg, "text_config", None) or cfg
    return int(text.num_hidden_layers)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------------
# Forward passes: answer logits and features
# --------------------------------------------------------------------------------------------------


def unwrap(model):
    """The HF ``*ForConditionalGeneration`` model under a PeftModel / DDP wrapper."""
    m = getattr(model, "module", model)  # DDP
    if _is_peft(m):
        m = m.get_base_model()
    return m


def default_feature_layer(model) -> int:
    """An intermediate layer (3/4 of the depth): the default feature layer for Stage 2."""
    n = num_text_layers(unwrap(model))
    return max(1, (3 * n) // 4)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-pad token per row (correct for left *and* right padding)."""
    L = attention_mask.shape[1]
    pos = torch.arange(L, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), pos, torch.full_like(pos, -1)).max(dim=1).values


def answer_logits(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token logits (B, V) at the last prompt token, computing the LM head for that position only.

    Inputs must be left-padded (as :func:`digiq.models.prompts.make_inputs` makes them), so the last
    position is the last prompt token of every row.
    """
    out = model(**inputs, logits_to_keep=1, use_cache=False)
    return out.logits[:, -1, :]


def extract_features(model, inputs: dict[str, torch.Tensor], layer: int | None = None) -> torch.Tensor:
    """The hidden state (B, D) of text-model layer ``layer`` at the last non-pad token, no LM head.

    ``layer`` counts like ``output_hidden_states``: 0 = token embeddings, k = output of decoder layer k;
    negative counts from the end with ``-1`` = the last layer's output *after the final norm* (the
    official gradio path's ``layer_id=-1``, host.py:78-84). ``None`` = :func:`default_feature_layer`.
    Deterministic: no generation, no sampling (the official path samples at temperature 0.2).
    """
    hf = unwrap(model)
    n = num_text_layers(hf)
    if layer is None:
        layer = default_feature_layer(hf)
    index = layer if layer >= 0 else n + 1 + layer
    if not 0 <= index <= n:
        raise ValueError(f"layer {layer} is out of range for a text model with {n} layers")
    base = hf.model  # the *Model under *ForConditionalGeneration: no LM head
    hidden = hidden_at(base, index, **inputs, use_cache=False, return_dict=True)
    idx = last_token_index(inputs["attention_mask"]).to(hidden.device)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]


class _EarlyExit(Exception):
    """Raised by a pre-hook to stop a forward pass once the wanted hidden state is captured."""


def decoder_layers(base) -> torch.nn.ModuleList | None:
    """The text decoder's layer list under a ``*Model`` (llava/qwen/paligemma: language_model, idefics3: text_model)."""
    for name in ("language_model", "text_model"):
        lm = getattr(base, name, None)
        layers = getattr(lm, "layers", None)
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    return None


@contextlib.contextmanager
def _stop_before(layer: torch.nn.Module):
    """Within the block, a forward that reaches ``layer`` records its input hidden state and stops there."""
    captured: list[torch.Tensor] = []

    def grab(_module, args, kwargs):
        captured.append(args[0] if args else kwargs["hidden_states"])
        raise _EarlyExit

    handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        yield captured
    except _EarlyExit:
        pass
    finally:
        handle.remove()


def hidden_at(base, index: int, **kwargs: Any) -> torch.Tensor:
    """``base(**kwargs)``'s ``output_hidden_states[index]`` (B, L, D), running no decoder layer >= ``index``.

    ``index`` = the number of layers gives the last hidden state after the final norm (a full pass). Layers
    above the feature layer cost a quarter of the text forward at the default 3/4 depth and change nothing
    in the feature: a pre-hook on layer ``index`` captures its input and stops the pass. A KV cache passed
    in ``kwargs`` is filled for the layers that ran. tests/test_vlm.py checks the values against a full
    ``output_hidden_states`` forward for every family and that the layers above never run.
    """
    layers = decoder_layers(base)
    if layers is not None and index == len(layers):
        return base(**kwargs).last_hidden_state
    if layers is None or index > len(layers):  # unknown layout: a full pass
        return base(**kwargs, output_hidden_states=True).hidden_states[index]
    with _stop_before(layers[index]) as captured:
        base(**kwargs)
    if not captured:
        raise RuntimeError(f"decoder layer {index} was never called: cannot take its input as the feature")
    return captured[0]
