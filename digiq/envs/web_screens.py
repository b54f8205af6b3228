"""Web screens for pretraining: MiniWoB++ pages of tasks *outside* the pipeline's task list, with grounding and
referring labels read from the DOM (the model has seen web pages, not the tasks it will solve).

``collect_web_screens`` opens each task of ``WebScreensConfig.tasks`` on a run of page seeds, and keeps the
first screen and, half of the time, the screen after one click on a random visible element (menus open, tabs
switch, dialogs close). Each screen keeps its visible text elements with their boxes (normalised y0 x0 y1 x1).
Nothing about a task's solution is kept: no goal-to-action pairs, rewards or success, only "where is this
text" and "what text is here" - the labels of the synthetic stream (:mod:`digiq.sim.synthetic`), on real
pages. The last ``eval_fraction`` of the screens (their own page seeds) are held out for the accuracy table.
"""

from __future__ import annotations

import dataclasses
import io
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from digiq.actions import Action
from digiq.config import check
from digiq.envs.base import TaskInstance
from digiq.envs.miniwob import DEFAULT_TASKS, MiniWoBConfig, MiniWoBEnv
from digiq.models.prompts import render_image
from digiq.sim.layout import inside
from digiq.sim.synthetic import Sample
from digiq.utils.logging import get_logger

log = get_logger(__name__)
WEB_SKILLS = ("web_ground", "web_refer")
# MiniWoB++ tasks none of which is in the pipeline's list (DEFAULT_TASKS), chosen for varied layouts: menus,
# tabs, tables, forms, lists, dialogs, text.
WEB_TASKS = (
    "click-collapsible",
    "click-collapsible-2",
    "click-menu-2",
    "click-scroll-list",
    "click-tab-2",
    "click-test-2",
    "click-widget",
    "click-dialog-2",
    "click-checkboxes-soft",
    "click-checkboxes-transfer",
    "email-inbox",
    "login-user-popup",
    "multi-layouts",
    "multi-orderings",
    "read-table",
    "search-engine",
    "social-media",
    "terminal",
    "text-transform",
    "use-autocomplete",
    "book-flight",
    "social-media-some",
    "email-inbox-forward-nl",
    "click-checkboxes-large",
    "click-tab-2-hard",
)
MAX_LABEL = 24


@dataclasses.dataclass
class WebScreensConfig:
    # MiniWoB++ tasks to take screens from; none may be a task the pipeline solves (miniwob DEFAULT_TASKS).
    tasks: list[str] = dataclasses.field(default_factory=lambda: list(WEB_TASKS))
    # Screens to keep (first screens and after-a-click screens together).
    num_screens: int = 600
    # Page seeds start here (one run of seeds per task).
    seed: int = 0
    # The last fraction of screens (their own seeds) is held out for evaluation.
    eval_fraction: float = 0.15
    # Chromium's scratch folder ("" = <cwd>/.digiq-browser).
    scratch_dir: str = ""

    def validate(self, where: str = "web") -> None:
        check(self.num_screens > 0, f"{where}.num_screens must be > 0")
        check(0 < self.eval_fraction < 1, f"{where}.eval_fraction must be in (0, 1)")
        clash = sorted(set(self.tasks) & set(DEFAULT_TASKS))
        check(not clash, f"{where}.tasks must not include the pipeline's MiniWoB++ tasks: {clash}")


