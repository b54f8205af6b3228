"""The VLM layer: load any HF image-text-to-text model with its processor, or build a tiny random one.

``ModelConfig.name_or_path`` is one of

* a hub id (``llava-hf/llava-1.5-7b-hf``, the paper's default VLM; ``Qwen/Qwen2-VL-2B-Instruct``, ...),
* a local ``save_pretrained`` folder (ours or anyone's), or
* ``tiny:<family>`` with family in :data:`FAMILIES`: a randomly initialised model of the *same classes* as
  the real family, built from config objects with an offline byte-level BPE tokenizer
  (:mod:`digiq.models.tiny`). Tests, CI and the simulated-device default use these; nothing is downloaded.

What differs between families (processor class, decoder layout, ...) is read from their
:class:`~digiq.models.families.FamilySpec`; this module holds no per-family branch. The family is recorded
in ``digiq_vlm.json`` next to a saved model so :func:`load_vlm` rebuilds the same processor. Image processors
are set to *resize the whole screen* (no centre crop): AitW / simulated screens are portrait and a crop
would cut off the top and bottom bars.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from transformers.image_utils import SizeDict

from digiq.config import LoraConfig, ModelConfig
from digiq.errors import DigiqError, model_unavailable
from digiq.models.families import BY_MODEL_TYPE, FAMILIES
from digiq.models.tiny import TinySpec, parse_tiny_name
from digiq.models.tiny_text import default_tokenizer
from digiq.utils.io import atomic_write_json
from digiq.utils.logging import get_logger

log = get_logger(__name__)

# Written next to save_pretrained output: the family and, where needed, our processor class.
META_FILE = "digiq_vlm.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(name: str) -> torch.dtype:
    """A ModelConfig dtype; 'auto' left unresolved by the caller means float32 (the training default)."""
    return DTYPES["float32" if name == "auto" else name]


# --------------------------------------------------------------------------------------------------
# Tiny random models
# --------------------------------------------------------------------------------------------------


def build_tiny_vlm(family: str, spec: TinySpec | None = None, seed: int = 0, dtype: str = "float32"):
    """A random tiny VLM of the real family's classes plus its processor: ``(model, processor)``."""
    from transformers import AutoModelForImageTextToText

    spec = spec or TinySpec()
    if family not in FAMILIES:
        raise DigiqError(f"unknown tiny VLM family {family!r}; choose one of {tuple(FAMILIES)}")
    fam = FAMILIES[family]
    processor = fam.tiny_processor(fam, default_tokenizer(spec.vocab_size), spec)
    # PaliGemma's processor adds <image> and 1024 loc / 128 seg tokens: size the vocab after building it.
    config = fam.tiny_config(processor.tokenizer, spec)
    with _fork_rng(seed):
        model = AutoModelForImageTextToText.from_config(config, dtype=_dtype(dtype))
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


def inference_device(device: str | torch.device = "auto") -> torch.device:
    """``auto``: the first GPU when one is visible, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def inference_dtype(dtype: str, device: torch.device) -> str:
    """``auto``: bfloat16 on a GPU that supports it (half the memory and the matmul time of float32 for
    frozen weights), float32 elsewhere (CPU matmuls in bf16 are slower and less exact)."""
    if dtype != "auto":
        return dtype
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def family_of(model_or_config: Any) -> str:
    """Our family name from a model / config's ``model_type`` (``llava``, ``qwen2-vl``, ...)."""
    cfg = getattr(model_or_config, "config", model_or_config)
    mt = getattr(cfg, "model_type", "")
    if mt not in BY_MODEL_TYPE:
        # A PeftModel wraps the HF model: look one level down.
        base = getattr(model_or_config, "base_model", None)
        inner = getattr(base, "model", None)
        if inner is not None and inner is not model_or_config:
            return family_of(inner)
        raise DigiqError(f"unsupported VLM model_type {mt!r}; supported: {sorted(BY_MODEL_TYPE)}")
    return BY_MODEL_TYPE[mt].name


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
            processor = _load_processor(str(path), family)
        else:
            kwargs: dict[str, Any] = {"dtype": _dtype(cfg.dtype)}
            if cfg.attn_implementation:
                kwargs["attn_implementation"] = cfg.attn_implementation
            try:
                model = AutoModelForImageTextToText.from_pretrained(name, **kwargs)
            except (OSError, ValueError) as e:
                raise model_unavailable("model.name_or_path", name, e, "VLM") from e
            family = meta.get("family") or family_of(model)
            processor = _load_processor(name, family)
        _no_crop(processor)
    _pixel_budget(processor, cfg, family)
    processor.digiq_family = family
    if hasattr(processor, "tokenizer"):
        processor.tokenizer.padding_side = "left"
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    if lora is not None and lora.enabled and not is_peft(model):
        model = apply_lora(model, lora)
    return model, processor


def _load_processor(path: str, family: str):
    if family not in FAMILIES:
        raise DigiqError(f"{path}: unknown VLM family {family!r} in {META_FILE}; known: {tuple(FAMILIES)}")
    return FAMILIES[family].processor_loader().from_pretrained(path)


