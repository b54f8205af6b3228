"""Write a real-size VLM architecture with random weights as a ``save_pretrained`` folder (for gpu_check.sh).

    python scripts/make_random_vlm.py llava-1.5-7b runs/gpu_check/llava7b        # 7.06B parameters, bf16
    python scripts/make_random_vlm.py llava-1.5-7b /tmp/small --layers 1 --hidden 64   # a shrunk one (tests)

The architecture is the real checkpoint's (digiq.training.memory), the processor is configured as the real
one (CLIP, shortest edge 336 + 336 crop, which load_vlm turns into a whole-screen 336 x 336 resize), and the
tokenizer is digiq's offline tiny tokenizer (the real one cannot be downloaded here; token ids stay below the
real vocabulary). Nothing is downloaded: the weights are random, so the numbers measured with it are speed
and memory, never quality.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from digiq.models.tiny_text import default_tokenizer
from digiq.models.vlm import save_vlm
from digiq.training.memory import REAL_MODELS

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", choices=["llava-1.5-7b"])
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=0, help="shrink: text layers (0 = the real count)")
    ap.add_argument("--hidden", type=int, default=0, help="shrink: text width (0 = the real width)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args()

    from transformers import AutoModelForImageTextToText, CLIPImageProcessorPil, LlavaProcessor

    config = REAL_MODELS[args.name].config()
    tok = default_tokenizer()
    config.image_token_index = tok.convert_tokens_to_ids("<image>")
    text = config.text_config
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(text, key, getattr(tok, key))
    if args.layers:
        text.num_hidden_layers = config.vision_config.num_hidden_layers = args.layers
    if args.hidden:
        text.hidden_size, text.intermediate_size = args.hidden, 2 * args.hidden
        text.num_attention_heads = text.num_key_value_heads = max(1, args.hidden // 64)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=getattr(torch, args.dtype))
    ip = CLIPImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_center_crop=True,
        resample=3, image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )  # fmt: skip
    processor = LlavaProcessor(
        image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )  # fmt: skip
    processor.digiq_family = "llava"
    save_vlm(model, processor, Path(args.out))
    n = sum(p.numel() for p in model.parameters())
    print(f"{args.name}: {n / 1e9:.3f}B random parameters ({args.dtype}) in {args.out}")


if __name__ == "__main__":
    main()
