"""Real-size VLMs without their weights: parameter counts, FSDP wrap classes and a per-GPU memory estimate.

The 7B models of the paper's setting are built from their config values on PyTorch's ``meta`` device
(shapes, no storage), so the counts, the layer classes FSDP wraps and a memory estimate per stage can be
checked on a laptop. The config values are those of the checkpoints' ``config.json`` on the HF hub (written
out here: nothing is downloaded). ``scripts/bench_memory.py --meta`` prints the table.

The estimate is arithmetic, not a measurement:

* weights, gradients and AdamW moments by dtype (bf16 weights when frozen; float32 master weights,
  gradients and two moments when trained in bf16 mixed precision), divided by the GPU count when FSDP
  shards them (full shard), whole on every GPU otherwise (DDP, LoRA);
* FSDP's transient: one decoder layer gathered in bf16;
* activations of a decoder with memory-efficient attention (no sequence-squared term): with gradient
  checkpointing one bf16 hidden state per layer boundary plus one layer's intermediates (~34 values per
  token and hidden unit, Korthikanti et al. 2022, arXiv:2205.05198, without the attention-score term);
  without it, every layer's intermediates; inference keeps two hidden states and the KV cache;
* the vision tower's activations and the LM head's full-sequence logits (float32) where a stage needs them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

GB = 1024**3


def llava_1_5_7b_config() -> Any:
    """llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14 at 336 px + Vicuna-7B (Llama-2 7B, vocab 32064)."""
    import transformers as tf

    return tf.LlavaConfig(
        vision_config=tf.CLIPVisionConfig(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
            image_size=336, patch_size=14, projection_dim=768,
        ),
        text_config=tf.LlamaConfig(
            hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
        ),
        image_token_index=32000, vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )  # fmt: skip


def qwen2_vl_7b_config() -> Any:
    """Qwen/Qwen2-VL-7B-Instruct: a 675M-parameter ViT (32 blocks, 1280 wide) + Qwen2-7B."""
    import transformers as tf

    return tf.Qwen2VLConfig(
        text_config=dict(
            hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
            num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6},
        ),
        vision_config=dict(
            depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, in_chans=3, hidden_size=3584, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2,
        ),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    )  # fmt: skip


# The screenshot the table is computed for (a 1080 x 2400 phone; AitW's are 1080 x 2400 or 1440 x 3120).
SCREEN = (1080, 2400)
# Qwen2-VL's pixel budget per image in the checkpoints' preprocessor_config.json (Qwen/Qwen2-VL-2B-Instruct and
# -7B-Instruct): min_pixels 56*56, max_pixels 28*28*16384, i.e. almost any phone screen at its own resolution.
QWEN2_VL_MIN_PIXELS = 56 * 56
QWEN2_VL_MAX_PIXELS = 28 * 28 * 16384
# What digiq's Qwen2-VL configs set (model.max_pixels): the lighter budget the Qwen2-VL model card suggests,
# 1280 merged 28 x 28 tiles (docs/distributed.md, "Qwen2-VL's image tokens").
QWEN2_VL_SHIPPED_MAX_PIXELS = 1280 * 28 * 28


def qwen2_vl_tokens(
    width: int, height: int, max_pixels: int | None = None, min_pixels: int | None = None
) -> tuple[int, int]:
    """``(image tokens in the language model, patches in the vision tower)`` of one ``width x height``
    screenshot, computed with the image processor's own ``smart_resize`` (a multiple of 28 px per side within
    ``[min_pixels, max_pixels]``, 14-px patches, 2 x 2 merged); ``None`` = the checkpoint's budget."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    h, w = smart_resize(
        height,
        width,
        factor=28,
        min_pixels=QWEN2_VL_MIN_PIXELS if min_pixels is None else min_pixels,
        max_pixels=QWEN2_VL_MAX_PIXELS if max_pixels is None else max_pixels,
    )
    patches = (h // 14) * (w // 14)
    return patches // 4, patches


def llava_1_5_tokens(width: int, height: int, max_pixels: int | None = None) -> tuple[int, int]:
    """LLaVA-1.5: every screen becomes 336 x 336 (load_vlm's whole-screen resize): (336 / 14)^2 = 576 image
    tokens, 577 in the tower (with CLIP's class token). ``max_pixels`` does not apply."""
    return 576, 577


@dataclasses.dataclass(frozen=True)
class RealModel:
    config: Callable[[], Any]
    # (width, height, max_pixels) -> (image tokens in the language model, vision tokens in the tower)
    tokens: Callable[..., tuple[int, int]]
    # The prompt's text tokens.
    text_tokens: int


REAL_MODELS = {
    "llava-1.5-7b": RealModel(llava_1_5_7b_config, llava_1_5_tokens, text_tokens=160),
    "qwen2-vl-7b": RealModel(qwen2_vl_7b_config, qwen2_vl_tokens, text_tokens=160),
}


def meta_model(name: str) -> torch.nn.Module:
    """The real-size model on the ``meta`` device (parameter shapes, no memory)."""
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(REAL_MODELS[name].config())


@dataclasses.dataclass
class ModelFacts:
    name: str
    params: int
    vision_params: int  # vision tower + projector
    wrap_classes: list[str]  # the classes FSDP wraps one by one (the model's _no_split_modules)
    hidden: int
    intermediate: int
    layers: int
    kv_dim: int  # key (= value) width per token and layer
    vocab: int
    vision_hidden: int
    vision_layers: int
    lora_params: int  # LoRA r=128 on q/k/v/o of every decoder layer (the llava-1.5-7b Stage-1 config)


def model_facts(name: str, lora_r: int = 128) -> ModelFacts:
    model = meta_model(name)
    text = model.config.get_text_config()
    vision = model.config.vision_config
    vision_modules = ("vision_tower", "visual", "multi_modal_projector")
    vision_params = sum(p.numel() for n, p in model.named_parameters() if any(m in n for m in vision_modules))
    h = text.hidden_size
    kv = text.num_key_value_heads * (h // text.num_attention_heads)
    # q, o: h -> h; k, v: h -> kv; a LoRA pair adds r * (in + out) per matrix.
    lora = text.num_hidden_layers * lora_r * ((h + h) * 2 + (h + kv) * 2)
    return ModelFacts(
        name=name,
        params=sum(p.numel() for p in model.parameters()),
        vision_params=vision_params,
        wrap_classes=sorted(model._no_split_modules),
        hidden=h,
        intermediate=text.intermediate_size,
        layers=text.num_hidden_layers,
        kv_dim=kv,
        vocab=text.vocab_size,
        vision_hidden=getattr(vision, "embed_dim", None) or vision.hidden_size,
        vision_layers=getattr(vision, "depth", None) or vision.num_hidden_layers,
        lora_params=lora,
    )


@dataclasses.dataclass(frozen=True)
class StageRun:
    """How a stage runs a 7B model (its shipped config, or the FSDP recipe of docs/distributed.md)."""

    stage: str
    mode: str  # "inference", "lora" (DDP), "full" (FSDP full shard)
    batch: int  # sequences per GPU per forward
    gpus: int = 8
    gradient_checkpointing: bool = True
    full_logits: bool = False  # the LM head over the whole sequence (policy training), not one position
    frozen_copy: bool = False  # a second, frozen bf16 copy on every GPU (extract-policy's pi_beta)
    candidates: int = 1  # prompts per state (cache-features scores 1 + N prompts)
    kv_copies: int = 1  # copies of each prompt's KV cache (candidates decodes 16 samples from one prefill)


def estimate(
    facts: ModelFacts, run: StageRun, image_tokens: int, text_tokens: int, vision_tokens: int
) -> dict:
    """Per-GPU GiB of one stage, by component (the rules are in the module docstring)."""
    P, h, L = facts.params, facts.hidden, facts.layers
    seq = image_tokens + text_tokens
    tokens = run.batch * seq * run.candidates  # token positions in one forward
    layer_params = (P - facts.vision_params - 2 * facts.vocab * h) / L
    out: dict[str, float] = {}
    if run.mode == "full":  # FSDP full shard: fp32 master weights, fp32 grads, two fp32 moments
        out["weights+grads+adam (sharded)"] = 16 * P / run.gpus
        # the unit being computed and the one prefetched (bf16), and the root unit (embeddings, LM head)
        out["gathered units (bf16)"] = 2 * (2 * layer_params + 2 * facts.vocab * h)
    elif run.mode == "lora":  # DDP: the frozen bf16 base on every GPU, fp32 adapters, grads and moments
        out["weights (bf16)"] = 2 * P
        out["lora+grads+adam"] = 16 * facts.lora_params
    else:
        out["weights (bf16)"] = 2 * P
    if run.frozen_copy:
        out["frozen copy (bf16)"] = 2 * P
    per_token_layer = 34 * h  # bytes of one layer's saved intermediates per token (bf16)
    if run.mode == "inference":  # live hidden states + MLP intermediate, and the KV cache of every layer
        out["activations"] = tokens * (4 * h + 2 * facts.intermediate) * 2
        out["kv cache"] = tokens * run.kv_copies * L * 2 * facts.kv_dim * 2
    elif run.gradient_checkpointing:  # one bf16 hidden state per layer boundary + one layer's intermediates
        out["activations"] = tokens * (2 * h * L + per_token_layer)
    else:
        out["activations"] = tokens * per_token_layer * L
    vision_depth = 1 if run.mode == "inference" or run.gradient_checkpointing else facts.vision_layers
    out["vision activations"] = (
        run.batch * run.candidates * vision_tokens * 34 * facts.vision_hidden * vision_depth
    )
    if run.full_logits:
        out["logits (fp32)"] = 4 * run.batch * seq * facts.vocab
    out["total"] = sum(out.values())
    return {k: v / GB for k, v in out.items()}


# Each stage at 7B, as its config ships (finetune-vlm: configs/finetune-vlm/llava-1.5-7b.yaml) or with the
# FSDP recipe (fsdp_7b.yaml, 8 GPUs).
STAGE_RUNS = (
    StageRun("finetune-vlm (LoRA r=128, DDP, batch 8)", "lora", batch=8),
    StageRun("finetune-vlm (full, FSDP x8, batch 16)", "full", batch=16),
    StageRun("train-bc (full, FSDP x8, batch 4)", "full", batch=4, full_logits=True),
    # the one-node recipe of docs/distributed.md: pi_beta and the extraction as LoRA on the frozen bf16 base
    StageRun("train-bc (LoRA r=128, DDP, batch 8)", "lora", batch=8, full_logits=True),
    StageRun(
        "extract-policy (LoRA r=128, DDP, batch 4, + pi_beta)",
        "lora",
        batch=4,
        full_logits=True,
        frozen_copy=True,
    ),
    StageRun(
        "extract-policy (full, FSDP x8, batch 4, + pi_beta)",
        "full",
        batch=4,
        full_logits=True,
        frozen_copy=True,
    ),
    # 16 KV copies per state: at batch_size 16 LLaVA-1.5-7B's cache alone (no grouped-query attention) is
    # ~100 GB; 4 states per call fit.
    StageRun("candidates (bf16, 16 samples/state, batch_size=4)", "inference", batch=4, kv_copies=16),
    StageRun("cache-features (bf16, 1 + 16 prompts/state, batch 2)", "inference", batch=2, candidates=17),
)


def memory_table(
    names: tuple[str, ...] = tuple(REAL_MODELS),
    screen: tuple[int, int] = SCREEN,
    max_pixels: int | None = None,
) -> list[dict]:
    """Per model and stage the per-GPU estimate (GiB by component, ``total``) and the ``image_tokens`` of one
    ``screen`` (width, height); ``max_pixels`` is Qwen2-VL's budget (None = the checkpoint's own)."""
    rows = []
    for name in names:
        facts = model_facts(name)
        m = REAL_MODELS[name]
        image_tokens, vision_tokens = m.tokens(*screen, max_pixels=max_pixels)
        for run in STAGE_RUNS:
            est = estimate(facts, run, image_tokens, m.text_tokens, vision_tokens)
            rows.append(
                {
                    "model": name,
                    "stage": run.stage,
                    "image_tokens": image_tokens,
                    **{k: round(v, 1) for k, v in est.items()},
                }
            )
    return rows