def _size(size: Any, key: str) -> Any:
    """``size[key]`` of an image processor's ``size`` / ``crop_size``: a ``dict`` in transformers 4, a
    ``SizeDict`` (attributes, no ``dict`` base) in transformers 5."""
    if size is None:
        return None
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def _no_crop(processor) -> None:
    """Portrait screens: resize the whole image to the crop's square, never centre-crop it.

    AitW / simulated screens are portrait: LLaVA-1.5's CLIP processor (shortest edge 336, then a 336 centre
    crop) would cut off the top and bottom bars. Without the crop, the shortest-edge resize alone gives a
    746 x 336 image for a 1080 x 2400 screen, which the 336-px vision tower refuses: the size becomes the
    crop's square instead.
    """
    ip = getattr(processor, "image_processor", None)
    if ip is None or not getattr(ip, "do_center_crop", False):
        return
    ip.do_center_crop = False
    side = _size(getattr(ip, "crop_size", None), "height")
    size = getattr(ip, "size", None)
    if side is not None and (_size(size, "shortest_edge") or _size(size, "height")):
        ip.size = SizeDict(height=side, width=side)


def _pixel_budget(processor, cfg: ModelConfig, family: str) -> None:
    """``model.min_pixels`` / ``model.max_pixels`` into a Qwen-VL image processor's ``size`` (shortest_edge /
    longest_edge are the pixel bounds its smart_resize keeps each image within); saved with the processor."""
    if cfg.min_pixels is None and cfg.max_pixels is None:
        return
    where = f"model {cfg.name_or_path!r}"
    if not FAMILIES[family].pixel_budget:
        raise DigiqError(
            f"model.max_pixels / model.min_pixels apply to the Qwen-VL families' image processors; {where} is a "
            f"{family} model (its processor sets its own image size): remove the setting"
        )
    ip = processor.image_processor
    lo = cfg.min_pixels if cfg.min_pixels is not None else _size(ip.size, "shortest_edge")
    hi = cfg.max_pixels if cfg.max_pixels is not None else _size(ip.size, "longest_edge")
    if not 0 < lo <= hi:
        raise DigiqError(f"{where}: need 0 < model.min_pixels ({lo}) <= model.max_pixels ({hi})")
    ip.size = SizeDict(shortest_edge=lo, longest_edge=hi)
    for name, value in (("min_pixels", lo), ("max_pixels", hi)):
        if hasattr(ip, name):  # transformers 4 reads these attributes, not size
            setattr(ip, name, value)


def is_peft(model: Any) -> bool:
    from peft import PeftModel  # a dependency, imported here: importing it (with transformers) takes seconds

    return isinstance(model, PeftModel)


