"""The behaviour model's screen reading: a model folder whose processor tiles the screen
(digiq.models.screen_tiles), and make_behaviour_model's option that clones from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from script_helpers import load_script

from digiq.errors import DigiqError
from digiq.models.screen_tiles import image_tokens, tile_screens
from digiq.models.tiny import parse_tiny_name
from digiq.models.vlm import build_tiny_vlm, load_vlm, save_vlm
from digiq.sim.v2.layout import home_slot_box

ROOT = Path(__file__).resolve().parents[1]


def _script():
    return load_script("make_behaviour_model")


def _saved(tmp_path: Path, name: str = "tiny:idefics3@image_size=64,patch=16,hidden=32,layers=1") -> Path:
    family, spec = parse_tiny_name(name)
    model, processor = build_tiny_vlm(family, spec, seed=0)
    return save_vlm(model, processor, tmp_path / "src")


def _count_image_tokens(processor, screen: Image.Image) -> int:
    enc = processor(text=["<image>Goal: open the Clock app"], images=[[screen]], return_tensors="pt")
    return int((enc["input_ids"] == processor.image_token_id).sum())


@pytest.mark.parametrize(("edge", "tiles"), [(128, 2 * 2), (192, 3 * 2)])
def test_tiles_reach_the_saved_processor_and_the_model_reads_them(tmp_path, edge, tiles):
    # A 64-px tower: a 180 x 320 screen resized to longest edge 128 becomes 128 x 128 (2 x 2 tiles); at 192,
    # 108 x 192 rounds up to 128 x 192 (3 rows x 2 columns). Each tile and the global view give 4 tokens.
    src = _saved(tmp_path)
    n = tile_screens(src, tmp_path / "tiled", edge)
    assert n == 4 * (tiles + 1)
    screen = Image.new("RGB", (180, 320), (40, 120, 200))
    model, processor = load_vlm(str(tmp_path / "tiled"))
    assert _count_image_tokens(processor, screen) == n
    _, plain = load_vlm(str(src))
    assert _count_image_tokens(plain, screen) == image_tokens(plain) == 4
    # The weights are the source's, bit for bit.
    src_model, _ = load_vlm(str(src))
    for (k, a), (_, b) in zip(src_model.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), k
    # The model runs on the tiles, and a fine-tuned export (save_vlm, as train-bc writes it) keeps them.
    enc = processor(text=["<image>Goal: x"], images=[[screen]], return_tensors="pt")
    with torch.no_grad():
        assert model(**enc).logits.shape[1] == enc["input_ids"].shape[1]
    save_vlm(model, processor, tmp_path / "export")
    _, again = load_vlm(str(tmp_path / "export"))
    assert _count_image_tokens(again, screen) == n


def test_tiles_reject_a_size_the_tower_cannot_cut_and_other_families(tmp_path):
    src = _saved(tmp_path)
    with pytest.raises(DigiqError, match="longest_edge 100 must be a multiple"):
        tile_screens(src, tmp_path / "bad", 100)
    with pytest.raises(DigiqError, match="longest_edge 64 must be a multiple"):
        tile_screens(src, tmp_path / "bad", 64)
    family, spec = parse_tiny_name("tiny:llava")
    llava = save_vlm(*build_tiny_vlm(family, spec, seed=0), tmp_path / "llava")
    with pytest.raises(DigiqError, match="not 'llava'"):
        tile_screens(llava, tmp_path / "bad", 128)


def test_behaviour_model_option_builds_the_tiled_start(tmp_path):
    mod = _script()
    src = _saved(tmp_path)
    cfg = mod.Config(start=str(src), tile_longest_edge=128)
    cfg.validate()
    start, tokens = mod.start_folder(cfg, tmp_path / "work")
    assert start == str(tmp_path / "work" / "start") and tokens == 20
    saved = json.loads((Path(start) / "processor_config.json").read_text())["image_processor"]
    assert saved["do_image_splitting"] is True and saved["size"] == {"longest_edge": 128}
    plain, tokens = mod.start_folder(mod.Config(start=str(src)), tmp_path / "work2")
    assert plain == str(src) and tokens == 4
    with pytest.raises(DigiqError, match="tile_longest_edge must be >= 0"):
        mod.Config(start=str(src), tile_longest_edge=-1).validate()


def _probe_script():
    return load_script("probe_home_screen")


def test_probe_scores_the_first_action_against_q_star():
    from digiq.actions import Action, ActionType
    from digiq.envs.sim import SimEnv, sim_policy_fn
    from digiq.sim.phone import SimConfig, SimPhone

    probe = _probe_script().probe
    phone = SimPhone(SimConfig(benchmark="v2"))
    n = 40
    best = probe(sim_policy_fn("optimal", phone), ("val",), episodes=n)["val"]
    assert best["optimal"] == 1.0 and best["on_app"] == 1.0 and best["wrong_app_opened"] == {}
    home = probe(lambda b: [Action.key(ActionType.PRESS_HOME).render()] * len(b), ("val",), episodes=n)["val"]
    assert home["optimal"] == 0.0 and home["on_app"] == 0.0
    # Always the same grid slot: right exactly where that tap reaches the state the optimal tap reaches
    # (the shuffled grid puts the goal's app there), counted here by stepping the device, not by Q*.
    env = SimEnv(phone=phone)
    starts = [env.reset(i).info["state"] for i in env.task_instances("val", n, 0)]
    tap = phone.optimal_actions(starts[0])[0]
    assert tap.type is ActionType.DUAL_POINT
    same = sum(
        phone.state_key(phone.step(s, tap)[0])
        == phone.state_key(phone.step(s, phone.optimal_actions(s)[0])[0])
        for s in starts
    )
    fixed = probe(lambda b: [tap.render()] * len(b), ("val",), episodes=n)["val"]
    assert fixed["on_app"] == 1.0 and fixed["optimal"] == same / n
    assert 0 < same < n


def test_zero_shot_grounding_is_one_ninth_for_a_fixed_tap():
    # Each screen has one app in every slot, so a fixed tap hits exactly one of the nine labels.
    from digiq.actions import Action

    probe = _probe_script()
    assert probe.ground(lambda b: [Action.tap(0.3, 0.5).render()] * len(b), episodes=5) == pytest.approx(
        1 / 9
    )
    assert probe.ground(lambda b: ["junk"] * len(b), episodes=5) == 0.0


def test_slot_probe_reads_linearly_coded_slots_and_not_noise():
    fit = _probe_script().fit_slot_probe
    g = torch.Generator().manual_seed(0)
    slots = torch.stack([torch.randperm(9, generator=g) for _ in range(400)])  # screens x apps
    coded = torch.nn.functional.one_hot(slots, 9).float().reshape(400, -1) + 0.1 * torch.randn(
        400, 81, generator=g
    )
    assert min(fit(coded, slots, 300)) > 0.9
    noise = torch.randn(400, 81, generator=g)
    assert max(fit(noise, slots, 300)) < 0.3


def _tile_colours(images: list) -> torch.Tensor:
    """Ideal features of a grid_colour screen: per slot, the one-hot of the palette colour nearest its fill."""
    import math

    from digiq.sim import synthetic as S

    names = sorted(S.GRID_COLOURS)
    rows = []
    for im in images:
        w, h = im.size
        row = []
        for slot in range(9):
            y0, x0, y1, _ = home_slot_box(slot)
            px = im.getpixel((round((x0 + 0.05) * w), round((y1 - 0.02) * h)))
            near = min(names, key=lambda n: math.dist(S.GRID_COLOURS[n], px))
            row.append(names.index(near))
        rows.append(torch.nn.functional.one_hot(torch.tensor(row), len(names)).float().reshape(-1))
    return torch.stack(rows)


def test_colour_token_probe_finds_each_colour_from_its_pixels_and_not_from_noise():
    probe = _probe_script().colour_token_probe
    ideal = probe(_tile_colours, n_train=800, n_test=150)
    assert len(ideal) == 14 and min(ideal.values()) > 0.9, ideal
    g = torch.Generator().manual_seed(0)
    noise = probe(lambda ims: torch.randn(len(ims), 126, generator=g), n_train=800, n_test=150)
    assert sum(noise.values()) / len(noise) < 0.25, noise


def test_token_position_probe_reads_positions_only_where_the_tokens_carry_them():
    probe = _probe_script().token_position_probe
    g = torch.Generator().manual_seed(0)

    # each of 16 tokens: a one-hot of its own index plus noise, or noise alone
    def with_pos(ims: list) -> torch.Tensor:
        return (torch.eye(16) + 0.15 * torch.randn(len(ims), 16, 16, generator=g)).reshape(len(ims), -1)

    assert probe(with_pos, 16, n_train=60, n_test=20) > 0.9
    assert probe(lambda ims: torch.randn(len(ims), 16 * 16, generator=g), 16, n_train=60, n_test=20) < 0.15


def test_slot_probabilities_are_the_answers_likelihoods(tmp_path: Path):
    import random

    from digiq.models.policy import build_chat_training_batch
    from digiq.sim import synthetic as S

    model, processor = load_vlm(str(_saved(tmp_path)))
    model.eval()
    sample = S.make_sample(random.Random(3), "grid_colour")
    p = _probe_script().slot_probabilities(model, processor, sample)
    assert p.shape == (9,) and float(p.sum()) == pytest.approx(1.0, abs=1e-5)
    # the same likelihoods from the model's own loss, one answer at a time (mean over its tokens)
    ll = []
    for i in range(9):
        y, x = S._centre(home_slot_box(i))
        batch = build_chat_training_batch(
            processor, [sample.image], [sample.question], [f"tap {S._pt(y, x)}"]
        )
        n = int((batch["labels"][:, 1:] != -100).sum())
        with torch.no_grad():
            ll.append(-float(model(**batch).loss) * n)
    assert torch.allclose(p, torch.softmax(torch.tensor(ll), 0), atol=1e-4)
