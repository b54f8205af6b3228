"""Generic training checkpoints: trainable weights, optimiser and RNG as safetensors + a JSON state.

Layout of ``<dir>`` (replaced atomically through :func:`digiq.utils.io.staged_dir`)::

    model.safetensors       trainable parameters only (LoRA adapters under peft; everything when full FT)
    optimizer.safetensors   per-parameter optimiser tensors, keys "<param index>.<name>"
    rng.safetensors         python / numpy / torch RNG states (digiq.utils.seed)
    trainer_state.json      step, optimiser hyper-parameters and scalars, free ``extra`` keys

No pickles (TRL #3247): ``torch.save`` of an optimiser state dict is a pickle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from digiq.errors import DataError
from digiq.utils.io import atomic_save_safetensors, atomic_write_json, is_complete, staged_dir
from digiq.utils.seed import rng_state, set_rng_state

STATE_FILE = "trainer_state.json"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = t
    for idx, d in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(d)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    directory: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    step: int,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint of ``model``'s trainable parameters, the optimiser and the RNG states."""
    directory = Path(directory)
    with staged_dir(directory, overwrite=True) as tmp:
        atomic_save_safetensors(trainable_state(model), tmp / "model.safetensors")
        meta: dict[str, Any] = {}
        if optimizer is not None:
            tensors, meta = _flatten_optimizer(optimizer)
            atomic_save_safetensors(tensors, tmp / "optimizer.safetensors")
        atomic_save_safetensors(rng_state(), tmp / "rng.safetensors")
        atomic_write_json(tmp / STATE_FILE, {"step": int(step), "optimizer": meta, "extra": extra or {}})
    return directory


def has_checkpoint(directory: str | Path) -> bool:
    return Path(directory).is_dir() and is_complete(directory)


def load_checkpoint(
    directory: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore a :func:`save_checkpoint` into ``model`` / ``optimizer``; returns ``{"step", "extra"}``."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not has_checkpoint(directory):
        raise DataError(f"no finished checkpoint at {directory}")
    state = load_file(str(directory / "model.safetensors"))
    wanted = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(wanted - set(state))
    if missing:
        raise DataError(
            f"{directory}: checkpoint lacks {len(missing)} trainable parameter(s) of the model, e.g. "
            f"{missing[0]!r}; was it written by a run with different model / LoRA settings?"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in state.items():
            if n not in params:
                raise DataError(f"{directory}: checkpoint parameter {n!r} does not exist in the model")
            params[n].copy_(t.to(params[n].dtype))
    meta = json.loads((directory / STATE_FILE).read_text())
    if optimizer is not None and (directory / "optimizer.safetensors").is_file():
        tensors = load_file(str(directory / "optimizer.safetensors"))
        optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    if restore_rng:
        set_rng_state(load_file(str(directory / "rng.safetensors")))
    return {"step": int(meta["step"]), "extra": meta.get("extra", {})}