def apply_lora(model, lora: LoraConfig):
    """Wrap ``model`` in peft LoRA on the modules matching ``lora.target_modules`` (a regex)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    if is_peft(model):
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


def export_state(model, merge_lora: bool = True) -> dict[str, torch.Tensor] | None:
    """The weights :func:`save_vlm` writes for an FSDP-sharded ``model``; ``None`` when it is not sharded.

    Collective: under FSDP every process calls it (the shards are gathered, on the CPU, to the main
    process, which gets the full state dict; the others an empty dict), then the main process alone passes
    it to :func:`save_vlm` as ``state_dict``. A sharded model's own tensors cannot be written (safetensors
    reads its parameters' storage, which FSDP2 frees) and ``merge_and_unload`` cannot merge shards, so a
    PeftModel's adapters are merged here, into the gathered base weights, when ``merge_lora``. A model
    that is not sharded (one process, DDP) returns ``None`` at once, with no collective call: the main
    process saves the live model as before.
    """
    from digiq.training.checkpoint import gather_weights, is_sharded  # training imports models, not back

    if not is_sharded(model):
        return None
    state = gather_weights(model, trainable_only=False)
    if state and is_peft(model) and merge_lora:
        state = merged_lora_state(model, state)
    return state


def merged_lora_state(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A PeftModel's full state dict with its LoRA adapters merged, keyed as the plain base model's.

    The weights ``merge_and_unload`` leaves (peft's ``Linear.merge``): W + (B @ A) * scaling per adapted
    linear layer, computed in float32 for half-precision weights as peft does on the CPU. Only what
    :func:`apply_lora` builds (LoRA on linear layers) is supported.
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils import transpose

    out = dict(state)
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        weight_key = f"{name}.base_layer.weight"
        for adapter in module.active_adapters:
            if adapter not in module.lora_A:
                continue
            if not isinstance(module.get_base_layer(), torch.nn.Linear) or module.use_dora.get(adapter):
                raise DigiqError(
                    f"cannot merge the LoRA adapter on {name} of a sharded model: only plain LoRA on linear "
                    "layers merges under FSDP; export with merge_lora=false"
                )
            a = out.pop(f"{name}.lora_A.{adapter}.weight")
            b = out.pop(f"{name}.lora_B.{adapter}.weight")
            w = out[weight_key]
            if w.dtype in (torch.float16, torch.bfloat16):
                a, b = a.float(), b.float()
            delta = transpose(b @ a, module.fan_in_fan_out) * module.scaling[adapter]
            out[weight_key] = w + delta.to(w.dtype)
    left = [k for k in out if ".lora_" in k or "modules_to_save" in k]
    if left:
        raise DigiqError(
            f"cannot merge {left[0]!r} of a sharded model into plain weights; use merge_lora=false"
        )
    prefix = "base_model.model."
    return {k.removeprefix(prefix).replace(".base_layer.", "."): v for k, v in out.items()}


def save_vlm(
    model,
    processor,
    out_dir: str | Path,
    merge_lora: bool = True,
    base: str | None = None,
    tiny_seed: int = 0,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """``save_pretrained`` model + processor into ``out_dir`` (plus ``digiq_vlm.json``) for :func:`load_vlm`.

    A PeftModel is merged into plain weights when ``merge_lora``; else only the adapter is written and
    ``base`` (the base model's name_or_path) is recorded so loading can rebuild it. A ``tiny:`` base is
    rebuilt deterministically from its seed. An FSDP-sharded model is written from ``state_dict``, the
    gathered weights of :func:`export_state` (already merged when ``merge_lora``): call that on every
    process first, then this on the main process.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    family = getattr(processor, "digiq_family", None) or family_of(model)
    meta: dict[str, Any] = {"family": family}
    if is_peft(model) and not merge_lora:
        meta["base"] = base
        meta["tiny_seed"] = tiny_seed
    if state_dict is not None:
        # The gathered weights of a sharded model: merged LoRA is keyed as the plain base model's.
        target = model.get_base_model() if is_peft(model) and merge_lora else model
        target.save_pretrained(str(out_dir), state_dict=state_dict, safe_serialization=True)
    else:
        from digiq.training.checkpoint import is_sharded

        if is_sharded(model):
            raise DigiqError(
                f"{out_dir}: the model is sharded (FSDP): gather its weights with export_state(model) on every "
                "process and pass them to save_vlm(..., state_dict=...) on the main process"
            )
        if is_peft(model) and merge_lora:
            model = model.merge_and_unload()
        model.save_pretrained(str(out_dir), safe_serialization=True)
    processor.save_pretrained(str(out_dir))
    if FAMILIES[family].image_only:  # read by digiq versions before the family registry
        meta["processor"] = "qwen-image-only"
    atomic_write_json(out_dir / META_FILE, meta)
    return out_dir


def num_text_layers(model) -> int:
    cfg = model.config
    text = getattr(cfg, "text_config", None) or cfg
    return int(text.num_hidden_layers)


# --------------------------------------------------------------------------------------------------
# Forward passes: answer logits and features
# --------------------------------------------------------------------------------------------------


def unwrap(model):
    """The HF ``*ForConditionalGeneration`` model under a PeftModel / DDP wrapper."""
    m = getattr(model, "module", model)  # DDP
    if is_peft(m):
        m = m.get_base_model()
    return m


def resolve_layer(model, layer: int | None) -> int:
    """The ``output_hidden_states`` index of feature layer ``layer``: the one place it is resolved.

    ``layer`` counts like ``output_hidden_states``: 0 = token embeddings, k = output of decoder layer k;
    negative counts from the end with ``-1`` = the last layer's output *after the final norm*. ``None`` = an
    intermediate layer at 3/4 of the depth (at least 1), the default feature layer for Stage 2.
    """
    n = num_text_layers(unwrap(model))
    if layer is None:
        layer = max(1, (3 * n) // 4)
    index = layer if layer >= 0 else n + 1 + layer
    if not 0 <= index <= n:
        raise ValueError(f"layer {layer} is out of range for a text model with {n} layers")
    return index


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

    ``layer`` as in :func:`resolve_layer` (``-1`` is the official gradio path's ``layer_id=-1``,
    host.py:78-84). Deterministic: no generation, no sampling (the official path samples at temperature 0.2).
    """
    hf = unwrap(model)
    base = hf.model  # the *Model under *ForConditionalGeneration: no LM head
    hidden = hidden_at(base, resolve_layer(hf, layer), **inputs, use_cache=False, return_dict=True)
    idx = last_token_index(inputs["attention_mask"]).to(hidden.device)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]


class _EarlyExit(Exception):
    """Raised by a pre-hook to stop a forward pass once the wanted hidden state is captured."""


def decoder_layers(base) -> torch.nn.ModuleList | None:
    """The text decoder's layer list under a ``*Model`` (its family's ``text_decoder``); None if unknown."""
    fam = BY_MODEL_TYPE.get(getattr(base.config, "model_type", ""))
    layers = getattr(getattr(base, fam.text_decoder, None), "layers", None) if fam else None
    return layers if isinstance(layers, torch.nn.ModuleList) else None


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
