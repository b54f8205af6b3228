"""Drawing AitW actions on a screenshot (used by ``digiq report``; reusable in notebooks).

Points are normalised ``(y, x)`` as in AitW (``digiq.actions``): a tap is a circle, a swipe an arrow from the
touch to the lift point, typed text a label at the bottom of the screen, and key / status actions a badge at
the top. Each action gets a colour from :data:`PALETTE` (the HTML report shows the same colour next to the
candidate's table row); the highlighted one is drawn last, thicker, in :data:`HIGHLIGHT`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

from digiq.actions import Action, ActionType, parse_action

# Distinct, colour-blind-friendly hues (Okabe-Ito without black/yellow) for candidates 0, 1, 2, ...
PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 114, 178),
    (213, 94, 0),
    (0, 158, 115),
    (204, 121, 167),
    (86, 180, 233),
    (230, 159, 0),
    (120, 94, 240),
    (100, 100, 100),
)
# The chosen (argmax-Q) action; the HTML table uses the same hue for the chosen row.
HIGHLIGHT: tuple[int, int, int] = (255, 0, 110)

KEY_BADGES = {
    ActionType.PRESS_BACK: "BACK",
    ActionType.PRESS_HOME: "HOME",
    ActionType.PRESS_ENTER: "ENTER",
    ActionType.STATUS_TASK_COMPLETE: "DONE",
    ActionType.STATUS_TASK_IMPOSSIBLE: "IMPOSSIBLE",
    ActionType.INVALID: "INVALID",
}


def colour(i: int) -> tuple[int, int, int]:
    """The palette colour of candidate ``i`` (cycles)."""
    return PALETTE[i % len(PALETTE)]


def hex_colour(rgb: Sequence[int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except Exception:  # noqa: BLE001 - pillow without FreeType: the bitmap default font
        return ImageFont.load_default()


def _arrow(
    draw: ImageDraw.ImageDraw, p0: tuple[float, float], p1: tuple[float, float], fill, width: int
) -> None:
    draw.line([p0, p1], fill=fill, width=width)
    ang = math.atan2(p1[1] - p0[1], p1[0] - p0[0])
    head = 4 * width + 4
    left = (p1[0] - head * math.cos(ang - 0.45), p1[1] - head * math.sin(ang - 0.45))
    right = (p1[0] - head * math.cos(ang + 0.45), p1[1] - head * math.sin(ang + 0.45))
    draw.polygon([p1, left, right], fill=fill)
    r = width + 2
    draw.ellipse([p0[0] - r, p0[1] - r, p0[0] + r, p0[1] + r], outline=fill, width=max(1, width // 2 + 1))


def _badge(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, fill, font, thick: bool) -> float:
    """A filled rounded label with white text whose top-left is ``xy``; returns its height."""
    x0, y0, x1, y1 = draw.textbbox(xy, text, font=font)
    pad = 3
    box = [x0 - pad, y0 - pad, x1 + pad, y1 + pad]
    draw.rounded_rectangle(box, radius=4, fill=fill, outline=(255, 255, 255) if thick else None, width=2)
    draw.text(xy, text, fill=(255, 255, 255), font=font)
    return (y1 - y0) + 2 * pad + 3


def draw_actions(
    image: Image.Image,
    actions: Sequence[Action | str],
    labels: Sequence[str] | None = None,
    highlight: int | None = None,
    width: int | None = 270,
) -> Image.Image:
    """Return a copy of ``image`` (resized to ``width`` px wide, aspect kept) with ``actions`` drawn on it.

    ``labels[i]`` (default ``str(i)``) is written next to action ``i``; ``highlight`` is the index drawn in
    :data:`HIGHLIGHT` on top of the others. Strings are parsed with :func:`digiq.actions.parse_action`
    (an unparsable string shows as an INVALID badge), so a row's ``candidates`` can be passed as they are.
    """
    img = image.convert("RGB")
    if width is not None and img.width != width:
        img = img.resize((width, max(1, round(img.height * width / img.width))), Image.Resampling.LANCZOS)
    W, H = img.size
    acts = [a if isinstance(a, Action) else parse_action(a) for a in actions]
    labels = [str(i) for i in range(len(acts))] if labels is None else list(labels)
    if len(labels) != len(acts):
        raise ValueError(f"draw_actions: {len(acts)} actions but {len(labels)} labels")
    draw = ImageDraw.Draw(img)
    base = max(2, W // 120)
    font = _font(max(9, W // 22))
    top_y, bottom_y = 4.0, float(H - 4)
    order = [i for i in range(len(acts)) if i != highlight] + ([highlight] if highlight is not None else [])
    for i in order:
        a = acts[i]
        hi = i == highlight
        fill = HIGHLIGHT if hi else colour(i)
        lw = base * 2 if hi else base
        if a.type is ActionType.DUAL_POINT and a.touch is not None and a.lift is not None:
            p0 = (a.touch[1] * W, a.touch[0] * H)
            p1 = (a.lift[1] * W, a.lift[0] * H)
            if a.is_tap:
                r = W / 22 + (3 if hi else 0)
                # A white halo under the ring keeps it visible on dark and same-hue widgets.
                h = r + 1
                draw.ellipse(
                    [p0[0] - h, p0[1] - h, p0[0] + h, p0[1] + h], outline=(255, 255, 255), width=lw + 2
                )
                draw.ellipse([p0[0] - r, p0[1] - r, p0[0] + r, p0[1] + r], outline=fill, width=lw)
                draw.ellipse([p0[0] - 2, p0[1] - 2, p0[0] + 2, p0[1] + 2], fill=fill)
                text_at = (p0[0] + r + 2, p0[1] - r)
            else:
                _arrow(draw, p0, p1, (255, 255, 255), lw + 2)
                _arrow(draw, p0, p1, fill, lw)
                text_at = (p1[0] + 4, p1[1] - 4)
            tx = min(max(0.0, text_at[0]), W - 12.0)
            ty = min(max(0.0, text_at[1]), H - 12.0)
            _badge(draw, (tx, ty), labels[i], fill, font, hi)
        elif a.type is ActionType.TYPE:
            text = f'{labels[i]}: type "{a.text}"'
            hgt = draw.textbbox((0, 0), text, font=font)[3] + 9
            bottom_y -= hgt
            _badge(draw, (6, bottom_y), text, fill, font, hi)
        else:
            text = f"{labels[i]}: {KEY_BADGES.get(a.type, a.type.value)}"
            top_y += _badge(draw, (6, top_y + 3), text, fill, font, hi)
    return img
