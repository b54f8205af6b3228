"""Everything digiq knows about a VLM family, one :class:`FamilySpec` per family in :data:`FAMILIES`.

A family is a set of HF checkpoints sharing model classes, a chat template and processor quirks (``llava``
covers ``llava-hf/llava-1.5-7b-hf``, the paper's VLM, and its fine-tunes). The prompt builder
(:mod:`digiq.models.prompts`), the loader (:mod:`digiq.models.vlm`), the feature extractor
(:mod:`digiq.models.featurize`) and the ``tiny:<family>`` builders (:mod:`digiq.models.tiny`) read the
entry and nothing else, so adding a family is one entry here (plus its two tiny builders and its tests).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from digiq.models import tiny


@dataclass(frozen=True)
class FamilySpec:
    """One VLM family. Only ``name`` .. ``tiny_config`` are required; the defaults are the common case."""

    # Our name (``tiny:<name>``, ``digiq_vlm.json``, ``PolicySpec.family``).
    name: str
    # The HF ``config.model_type`` values of the family's checkpoints (how a loaded model finds its entry).
    model_types: tuple[str, ...]
    # The chat template: prompt = head + user text + tail, and the answer follows as answer_prefix + "Yes" /
    # "No". The head holds the image placeholder, which the processor expands into the image's tokens.
    head: str
    tail: str
    answer_prefix: str
    # ``tiny:<name>`` builders: ``tiny_processor(family, tokenizer, TinySpec)`` and ``tiny_config(tokenizer,
    # TinySpec)`` (the tokenizer the processor holds, after it added its tokens).
    tiny_processor: Callable[..., Any]
    tiny_config: Callable[..., Any]
    # Text the processor appends to every prompt by itself (the answer's first token follows it).
    implicit_tail: str = ""
    # The processor wants one list of images per prompt instead of one image per prompt.
    nested_images: bool = False
    # ``token_type_ids`` are a model input (else dropped: the other models' forwards do not take them).
    keeps_token_type_ids: bool = False
    # The transformers class that loads a saved processor folder; ``image_only`` drops its video processor.
    processor_class: str = "AutoProcessor"
    image_only: bool = False
    # Attribute of the ``*Model`` (under ``*ForConditionalGeneration``) holding the text decoder's ``layers``.
    text_decoder: str = "language_model"
    # Module names of the vision side (tower and projector) in parameter names: finetune-vlm trains them at
    # its own learning rate (``vision_lr_scale``).
    vision_modules: tuple[str, ...] = ("vision_tower", "multi_modal_projector")
    # Causal attention over the whole prompt with the image inside the prefix: Stage 2 may encode a state's
    # prefix once and run its N candidates' suffixes on the prefix's KV cache (digiq.models.featurize).
    prefix_sharing: bool = True
    # Qwen-VL's 3-axis rotary positions: text after an image continues at max(prefix positions) + 1.
    mrope: bool = False
    # The image processor resizes to a pixel budget (``size.shortest_edge`` / ``longest_edge`` = min_pixels /
    # max_pixels, Qwen-VL's ``smart_resize``): ``model.min_pixels`` / ``model.max_pixels`` apply to it.
    pixel_budget: bool = False

    @property
    def template(self) -> tuple[str, str, str]:
        """``(head, tail, answer_prefix)``."""
        return self.head, self.tail, self.answer_prefix

    def processor_loader(self) -> type:
        """The processor class whose ``from_pretrained`` loads this family's saved processor folders."""
        import transformers

        cls = getattr(transformers, self.processor_class)
        return _image_only(cls) if self.image_only else cls


@functools.cache
def _image_only(base: type) -> type:
    """A subclass of a Qwen-VL processor without the video processor, which needs torchvision.

    Its class name (``<base>ImageOnly``) is what ``save_pretrained`` records; :func:`FamilySpec.processor_loader`
    rebuilds it for ``from_pretrained``.
    """
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


