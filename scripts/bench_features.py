"""Feature-caching throughput: prefix-shared KV cache vs per-pair full forwards, side by side.

    python scripts/bench_features.py                       # LLaVA-like proportions, N = 16, tiny model
    python scripts/bench_features.py --rows 8 --candidates 16 --layers 4 --hidden 128 --device cuda

A tiny random LLaVA (CLIP 336 px / patch 14 = 576 image tokens, as llava-1.5) with a few small text
layers; prompts are the real Stage-2 prompts (about 60 prefix-text tokens after the image, 30-50 tokens per
action suffix with the tiny BPE; the exact counts are printed). Per state the cache needs f(s) and N
f(s, a_i), i.e. M = N + 1 prompts. Paths timed on the same rows, interleaved, median of ``--repeats``:

* ``prefix``   - :class:`digiq.models.featurize.Featurizer` (image + prefix once, M suffixes on its KV cache)
* ``batched``  - M full prompts in one left-padded batch (what ``overlay`` rendering has to do)
* ``per-pair`` - M separate full forwards, one prompt each (the official gradio path's shape)

Both are checked to give the same features (max abs difference printed). Speed lives here, not in tests.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from PIL import Image, ImageDraw

from digiq.actions import Action, ActionType
from digiq.models.featurize import Featurizer
from digiq.models.prompts import processor_call, split_prompt
from digiq.models.vlm import TinySpec, build_tiny_vlm


def screens(n: int) -> list[Image.Image]:
    out = []
    for k in range(n):
        img = Image.new("RGB", (1080 // 4, 2400 // 4), (240, 240, 240))
        d = ImageDraw.Draw(img)
        for j in range(6):
            d.rectangle([10, 40 + 90 * j, 250, 100 + 90 * j], fill=((37 * (j + k)) % 255, 90, 200))
        out.append(img)
    return out


def candidates(n: int, k: int) -> list[str]:
    acts = [Action.type_text("usb cable"), Action.key(ActionType.PRESS_BACK)]
    acts += [Action.tap(((i * 7 + k) % 19) / 19, ((i * 5) % 13) / 13) for i in range(n)]
    return [a.render() for a in acts[:n]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4, help="states per timed pass")
    ap.add_argument("--candidates", type=int, default=16, help="N actions per state (M = N + 1 prompts)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-per-pair", action="store_true", help="skip the slowest (unbatched) path")
    args = ap.parse_args()

    spec = TinySpec(
        hidden=args.hidden,
        layers=args.layers,
        heads=4,
        kv_heads=2,
        vision_hidden=64,
        vision_layers=1,
        image_size=336,
        patch=14,
    )
    model, proc = build_tiny_vlm("llava", spec=spec)
    model.to(args.device)
    goal = 'Go to newegg.com, search for "corsair k70", and select the first entry'
    prev = Action.tap(0.12, 0.5).render()
    rows = [(img, goal, prev, candidates(args.candidates, k)) for k, img in enumerate(screens(args.rows))]

    prefix_text, _ = split_prompt("llava", goal, prev, None, "text")
    n_prefix = processor_call(proc, [rows[0][0]], [prefix_text])["input_ids"].shape[1]
    tok = proc.tokenizer
    n_img = int(
        (processor_call(proc, [rows[0][0]], [prefix_text])["input_ids"] == model.config.image_token_id).sum()
    )
    suffix_lens = [
        len(tok(split_prompt("llava", goal, prev, a, "text")[1])["input_ids"]) for a in [None, *rows[0][3]]
    ]
    print(
        f"tokens: prefix {n_prefix} ({n_img} image + {n_prefix - n_img} text), suffix "
        f"{min(suffix_lens)}-{max(suffix_lens)} (mean {statistics.mean(suffix_lens):.0f}); "
        f"N = {args.candidates} -> {args.candidates + 1} prompts per state; text model {args.layers} x "
        f"{args.hidden}; device {args.device}; torch threads {torch.get_num_threads()}"
    )
    m = args.candidates + 1
    paths = {
        "prefix": Featurizer(model, proc, rendering="text", batch_size=m, prefix_sharing=True),
        "batched": Featurizer(model, proc, rendering="text", batch_size=m, prefix_sharing=False),
    }
    if not args.skip_per_pair:
        paths["per-pair"] = Featurizer(model, proc, rendering="text", batch_size=1, prefix_sharing=False)

    def one(f: Featurizer):
        t = time.perf_counter()
        out = [f.features(*r) for r in rows]
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t, out

    for f in paths.values():  # warm-up
        f.features(*rows[0])
    times: dict[str, list[float]] = {k: [] for k in paths}
    outs = {}
    for _ in range(args.repeats):
        for name, f in paths.items():
            dt, outs[name] = one(f)
            times[name].append(dt)
    ref = outs["prefix"]
    rate = {k: args.rows / statistics.median(v) for k, v in times.items()}
    for name in paths:
        diff = max(
            max((a[0] - b[0]).abs().max().item(), (a[1] - b[1]).abs().max().item())
            for a, b in zip(outs[name], ref, strict=True)
        )
        print(
            f"{name:>9}: {rate[name]:8.2f} rows/s  ({rate[name] * m:8.1f} prompts/s)  "
            f"speed-up of prefix: {rate['prefix'] / rate[name]:5.2f}x  max|diff| vs prefix {diff:.2e}"
        )


if __name__ == "__main__":
    main()
