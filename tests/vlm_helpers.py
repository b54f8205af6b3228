"""Small synthetic datasets for the Stage-1 tests: PIL screens + digiq schema rows (no simulator needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from datasets import Dataset
from PIL import Image, ImageDraw

from digiq.actions import Action, ActionType, make_observation
from digiq.data.schema import FEATURES, save_dataset


def screen(colour: tuple[int, int, int], box: bool, size: tuple[int, int] = (90, 160)) -> Image.Image:
    img = Image.new("RGB", size, colour)
    if box:
        d = ImageDraw.Draw(img)
        d.rectangle([10, 20, 80, 60], fill=(20, 20, 200))
    return img


def make_dataset(path: Path, n_traj: int = 8, steps: int = 4, seed: int = 0) -> Path:
    """Trajectories where a tap in the top half (on the 'button') changes the screen and others do not."""
    rng = np.random.default_rng(seed)
    rows = {k: [] for k in FEATURES}
    for t in range(n_traj):
        prev = None
        colour = (240, 240, 240)
        for s in range(steps):
            kind = rng.integers(0, 4)
            if kind == 0:
                a = Action.tap(float(rng.uniform(0.1, 0.4)), float(rng.uniform(0.1, 0.9)))
                nxt = (40, 160, 40) if colour == (240, 240, 240) else (240, 240, 240)
            elif kind == 1:
                a = Action.tap(float(rng.uniform(0.6, 0.9)), float(rng.uniform(0.1, 0.9)))
                nxt = colour
            elif kind == 2:
                a = Action.type_text("usb cable")
                nxt = colour
            else:
                a = Action.key(ActionType.PRESS_HOME)
                nxt = (200, 120, 40)
            rows["traj_id"].append(t)
            rows["step_id"].append(s)
            rows["task"].append("Turn on wifi")
            rows["observation"].append(make_observation("Turn on wifi", prev))
            rows["screenshot"].append(screen(colour, True))
            rows["next_screenshot"].append(screen(nxt, True))
            rows["action"].append(a.render())
            rows["reward"].append(float(s == steps - 1 and t % 2 == 0))
            rows["done"].append(s == steps - 1)
            rows["mc_return"].append(0.0)
            rows["candidates"].append([])
            rows["state_key"].append("")
            prev, colour = a, nxt
    ds = Dataset.from_dict(rows, features=FEATURES)
    return save_dataset(ds, path)
