"""`digiq sim collect` / `digiq sim rollout`: valid, deterministic datasets in the digiq schema."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from killresume import digiq_env
from PIL import Image

from digiq.actions import make_observation, parse_action
from digiq.data.schema import INFO_FILE, dataset_info, discounted_returns, load_dataset, trajectory_bounds
from digiq.sim.phone import SimConfig, SimPhone
from digiq.stages import collect

ROOT = Path(__file__).resolve().parents[1]


def _cfg(tmp: Path, **kw) -> collect.Config:
    base = {"output_dir": str(tmp), "num_trajectories": 12, "sim": SimConfig(width=90, height=160)}
    base.update(kw)
    return collect.Config(**base)


def test_collect_writes_valid_dataset(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path / "d", num_candidates=4, gamma=0.9)
    stats = collect.run(cfg)
    ds = load_dataset(cfg.output_dir)  # validates the schema, step order and completion marker
    info = dataset_info(cfg.output_dir)
    assert info["source"] == "sim" and info["gamma"] == 0.9 and info["sim"]["width"] == 90
    assert 0.0 <= info["success_rate"] <= 1.0 and info["num_steps"] == len(ds) == stats["num_steps"]
    assert 0.0 < info["screen_change_fraction"] < 1.0
    phone = SimPhone(cfg.sim)
    bounds = trajectory_bounds(ds)
    assert len(bounds) == 12
    rows = ds.to_dict()
    successes = 0
    for s, e in bounds:
        rewards = rows["reward"][s:e]
        np.testing.assert_allclose(rows["mc_return"][s:e], discounted_returns(rewards, 0.9), atol=1e-6)
        assert rows["done"][e - 1] and not any(rows["done"][s : e - 1])
        successes += rewards[-1] > 0
        prev = None
        for i in range(s, e):
            key = rows["state_key"][i]
            state = phone.state_from_key(key)
            assert rows["observation"][i] == make_observation(rows["task"][i], prev)
            assert rows["candidates"][i][0] == rows["action"][i] and len(rows["candidates"][i]) == 4
            # the stored transition is the device's: reward, next screen, next row's state
            nxt, r, _ = phone.transition(state, rows["action"][i])
            assert r == rows["reward"][i]
            shot = Image.open(io.BytesIO(rows["next_screenshot"][i]["bytes"]))
            assert np.array_equal(np.asarray(shot), np.asarray(phone.render(nxt)))
            if i + 1 < e:
                assert rows["state_key"][i + 1] == nxt.key
                assert rows["screenshot"][i + 1]["bytes"] == rows["next_screenshot"][i]["bytes"]
            prev = parse_action(rows["action"][i])
    assert successes / 12 == pytest.approx(info["success_rate"])
    assert ds[0]["screenshot"].size == (90, 160)


def test_collect_deterministic_under_seed(tmp_path: Path) -> None:
    a = collect.collect_columns(_cfg(tmp_path, seed=3), progress=False)[0]
    b = collect.collect_columns(_cfg(tmp_path, seed=3), progress=False)[0]
    c = collect.collect_columns(_cfg(tmp_path, seed=4), progress=False)[0]
    assert a == b
    assert a["action"] != c["action"]
    # candidates come from their own stream: the dataset actions do not depend on num_candidates
    d = collect.collect_columns(_cfg(tmp_path, seed=3, num_candidates=3), progress=False)[0]
    assert d["action"] == a["action"] and d["state_key"] == a["state_key"]


def test_collect_written_folders_identical(tmp_path: Path) -> None:
    for name in ("x", "y"):
        collect.run(_cfg(tmp_path / name, num_trajectories=5, seed=1))
    dx, dy = load_dataset(tmp_path / "x"), load_dataset(tmp_path / "y")
    assert dx.to_dict() == dy.to_dict()
    ix = json.loads((tmp_path / "x" / INFO_FILE).read_text())
    iy = json.loads((tmp_path / "y" / INFO_FILE).read_text())
    ix.pop("config"), iy.pop("config")
    assert ix == iy


@pytest.mark.slow
def test_cli_collect_and_rollout(tmp_path: Path) -> None:
    env = digiq_env()
    out = tmp_path / "data"
    proc = subprocess.run(
        [sys.executable, "-m", "digiq", "sim", "collect", "--config", "configs/sim_collect/small.yaml",
         f"output_dir={out}", "num_trajectories=6"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert len(load_dataset(out)) > 6
    proc = subprocess.run(
        [sys.executable, "-m", "digiq", "sim", "rollout", "policy=optimal", "num_episodes=10",
         f"output_dir={tmp_path / 'roll'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "success 1.000" in proc.stdout
    assert json.loads((tmp_path / "roll" / "metrics.json").read_text())["success_rate"] == 1.0
    proc = subprocess.run(
        [sys.executable, "-m", "digiq", "sim", "rollout", f"policy={tmp_path / 'missing'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1 and "neither a built-in policy" in proc.stderr


@pytest.mark.slow
def test_a_model_behaviour_policy_collects_by_sampling(tmp_path: Path) -> None:
    """The paper's protocol: a pixel model (here the shipped GUI-pretrained policy) collects the data by
    sampling; the same seed collects the same episodes, and greedy collection takes the model's greedy action."""
    from digiq.config import ConfigError
    from digiq.models.policy import generate_actions, load_policy
    from digiq.models.shipped import GUI_TINY, resolve_model_folder

    model = resolve_model_folder(GUI_TINY)
    kw = {"num_trajectories": 4, "policy": model, "batch_size": 4}

    def run(name: str, **extra):
        collect.run(_cfg(tmp_path / name, **kw, **extra))
        return load_dataset(tmp_path / name)

    a, b, c = run("a", temperature=1.0), run("b", temperature=1.0), run("c", temperature=1.0, seed=1)
    assert a["action"] == b["action"] and a["state_key"] == b["state_key"]
    assert a["action"] != c["action"]
    assert dataset_info(tmp_path / "a")["config"]["policy"] == model

    g = run("g", temperature=0.0)
    m, processor, spec = load_policy(model, device="cpu")
    rows = g.select(range(3))
    want = generate_actions(
        m, processor, list(rows["screenshot"]), list(rows["observation"]), temperature=0.0, spec=spec
    )
    assert list(rows["action"]) == [w[0] for w in want]

    with pytest.raises(ConfigError, match="num_candidates must be 0"):
        _cfg(tmp_path / "x", num_candidates=4, **kw).validate()
    _cfg(tmp_path / "x", env="miniwob", **kw).validate()  # devices collected in shards too
    with pytest.raises(ConfigError, match="neither 'scripted' nor an existing policy folder"):
        _cfg(tmp_path / "x", policy=str(tmp_path / "nope")).validate()


def test_v2_collection_draws_each_episode_its_own_start(tmp_path: Path) -> None:
    """Benchmark v2 randomises starts: collected episodes carry distinct start seeds, so two episodes of one
    task differ in layout; the same seed collects the same dataset; the validation split is collectable."""
    sim = SimConfig(width=90, height=160, benchmark="v2")
    cfg = _cfg(tmp_path / "a", num_trajectories=40, sim=sim)
    collect.run(cfg)
    ds = load_dataset(cfg.output_dir)
    firsts = [k for k, s in zip(ds["state_key"], ds["step_id"]) if s == 0]
    seeds = [int(k.split("|")[1]) for k in firsts]
    assert len(set(seeds)) == len(firsts) == 40
    assert all(k.startswith("v2/train/") for k in firsts)
    collect.run(_cfg(tmp_path / "b", num_trajectories=40, sim=sim))
    assert load_dataset(tmp_path / "b")["action"] == ds["action"]
    collect.run(_cfg(tmp_path / "v", num_trajectories=5, sim=sim, split="val"))
    assert all(k.startswith("v2/val/") for k in load_dataset(tmp_path / "v")["state_key"])
