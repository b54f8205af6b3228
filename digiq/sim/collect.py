"""``digiq sim collect``: behaviour-policy trajectories on the simulated device, in the digiq dataset schema.

    digiq sim collect output_dir=data/sim num_trajectories=500
    digiq sim collect --config configs/sim_collect/small.yaml num_candidates=8

Rows follow :data:`digiq.data.schema.FEATURES` with ``state_key`` filled (exact Q* lookup later).
Screenshots are stored as PNG bytes encoded once per distinct state (the graph is finite), so the
Dataset is built from a dict of columns without re-encoding an image per row. Candidates, when
asked for, come from a second, independently seeded behaviour policy at higher noise, so the dataset
actions are identical whether or not candidates are drawn.
"""

from __future__ import annotations

import dataclasses
import io
import time
from typing import Literal

import numpy as np

from digiq.actions import make_observation
from digiq.config import check, to_dict
from digiq.data.labels import DEFAULT_EPS, DEFAULT_SCALE, screen_diff
from digiq.data.schema import FEATURES, discounted_returns, save_dataset
from digiq.sim.behaviour import BehaviourConfig, BehaviourPolicy
from digiq.sim.phone import SimConfig, SimPhone
from digiq.utils.io import refuse_finished
from digiq.utils.logging import get_logger

log = get_logger(__name__)
# The Stage-1 label (DigiRL-agent/digiq @ 8181379,
# postprocess_data/get_more_actions/construct_sft_data.py:23-37): mean squared difference of the two
# screenshots at 0.25x scale on 0-255, "Yes" if > 30. The Stage-1 rule itself (digiq/data/labels.py), so the
# simulator's statistics and tests use exactly the label that finetune-vlm trains on (same scale, eps and
# resampling filter).
CHANGE_SCALE = DEFAULT_SCALE
CHANGE_THRESHOLD = DEFAULT_EPS


def screen_change(png_a: bytes, png_b: bytes, scale: float = CHANGE_SCALE) -> float:
    """Mean squared pixel difference (0-255 scale, all channels) of two PNG screenshots resized by ``scale``."""
    from PIL import Image

    with Image.open(io.BytesIO(png_a)) as a, Image.open(io.BytesIO(png_b)) as b:
        return screen_diff(a, b, scale)


@dataclasses.dataclass
class Config:
    # Where the dataset folder is written (HF save_to_disk + digiq_dataset.json + _COMPLETE).
    output_dir: str = "data/sim"
    # Number of trajectories; 500 gives ~3.7k steps, enough for the critic stages on a CPU.
    num_trajectories: int = 500
    # Task split to collect on (train and test tasks are disjoint; evaluate on test).
    split: Literal["train", "test"] = "train"
    # Discount for mc_return (0.95 as the official default.yaml).
    gamma: float = 0.95
    # 0: leave `candidates` empty. >0: index 0 = the dataset action, then n-1 behaviour samples.
    num_candidates: int = 0
    # Seed of the task order, the behaviour policy and the candidate sampler (same seed = same dataset).
    seed: int = 0
    # Replace a finished output at output_dir instead of refusing it.
    overwrite: bool = False
    # The simulated device.
    sim: SimConfig = dataclasses.field(default_factory=SimConfig)
    # Noise of the behaviour policy.
    behaviour: BehaviourConfig = dataclasses.field(default_factory=BehaviourConfig)

    def validate(self) -> None:

        check(self.num_trajectories > 0, "num_trajectories must be > 0")
        check(0.0 <= self.gamma < 1.0, f"gamma must be in [0, 1), got {self.gamma}")
        check(self.num_candidates >= 0, "num_candidates must be >= 0")
        self.sim.validate()
        self.behaviour.validate()