def _labels(info: dict) -> list[dict]:
    """Visible leaf text elements (short labels) as ``{text, box}``, box normalised (y0, x0, y1, x1)."""
    w, h = info["screen_size"]
    out = []
    for e in info["dom_elements"]:
        text = " ".join(str(e.get("text") or "").split())
        if not text or len(text) > MAX_LABEL:
            continue
        x0, y0 = e["left"], e["top"]
        x1, y1 = x0 + e["width"], y0 + e["height"]
        if e["width"] < 3 or e["height"] < 3 or x0 < 0 or y0 < 0 or x1 > w or y1 > h:
            continue
        out.append({"text": text, "box": [y0 / h, x0 / w, y1 / h, x1 / w]})
    return out


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def collect_web_screens(cfg: WebScreensConfig, progress: bool = True) -> list[dict]:
    """Rows ``{png, task, seed, labels (json), split}``; screens with fewer than two labels are skipped."""
    from tqdm.auto import tqdm

    env = MiniWoBEnv(MiniWoBConfig(tasks=list(cfg.tasks), scratch_dir=cfg.scratch_dir))
    rows: list[dict] = []
    n_eval = max(1, int(round(cfg.num_screens * cfg.eval_fraction)))
    rng = np.random.default_rng(cfg.seed)
    bar = tqdm(total=cfg.num_screens, desc="web screens", unit="screen", disable=not progress)
    try:
        # Task-major (one page switch per task and split); training seeds first, evaluation seeds after.
        for split, count in (("train", cfg.num_screens - n_eval), ("eval", n_eval)):
            base = cfg.seed * 1_000_000 + (500_000 if split == "eval" else 0)
            quotas = [count // len(cfg.tasks) + (i < count % len(cfg.tasks)) for i in range(len(cfg.tasks))]
            for task, quota in zip(cfg.tasks, quotas):
                got = 0
                for k in range(
                    4 * quota
                ):  # a page with too few labels is skipped; give up on a task after 4x
                    if got >= quota:
                        break
                    obs = env.reset(TaskInstance(task, base + k))
                    shots = [obs]
                    labels = _labels(obs.info)
                    if labels and rng.random() < 0.5:
                        y0, x0, y1, x1 = labels[int(rng.integers(len(labels)))]["box"]
                        res = env.step(Action.tap((y0 + y1) / 2, (x0 + x1) / 2))
                        if not res.done:
                            shots.append(res.observation)
                    for o in shots:
                        lab = _labels(o.info)
                        if len(lab) >= 2 and got < quota:
                            rows.append(
                                {"png": _png(o.screenshot), "task": task, "seed": base + k,
                                 "labels": json.dumps(lab), "split": split}
                            )  # fmt: skip
                            got += 1
                            bar.update(1)
    finally:
        env.close()
        bar.close()
    return rows


def save_web_screens(rows: list[dict], path: str | Path, cfg: WebScreensConfig) -> Path:
    from datasets import Dataset, Features, Value
    from datasets import Image as HFImage

    from digiq.data.schema import save_dataset

    feats = Features(
        {"image": HFImage(), "task": Value("string"), "seed": Value("int64"), "labels": Value("string"),
         "split": Value("string")}
    )  # fmt: skip
    cols = {
        "image": [{"bytes": r["png"], "path": None} for r in rows],
        "task": [r["task"] for r in rows],
        "seed": [r["seed"] for r in rows],
        "labels": [r["labels"] for r in rows],
        "split": [r["split"] for r in rows],
    }
    return save_dataset(
        Dataset.from_dict(cols, features=feats),
        path,
        {"web_screens": dataclasses.asdict(cfg)},
        overwrite=False,
    )


@dataclasses.dataclass
class WebScreen:
    image: Image.Image
    labels: list[dict]


def load_web_screens(path: str | Path, split: str) -> list[WebScreen]:
    from datasets import load_from_disk

    ds = load_from_disk(str(path))
    out = []
    for row in ds:
        if row["split"] == split:
            img = row["image"].convert("RGB")
            img.load()
            out.append(WebScreen(img, json.loads(row["labels"])))
    if not out:
        raise ValueError(f"{path}: no {split} screens")
    return out


def make_web_sample(rng: random.Random, skill: str, bank: list[WebScreen]) -> Sample:
    """A grounding or referring question on a web screen (the synthetic skills' wording and answers)."""
    s = bank[rng.randrange(len(bank))]
    if skill == "web_ground":
        counts: dict[str, int] = {}
        for lab in s.labels:
            counts[lab["text"].lower()] = counts.get(lab["text"].lower(), 0) + 1
        unique = [lab for lab in s.labels if counts[lab["text"].lower()] == 1] or s.labels
        lab = unique[rng.randrange(len(unique))]
        y0, x0, y1, x1 = lab["box"]
        q = (
            f'Goal: Tap "{lab["text"]}"\nPrevious: none\nAction:'
            if rng.random() < 0.5
            else f'Where is "{lab["text"]}"?'
        )
        return Sample(s.image, q, f"tap {(y0 + y1) / 2:.2f} {(x0 + x1) / 2:.2f}", skill, (y0, x0, y1, x1))
    if skill == "web_refer":
        if rng.random() < 0.7:
            y0, x0, y1, x1 = s.labels[rng.randrange(len(s.labels))]["box"]
            y = rng.uniform(y0 + 0.2 * (y1 - y0), y1 - 0.2 * (y1 - y0))
            x = rng.uniform(x0 + 0.2 * (x1 - x0), x1 - 0.2 * (x1 - x0))
        else:
            y, x = rng.uniform(0.02, 0.98), rng.uniform(0.02, 0.98)
        # The innermost (smallest) label box under the point names it; none = "nothing".
        hits = [lab for lab in s.labels if inside((y, x), tuple(lab["box"]))]
        hit = min(
            hits,
            key=lambda lab: (lab["box"][2] - lab["box"][0]) * (lab["box"][3] - lab["box"][1]),
            default=None,
        )
        answer = hit["text"] if hit is not None else "nothing"
        if rng.random() < 0.5:
            return Sample(
                render_image(s.image, Action.tap(y, x), "overlay"), "What is under the cursor?", answer, skill
            )
        return Sample(s.image, f"What is at {y:.2f} {x:.2f}?", answer, skill)
    raise ValueError(f"unknown web skill {skill!r}; expected one of {WEB_SKILLS}")


def bank_summary(path: str | Path) -> dict[str, Any]:
    from datasets import load_from_disk

    ds = load_from_disk(str(path))
    return {
        "screens": len(ds),
        "tasks": len(set(ds["task"])),
        "eval_screens": sum(s == "eval" for s in ds["split"]),
    }
