"""The Stage-1 label: did the action visibly change the screen?

Official rule (DigiRL-agent/digiq @ 8181379,
``postprocess_data/get_more_actions/construct_sft_data.py:23-37``): both screenshots at 0.25x resolution,
``diff = mean((s_t - s_{t+1})^2)`` over all pixels and channels on the 0-255 scale, answer "Yes" iff
``diff > 30``. The official images were pre-downscaled to 0.25x by a separate script; we resize both images
here with PIL's BILINEAR filter (with ``reducing_gap=None``, PIL >= 9 antialiases when downscaling with
BILINEAR, i.e. a triangle filter over the source footprint), so the label does not depend on how a dataset
stores its screenshots.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from PIL import Image

DEFAULT_SCALE = 0.25
DEFAULT_EPS = 30.0
# PIL resampling filter of the 0.25x downscale.
RESAMPLE = Image.Resampling.BILINEAR


def _small(img: Image.Image, scale: float) -> np.ndarray:
    img = img.convert("RGB")
    if scale != 1.0:
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, RESAMPLE)
    return np.asarray(img, dtype=np.float64)


def screen_diff(before: Image.Image, after: Image.Image, scale: float = DEFAULT_SCALE) -> float:
    """Mean squared difference (0-255 scale, all pixels and channels) of the two screens at ``scale``."""
    a, b = _small(before, scale), _small(after, scale)
    if a.shape != b.shape:
        # A rotated / resized next screen changed by definition; compare at the first image's size.
        b = np.asarray(after.convert("RGB").resize((a.shape[1], a.shape[0]), RESAMPLE), dtype=np.float64)
    return float(np.mean((a - b) ** 2))


def screen_changed(
    before: Image.Image, after: Image.Image, eps: float = DEFAULT_EPS, scale: float = DEFAULT_SCALE
) -> int:
    """1 if the screen changed by more than ``eps`` (official: 30), else 0."""
    return int(screen_diff(before, after, scale) > eps)


def label_stats(labels: Iterable[int]) -> dict[str, float]:
    """Class balance: count, positives, positive fraction and the majority-class accuracy."""
    y = np.asarray(list(labels), dtype=np.int64)
    n = int(y.size)
    pos = int(y.sum())
    frac = pos / n if n else 0.0
    return {"count": n, "positives": pos, "positive_fraction": frac, "majority_accuracy": max(frac, 1 - frac)}


def dataset_labels(
    ds: Any, eps: float = DEFAULT_EPS, scale: float = DEFAULT_SCALE, source: str = "dataset"
) -> np.ndarray:
    """The label of every row of a digiq dataset (``screenshot`` vs ``next_screenshot``), int64 (R,).

    Images go through :func:`digiq.data.schema.iter_decoded_rows`: a missing or corrupt screenshot is a
    DataError naming ``source``, the trajectory, the step and the column.
    """
    from digiq.data.schema import iter_decoded_rows  # schema imports datasets: keep this module light

    labels = np.zeros(len(ds), dtype=np.int64)
    for i, row in enumerate(iter_decoded_rows(ds, ["screenshot", "next_screenshot"], source)):
        labels[i] = screen_changed(row["screenshot"], row["next_screenshot"], eps, scale)
    return labels
