"""The pretraining stream's opt-in ``grid_colour`` skill: a goal naming a tile's colour on a v2-like 3 x 3 grid
of 9 distinct named colours -> a tap on that tile. Its text names colours only (never a v2 app, site or goal),
and with weight 0 (every config but gui-tiny-colour*.yaml) the stream is the one the shipped model saw.
``grid_colour_tiles`` < 9 colours only that many tiles (an easier stage); 9 draws exactly what it always drew."""

from __future__ import annotations

import hashlib
import itertools
import math
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
from digiq.stages import pretrain_vlm

ROOT = Path(__file__).resolve().parents[1]
GOAL = re.compile(r"^Goal: (?:Tap|Open) the ([a-z]+) (?:tile|app|icon)\nPrevious: none\nAction:$")


def _fill(screen: S.Screen, box: tuple[float, float, float, float]) -> tuple[int, int, int]:
    """A pixel of the tile's plain lower part (below its two label lines)."""
    w, h = screen.image.size
    return screen.image.getpixel((round((box[1] + 0.05) * w), round((box[2] - 0.02) * h)))


def _nearest(rgb: tuple[int, int, int]) -> str:
    return min(S.GRID_COLOURS, key=lambda n: math.dist(S.GRID_COLOURS[n], rgb))


def test_palette_names_stay_apart_under_the_jitter() -> None:
    # Two tiles can only be told apart by name if no jittered colour comes nearer another name's colour.
    worst = 2 * math.sqrt(3) * S._GRID_COLOUR_JITTER
    for a, b in itertools.combinations(S.GRID_COLOURS, 2):
        assert math.dist(S.GRID_COLOURS[a], S.GRID_COLOURS[b]) > worst, (a, b)
    assert 12 <= len(S.GRID_COLOURS) <= 16
    assert not {n.lower() for n in T.APPS} & set(S.GRID_COLOURS)


def test_answer_taps_the_tile_of_the_named_colour() -> None:
    forms: dict[str, int] = {}
    slots = [0] * 9
    for k in range(300):
        # the sample draws its screen first, so the same seed gives the screen and its slots' colour names
        screen, names = S.grid_colour_screen(random.Random(k), 180, 320)
        s = S.make_sample(random.Random(k), "grid_colour", 180, 320)
        assert s.image.tobytes() == screen.image.tobytes() and s.skill == "grid_colour"
        assert [e.box for e in screen.elements] == [home_slot_box(i) for i in range(9)]
        # nine distinct colours, each drawn as the one its name says
        assert len(set(names)) == 9
        assert [_nearest(_fill(screen, e.box)) for e in screen.elements] == names
        m = GOAL.match(s.question)
        assert m, s.question
        colour = m.group(1)
        verb, y, x = s.answer.split()
        hit = [i for i, e in enumerate(screen.elements) if inside((float(y), float(x)), e.box)]
        assert verb == "tap" and len(hit) == 1 and screen.elements[hit[0]].box == s.box
        assert names[hit[0]] == colour
        other = screen.elements[(hit[0] + 1) % 9].box
        assert S.is_correct(s, s.answer)
        assert not S.is_correct(s, f"tap {(other[0] + other[2]) / 2:.2f} {(other[1] + other[3]) / 2:.2f}")
        slots[hit[0]] += 1
        form = s.question.split("\n")[0].replace(colour, "<c>")
        forms[form] = forms.get(form, 0) + 1
    assert len(forms) == 3 and min(forms.values()) > 60, forms
    assert min(slots) > 15  # shuffled: the slot alone does not give the answer


def test_stream_names_colours_only_never_a_v2_app_or_goal() -> None:
    goals = {t.goal.lower() for split in ("train", "val", "test") for t in T.catalogue()[split]}
    v2_words = {a.lower() for a in T.APPS} | {f"{a.lower()}.com" for a in T.APPS}
    skills, weights = pretrain_vlm.SkillWeights(grid_colour=4.0).as_lists()
    assert skills[-1] == "grid_colour"
    n = 0
    for i in range(1500):
        s = S.sample_stream_item(7, i, i % 32, skills, weights, 90, 160)
        if s.skill != "grid_colour":
            continue  # the other skills' text is checked in tests/test_pretrain.py
        n += 1
        text = f"{s.question}\n{s.answer}".lower()
        assert not any(g in text for g in goals), text
        assert not set(re.findall(r"[a-z0-9.]+", text)) & v2_words, text
        screen, _ = S.grid_colour_screen(random.Random(f"7:{i}:{i % 32}"), 90, 160)
        labels = {e.label.lower() for e in screen.elements}
        # the labels are made-up distractors: no v2 app, no colour word, never named by the goal
        assert not labels & ({a.lower() for a in T.APPS} | set(S.GRID_COLOURS)), labels
        assert not any(label in text for label in labels), text
    assert n > 200


def test_only_the_colour_config_uses_the_skill_and_the_grid_stream_is_unchanged() -> None:
    for f in sorted((ROOT / "configs/pretrain-vlm").glob("*.yaml")):
        skills = yaml.safe_load(f.read_text()).get("skills", {})
        uses = f.name in ("gui-tiny-colour.yaml", "gui-tiny-colour2.yaml")
        assert (skills.get("grid_colour", 0) > 0) == uses, f.name
    cfg = load_config(pretrain_vlm.Config, ROOT / "configs/pretrain-vlm/gui-tiny-colour.yaml")
    assert cfg.model.name_or_path == "data/pretrained/gui-tiny" and cfg.skills.grid_colour > 0
    assert cfg.skills.grid == 0 and not cfg.export_dir  # a research run, never written over a shipped model
    # The grid skill's drawing was shared with grid_colour: its questions are those gui-tiny-grid was trained
    # on (hash of 100 samples computed before the change).
    h = hashlib.sha256()
    for k in range(100):
        s = S.make_sample(random.Random(f"grid:{k}"), "grid", 90, 160)
        h.update(f"{s.question}|{s.answer}|{s.box}\n".encode())
    assert h.hexdigest() == "bc1c04144c16d2f19ebe95c9eb524bf7d59184d183c928f711d082fb8e02cce9"
    samples = pretrain_vlm.evaluation_samples(1, 3, 90, 160, skills=["grid_colour"])
    assert [s.skill for s in samples] == ["grid_colour"] * 3


