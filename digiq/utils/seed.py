"""Seeding and RNG state capture (RNG state saved as safetensors, not pickles: TRL #3247)."""

from __future__ import annotations

import random

import numpy as np
import torch


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict[str, torch.Tensor]:
    """Python, numpy and torch RNG states as tensors (safetensors-serialisable)."""
    py = random.getstate()
    np_state = np.random.get_state()
    out = {
        "torch_cpu": torch.get_rng_state(),
        "python": torch.tensor([py[0], *py[1], -1 if py[2] is None else 0], dtype=torch.int64),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_meta": torch.tensor([np_state[2], np_state[3]], dtype=torch.int64),
        "numpy_gauss": torch.tensor([np_state[4]], dtype=torch.float64),
    }
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"torch_cuda_{i}"] = s
    return out


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    py = state["python"].tolist()
    random.setstate((int(py[0]), tuple(int(v) for v in py[1:-1]), None))
    np.random.set_state(
        (
            "MT19937",
            state["numpy_keys"].numpy().astype(np.uint32),
            int(state["numpy_meta"][0]),
            int(state["numpy_meta"][1]),
            float(state["numpy_gauss"][0]),
        )
    )
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"torch_cuda_{i}" in state:
                torch.cuda.set_rng_state(state[f"torch_cuda_{i}"], i)
