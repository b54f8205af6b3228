"""The policy-training loop's data path: rows encoded once up front, or lazily per process in DataLoader
workers (the GPU path), give the same batches and therefore the same weights, bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from digiq.config import load_config
from digiq.stages import train_bc


def _train(dataset: Path, out: Path, *extra: str) -> dict[str, torch.Tensor]:
    cfg = load_config(
        train_bc.Config,
        None,
        [f"dataset={dataset}", f"output_dir={out}", "max_rows=12", "train.batch_size=4", "train.max_steps=3",
         "wandb.mode=disabled", *extra],
    )  # fmt: skip
    train_bc.run(cfg)
    weights = {}
    for f in sorted((out / "policy").glob("*.safetensors")):
        weights.update(load_file(str(f)))
    return weights


@pytest.mark.slow
def test_lazy_encoding_in_workers_equals_encoding_once(sim_dataset: Path, tmp_path: Path) -> None:
    once = _train(sim_dataset, tmp_path / "once", "train.encode=once")
    for name, workers in (("lazy0", 0), ("lazy2", 2)):
        lazy = _train(sim_dataset, tmp_path / name, "train.encode=lazy", f"train.num_workers={workers}")
        assert lazy.keys() == once.keys()
        assert all(torch.equal(lazy[k], once[k]) for k in once), name
    init = train_bc.load_vlm(train_bc.Config().model)[0].state_dict()
    assert any(not torch.equal(init[k], once[k]) for k in once if k in init)  # it did train
