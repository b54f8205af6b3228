"""What every test shares: an offline environment (for this process and every subprocess a test starts,
which inherit it) and the small datasets several test files train on, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing may download at test time (the tiny models are built from config objects), and wandb without an
# API key fails at once: both are switched off before any test imports transformers or wandb.
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
}
for _key, _value in OFFLINE.items():
    os.environ.setdefault(_key, _value)
# One torch thread per process unless the caller says otherwise: the suite's models are tiny, and on a 2-core
# machine two-thread pools oversubscribe the cores as soon as a test starts a second process.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def sim_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """5 simulated trajectories (about 30 rows) with 3 behaviour candidates per state, on 90x160 screens."""
    from digiq.config import load_config
    from digiq.stages import collect

    out = tmp_path_factory.mktemp("sim") / "ds"
    cfg = load_config(
        collect.Config,
        None,
        [f"output_dir={out}", "num_trajectories=5", "num_candidates=3", "sim.width=90", "sim.height=160"],
    )
    collect.run(cfg)
    return out


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 x 4 synthetic steps where only a tap on the top half changes the screen (tests/vlm_helpers.py)."""
    from vlm_helpers import make_dataset

    return make_dataset(tmp_path_factory.mktemp("synthetic") / "ds", n_traj=8, steps=4)
