"""The pretraining stream's opt-in ``grid`` skill: a goal naming a made-up app on a v2-like shuffled app grid
-> a tap on its tile. It never targets (or names) a v2 app, so no validation or test goal nor its first action
is in the stream, and with weight 0 (every existing config) the stream is the one the shipped model saw."""

from __future__ import annotations

import hashlib
import random
import re
from pathlib import Path

import pytest
import yaml

from digiq.config import load_config
from digiq.sim import synthetic as S
from digiq.sim.layout import inside
from digiq.sim.v2 import tasks as T
from digiq.sim.v2.layout import home_slot_box
from digiq.sim.v2.render import APP_COLOURS
from digiq.stages import pretrain_vlm

ROOT = Path(__file__).resolve().parents[1]
# docs/benchmark_v2.md: the "Open the <App> app" goals held out for val (BuyNow, PriceHive) and test
# (MegaBasket, Browser).
HELD_OUT_APPS = {"BuyNow", "PriceHive", "MegaBasket", "Browser"}
GRID_ONLY = (["grid"], [1.0])


def _goal_name(question: str) -> str:
    """The app a grid question names, in lower case, from whichever of its three forms it takes."""
    goal = question.split("\n")[0].removeprefix("Goal: ")
    for pattern in (r'^Tap "(.+)"$', r"^Open the (\S+) app$", r"^Go to (\S+)\.com, search for "):
        m = re.match(pattern, goal)
        if m:
            return m.group(1).replace(" ", "").lower()
    raise AssertionError(f"unexpected grid goal {goal!r}")


def test_grid_answer_taps_the_tile_that_shows_the_named_app() -> None:
    forms = {"tap": 0, "open": 0, "go": 0}
    slots = [0] * 9
    for k in range(300):
        # the sample draws its screen first, so the same seed gives the screen with its tiles' labels
        screen, made = S.grid_screen(random.Random(k), 180, 320)
        s = S.make_sample(random.Random(k), "grid", 180, 320)
        assert s.image.tobytes() == screen.image.tobytes() and s.skill == "grid"
        assert [e.box for e in screen.elements] == [home_slot_box(i) for i in range(9)]
        verb, y, x = s.answer.split()
        hit = [e for e in screen.elements if inside((float(y), float(x)), e.box)]
        assert verb == "tap"
        assert len(hit) == 1 and hit[0].box == s.box
        assert hit[0].label in made and hit[0].label.lower() == _goal_name(s.question)
        assert S.is_correct(s, s.answer) and not S.is_correct(s, "tap 0.95 0.50")
        slots[screen.elements.index(hit[0])] += 1
        first = s.question.split()[1]
        forms["tap" if first == "Tap" else "open" if first == "Open" else "go"] += 1
    assert all(v > 50 for v in forms.values()), forms
    assert min(slots) > 15  # shuffled: the slot alone does not give the answer


def test_v2_apps_are_only_distractors_in_their_own_colours() -> None:
    seen = dict.fromkeys(T.APPS, 0)
    for k in range(200):
        screen, made = S.grid_screen(random.Random(k), 180, 320)
        assert made and not {m.lower() for m in made} & {a.lower() for a in T.APPS}
        for e in screen.elements:
            # a pixel of the tile's plain lower part: v2's apps keep the colour v2 draws them in
            px = screen.image.getpixel((round((e.box[1] + 0.05) * 180), round((e.box[2] - 0.02) * 320)))
            if e.label in T.APPS:
                seen[e.label] += 1
                assert px == APP_COLOURS[T.APPS.index(e.label)], e.label
            else:
                assert px in APP_COLOURS
    assert all(n > 40 for n in seen.values()), seen  # the held-out apps do appear, as distractors


def test_stream_never_targets_a_v2_app_nor_holds_a_val_or_test_goal() -> None:
    goals = {t.goal.lower() for split in ("val", "test") for t in T.catalogue()[split]}
    v2_names = {a.lower() for a in T.APPS}
    # the held-out apps by name and site; "browser" alone is also a screen kind of the screen skill
    held = {a.lower() for a in HELD_OUT_APPS} | {f"{a.lower()}.com" for a in HELD_OUT_APPS}
    skills, weights = pretrain_vlm.SkillWeights(grid=4.0).as_lists()
    n_grid = 0
    for i in range(1500):
        s = S.sample_stream_item(7, i, i % 32, skills, weights, 90, 160)
        text = f"{s.question}\n{s.answer}".lower()
        assert not any(g in text for g in goals), text
        if s.skill == "grid":
            n_grid += 1
            assert _goal_name(s.question) not in v2_names, text
            tokens = set(re.findall(r"[a-z0-9.]+", text)) | set(re.findall(r"[a-z0-9]+", text))
            assert not tokens & held, text
            assert not any(f'tap "{" ".join(re.findall("[A-Z][a-z]*", a))}"'.lower() in text for a in T.APPS)
    assert n_grid > 200


def test_existing_configs_keep_their_stream() -> None:
    # Every shipped config leaves grid at 0, and gui-tiny's stream is the one it was trained on: the hash of
    # 200 samples' text, computed before the grid skill existed.
    for f in sorted((ROOT / "configs/pretrain-vlm").glob("*.yaml")):
        skills = yaml.safe_load(f.read_text()).get("skills", {})
        assert (skills.get("grid", 0) > 0) == (f.name == "gui-tiny-grid.yaml"), f.name
    cfg = load_config(pretrain_vlm.Config, ROOT / "configs/pretrain-vlm/gui-tiny.yaml")
    skills, weights = cfg.skills.as_lists()
    assert "grid" not in skills
    h = hashlib.sha256()
    for t in range(200):
        s = S.sample_stream_item(0, t, t % 32, skills, weights, 90, 160)
        h.update(f"{s.skill}|{s.question}|{s.answer}\n".encode())
    assert h.hexdigest() == "9acc46a5539b85d627599bd37fb1a73b96fd6e06121fa1e04aaa67f941cfa22d"


def test_grid_config_starts_from_gui_tiny_and_scores_the_skill() -> None:
    cfg = load_config(pretrain_vlm.Config, ROOT / "configs/pretrain-vlm/gui-tiny-grid.yaml")
    assert cfg.model.name_or_path == "data/pretrained/gui-tiny" and cfg.skills.grid > 0
    assert not cfg.export_dir  # a research run, never written over a shipped model
    samples = pretrain_vlm.evaluation_samples(1, 3, 90, 160, skills=["grid", "ground"])
    assert [s.skill for s in samples] == ["grid"] * 3 + ["ground"] * 3
    with pytest.raises(ValueError, match="grid"):
        S.make_sample(random.Random(0), "fly")