def collect_columns(cfg: Config, phone: SimPhone | None = None, progress: bool = True) -> tuple[dict, dict]:
    """The dataset columns (dict of lists) and summary stats, without writing anything."""
    from tqdm.auto import tqdm

    phone = phone or SimPhone(cfg.sim)
    tasks = phone.tasks(cfg.split)
    # Independent streams: task order, dataset actions, candidates.
    seeds = np.random.SeedSequence(cfg.seed).spawn(3)
    order_rng = np.random.default_rng(seeds[0])
    pi = BehaviourPolicy(phone, seed=int(seeds[1].generate_state(1)[0]), config=cfg.behaviour)
    cand_pi = BehaviourPolicy(phone, seed=int(seeds[2].generate_state(1)[0]), config=cfg.behaviour)

    cols: dict[str, list] = {name: [] for name in FEATURES}
    order: list[int] = []
    successes = 0
    changes: dict[tuple[str, str], bool] = {}
    changed = 0
    for traj in tqdm(range(cfg.num_trajectories), desc="sim collect", unit="traj", disable=not progress):
        if not order:  # a fresh seeded permutation per pass over the tasks: balanced task counts
            order = [int(i) for i in order_rng.permutation(len(tasks))]
        task = tasks[order.pop()]
        state = phone.reset(task)
        prev = None
        rewards: list[float] = []
        done = False
        step = 0
        while not done:
            action = pi.act(state)
            nxt, reward, done = phone.step(state, action)
            text = action.render()
            cols["traj_id"].append(traj)
            cols["step_id"].append(step)
            cols["task"].append(task.goal)
            cols["observation"].append(make_observation(task.goal, prev))
            cols["screenshot"].append({"bytes": phone.render_png(state), "path": None})
            cols["next_screenshot"].append({"bytes": phone.render_png(nxt), "path": None})
            cols["action"].append(text)
            cols["reward"].append(float(reward))
            cols["done"].append(bool(done))
            cols["state_key"].append(phone.state_key(state))
            if cfg.num_candidates > 0:
                extra = cand_pi.sample_candidates(state, cfg.num_candidates - 1)
                cols["candidates"].append([text, *(a.render() for a in extra)])
            else:
                cols["candidates"].append([])
            pair = (state.key, nxt.key)
            if pair not in changes:
                a, b = phone.render_png(state), phone.render_png(nxt)
                changes[pair] = a != b and screen_change(a, b) > CHANGE_THRESHOLD
            changed += changes[pair]
            rewards.append(float(reward))
            prev, state, step = action, nxt, step + 1
        cols["mc_return"].extend(float(v) for v in discounted_returns(rewards, cfg.gamma))
        successes += int(rewards[-1] > 0)
    stats = {
        "num_trajectories": cfg.num_trajectories,
        "num_steps": len(cols["traj_id"]),
        "success_rate": successes / cfg.num_trajectories,
        # Stage-1 label balance: the fraction of steps whose screen changed by more than the threshold.
        "screen_change_fraction": changed / max(1, len(cols["traj_id"])),
        "distinct_states": len({k for pair in changes for k in pair}),
        "distinct_transitions": len(changes),
    }
    return cols, stats


def run(cfg: Config) -> dict:
    from datasets import Dataset

    refuse_finished(cfg.output_dir, cfg.overwrite)
    t0 = time.perf_counter()
    phone = SimPhone(cfg.sim)
    cols, stats = collect_columns(cfg, phone)
    ds = Dataset.from_dict(cols, features=FEATURES)
    info = {
        "source": "sim",
        "gamma": cfg.gamma,
        "split": cfg.split,
        "seed": cfg.seed,
        "num_candidates": cfg.num_candidates,
        "sim": to_dict(cfg.sim),
        "behaviour": to_dict(cfg.behaviour),
        "config": to_dict(cfg),
        **stats,
    }
    save_dataset(ds, cfg.output_dir, info, overwrite=cfg.overwrite)
    stats["seconds"] = time.perf_counter() - t0
    log.info(
        "wrote %d trajectories / %d steps to %s in %.1fs (behaviour success %.3f, screen-change fraction %.3f)",
        stats["num_trajectories"],
        stats["num_steps"],
        cfg.output_dir,
        stats["seconds"],
        stats["success_rate"],
        stats["screen_change_fraction"],
    )
    return stats