def _stream_hash(**kw: int) -> str:
    h = hashlib.sha256()
    for k in range(60):
        s = S.make_sample(random.Random(f"colour:{k}"), "grid_colour", 90, 160, **kw)
        h.update(s.image.tobytes())
        h.update(f"{s.question}|{s.answer}|{s.box}\n".encode())
    for i in range(60):
        s = S.sample_stream_item(3, i, i % 32, ["ground", "grid_colour"], [1.0, 1.0], 90, 160, **kw)
        h.update(s.image.tobytes())
        h.update(f"{s.question}|{s.answer}|{s.box}\n".encode())
    return h.hexdigest()


def test_nine_coloured_tiles_draw_the_stream_gui_tiny_colour_was_trained_on() -> None:
    # pixels, questions and answers of 120 samples, hashed with the code before the tiles knob existed
    pinned = "6c4a45606b90b0381d44843d0dc5bbfbe643110e5623e23bfb00921d2606eea6"
    assert _stream_hash() == pinned
    assert _stream_hash(grid_colour_tiles=9) == pinned
    assert _stream_hash(grid_colour_tiles=2) != pinned


def test_two_coloured_tiles_the_goal_names_one_and_the_answer_taps_it() -> None:
    neutral_near = min(math.dist(S.GRID_NEUTRAL, c) for c in S.GRID_COLOURS.values())
    assert neutral_near > 2 * math.sqrt(3) * S._GRID_COLOUR_JITTER
    slots, named_slots = [0] * 9, [0] * 9
    for k in range(200):
        screen, names = S.grid_colour_screen(random.Random(k), 180, 320, coloured=2)
        s = S.make_sample(random.Random(k), "grid_colour", 180, 320, grid_colour_tiles=2)
        assert s.image.tobytes() == screen.image.tobytes()
        coloured = [i for i, n in enumerate(names) if n]
        assert len(coloured) == 2 and len({names[i] for i in coloured}) == 2
        # the pixels agree: two tiles in their named colours, seven in the one neutral fill
        for i, e in enumerate(screen.elements):
            fill = _fill(screen, e.box)
            if names[i]:
                assert _nearest(fill) == names[i] and math.dist(fill, S.GRID_COLOURS[names[i]]) <= 21
            else:
                assert fill == S.GRID_NEUTRAL
        m = GOAL.match(s.question)
        assert m, s.question
        verb, y, x = s.answer.split()
        hit = [i for i, e in enumerate(screen.elements) if inside((float(y), float(x)), e.box)]
        assert verb == "tap" and len(hit) == 1 and screen.elements[hit[0]].box == s.box
        assert names[hit[0]] == m.group(1) and hit[0] in coloured
        # the answer is the tile's centre
        b = s.box
        assert (float(y), float(x)) == (round((b[0] + b[2]) / 2, 2), round((b[1] + b[3]) / 2, 2))
        for i in coloured:
            slots[i] += 1
        named_slots[hit[0]] += 1
    assert min(slots) > 20 and min(named_slots) > 8  # the coloured tiles and the target move over the grid
    # the evaluation questions follow the knob too
    ev = pretrain_vlm.evaluation_samples(1, 5, 90, 160, skills=["grid_colour"], grid_colour_tiles=2)
    for i, s in enumerate(ev):
        _, names = S.grid_colour_screen(random.Random(f"eval:1:grid_colour:{i}"), 90, 160, coloured=2)
        assert sum(bool(n) for n in names) == 2 and GOAL.match(s.question).group(1) in names


@pytest.mark.parametrize("bad", [0, 1, 10, 2.0, True])
def test_a_tile_count_outside_two_to_nine_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match=rf"grid_colour_tiles must be an integer in \[2, 9\], got {bad!r}"):
        S.make_sample(random.Random(0), "grid_colour", 90, 160, grid_colour_tiles=bad)  # type: ignore[arg-type]
    cfg = pretrain_vlm.Config()
    cfg.grid_colour_tiles = bad  # type: ignore[assignment]
    with pytest.raises(Exception, match=r"grid_colour_tiles must be an integer in \[2, 9\]"):
        cfg.validate()


def test_the_two_tile_config_is_the_colour_run_at_two_tiles() -> None:
    base = load_config(pretrain_vlm.Config, ROOT / "configs/pretrain-vlm/gui-tiny-colour.yaml")
    two = load_config(pretrain_vlm.Config, ROOT / "configs/pretrain-vlm/gui-tiny-colour2.yaml")
    assert base.grid_colour_tiles == 9 and two.grid_colour_tiles == 2
    assert (two.skills, two.train, two.optim, two.seed) == (base.skills, base.train, base.optim, base.seed)
    assert two.model.name_or_path == "data/pretrained/gui-tiny" and not two.export_dir
    assert two.output_dir != base.output_dir and not two.output_dir.startswith("data/")
