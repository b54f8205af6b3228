"""More pixels through the same weights: an Idefics3 model folder whose processor tiles the screen.

Idefics3's image processor can split an image into tiles of the vision tower's size plus a resized global
view (``do_image_splitting``; transformers' ``Idefics3ImageProcessor.split_images``), each read by the same
tower and connector into ``image_seq_len`` tokens. gui-tiny's processor does not split: a 180 x 320 screen is
squashed to one 128 x 128 image, 16 tokens. With ``size.longest_edge`` = 256 the screen is resized to 256 x 256,
cut into 2 x 2 tiles of 128 plus the global view: 80 image tokens, each tile token covering a quarter of the
screen area it did before.

The setting is a property of the saved processor (``processor_config.json``), so every model fine-tuned from
the folder (``train-bc``, Stage 1, the critic's features) loads and saves it unchanged and reads the screen
the same way. The weights are copied as they are.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from digiq.errors import DigiqError
from digiq.models.vlm import META_FILE, _load_processor

TILED_FAMILIES = ("idefics3", "smolvlm")


def image_tokens(processor) -> int:
    """Image tokens one 180 x 320 (portrait) screen expands to under ``processor``."""
    from PIL import Image

    enc = processor.image_processor(images=[[Image.new("RGB", (180, 320))]], return_row_col_info=True)
    rows, cols = enc["rows"][0][0], enc["cols"][0][0]
    return processor.image_seq_len * (rows * cols + 1 if rows or cols else 1)


def tile_screens(src: str | Path, dst: str | Path, longest_edge: int) -> int:
    """Copy the model folder ``src`` to ``dst`` with its processor splitting screens resized to
    ``longest_edge`` into tiles of the vision tower's ``image_size`` (plus the global view); returns the image
    tokens of one screen. ``longest_edge`` must be a multiple of the tower's size, larger than it."""
    src, dst = Path(src), Path(dst)
    config = json.loads((src / "config.json").read_text())
    meta = json.loads((src / META_FILE).read_text()) if (src / META_FILE).is_file() else {}
    family = meta.get("family") or config.get("model_type")
    if family not in TILED_FAMILIES:
        raise DigiqError(
            f"{src}: screen tiles need an Idefics3-family model ({TILED_FAMILIES}), not {family!r}"
        )
    side = int(config["vision_config"]["image_size"])
    if longest_edge <= side or longest_edge % side:
        raise DigiqError(
            f"longest_edge {longest_edge} must be a multiple of the vision tower's image_size {side}, larger than it"
        )
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("_COMPLETE"))
    processor = _load_processor(str(dst), family)
    ip = processor.image_processor
    ip.do_image_splitting = True
    ip.size = {"longest_edge": longest_edge}
    ip.max_image_size = {"longest_edge": side}
    processor.save_pretrained(str(dst))
    return image_tokens(processor)