# --------------------------------------------------------------------------------------------------
# The families. Templates have the shape of each family's chat template on its HF model card.
# --------------------------------------------------------------------------------------------------

# llava-hf/llava-1.5-7b-hf: "USER: <image>\n<prompt> ASSISTANT:".
LLAVA = FamilySpec(
    name="llava",
    model_types=("llava",),
    head="USER: <image>\n",
    tail=" ASSISTANT:",
    answer_prefix=" ",
    tiny_processor=tiny.llava_processor,
    tiny_config=tiny.llava_config,
)

# Qwen/Qwen2-VL-2B-Instruct: ChatML with the default system prompt; an image is
# <|vision_start|><|image_pad|><|vision_end|>. Its processor loads a video processor (torchvision): we load an
# image-only subclass.
QWEN2_VL = FamilySpec(
    name="qwen2-vl",
    model_types=("qwen2_vl",),
    head="<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|><|image_pad|><|vision_end|>",
    tail="<|im_end|>\n<|im_start|>assistant\n",
    answer_prefix="",
    tiny_processor=tiny.qwen_processor,
    tiny_config=tiny.qwen2_vl_config,
    processor_class="Qwen2VLProcessor",
    image_only=True,
    vision_modules=("visual",),
    mrope=True,
    pixel_budget=True,
)

# Qwen/Qwen2.5-VL-3B-Instruct: Qwen2-VL's template and quirks, its own classes.
QWEN2_5_VL = replace(
    QWEN2_VL,
    name="qwen2.5-vl",
    model_types=("qwen2_5_vl",),
    tiny_config=tiny.qwen2_5_vl_config,
    processor_class="Qwen2_5_VLProcessor",
)

# HuggingFaceM4/Idefics3-8B-Llama3: "<|begin_of_text|>User:<image>...<end_of_utterance>\nAssistant:". The
# processor takes a list of images per prompt; the decoder is the *Model's text_model.
IDEFICS3 = FamilySpec(
    name="idefics3",
    model_types=("idefics3",),
    head="<|begin_of_text|>User:<image>",
    tail="<end_of_utterance>\nAssistant:",
    answer_prefix=" ",
    tiny_processor=tiny.idefics3_processor,
    tiny_config=tiny.idefics3_config,
    nested_images=True,
    processor_class="Idefics3Processor",
    text_decoder="text_model",
    vision_modules=("vision_model", "connector"),
)

# HuggingFaceTB/SmolVLM-Instruct: Idefics3's layout with a ChatML start token. Loaded with the Idefics3
# processor: SmolVLMProcessor needs a video processor and num2words (see tiny.idefics3_processor).
SMOLVLM = replace(
    IDEFICS3,
    name="smolvlm",
    model_types=("smolvlm",),
    head="<|im_start|>User:<image>",
    tiny_processor=functools.partial(tiny.idefics3_processor, image_processor="SmolVLMImageProcessorPil"),
    tiny_config=functools.partial(tiny.idefics3_config, config="SmolVLMConfig"),
)

# google/paligemma-3b-pt-224: no chat template. The processor prepends the image tokens and BOS and appends
# "\n" itself, and returns token_type_ids, which mark the prefix of its prefix-LM mask: attention over image
# and prompt is bidirectional, so a later token changes earlier states and no prefix can be shared.
PALIGEMMA = FamilySpec(
    name="paligemma",
    model_types=("paligemma",),
    head="",
    tail="",
    answer_prefix="",
    tiny_processor=tiny.paligemma_processor,
    tiny_config=tiny.paligemma_config,
    implicit_tail="\n",
    keeps_token_type_ids=True,
    prefix_sharing=False,
)

FAMILIES: dict[str, FamilySpec] = {
    f.name: f for f in (LLAVA, QWEN2_VL, QWEN2_5_VL, IDEFICS3, SMOLVLM, PALIGEMMA)
}
# HF ``config.model_type`` -> family.
BY_MODEL_TYPE: dict[str, FamilySpec] = {t: f for f in FAMILIES.values() for t in f.model_types}
