"""One checkpoint layout for every trainer, and bitwise ``--resume``.

Layout under a run's ``output_dir`` (each step folder replaced atomically through
:func:`digiq.utils.io.staged_dir`, so a kill never leaves a half-written checkpoint that looks finished)::

    checkpoints/step-<N>/
        model.safetensors        trainable parameters (LoRA adapters under peft; everything when fully trained)
        <name>.safetensors       further weights a trainer keeps (the critic's EMA ``target``)
        optimizer.safetensors    per-parameter optimiser tensors, keys "<param index>.<name>"
        rng.safetensors          python / numpy / torch RNG states (digiq.utils.seed)
        trainer_state.json       step, data position, scheduler state, optimiser hyper-parameters and
                                 scalars, free ``extra`` keys
        _COMPLETE

The newest ``keep`` finished step folders are kept. No pickles (TRL #3247): ``torch.save`` of an optimiser
state dict is a pickle, so its tensors go to safetensors and the rest to JSON.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from digiq.errors import DataError
from digiq.utils.io import atomic_save_safetensors, atomic_write_json, is_complete, staged_dir
from digiq.utils.seed import rng_state, set_rng_state

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
MODEL_WEIGHTS = "model"


def step_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIR / f"step-{int(step)}"


def _step_of(path: Path) -> int:
    return int(path.name.split("-", 1)[1])


def finished_checkpoints(output_dir: str | Path) -> list[Path]:
    """Finished step folders under ``output_dir``, oldest first."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if p.name[5:].isdigit() and is_complete(p)]
    return sorted(done, key=_step_of)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    done = finished_checkpoints(output_dir)
    return done[-1] if done else None


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (what a resumed run must restore), detached on the CPU."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole ``state_dict`` (parameters and buffers), detached on the CPU: for small heads."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
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
    output_dir: str | Path,
    step: int,
    weights: dict[str, dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    position: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write ``checkpoints/step-<step>/`` and prune all but the newest ``keep`` finished ones.

    ``weights`` maps a file stem to a state dict: ``{"model": trainable_state(model)}``, plus e.g.
    ``{"target": full_state(target)}``. ``position`` is the data position a resumed run continues from.
    Call it on the main process only: it writes files.
    """
    final = step_dir(output_dir, step)
    state: dict[str, Any] = {"step": int(step), "position": position or {}, "extra": extra or {}}
    with staged_dir(final, overwrite=True) as tmp:
        for stem, tensors in weights.items():
            atomic_save_safetensors(tensors, tmp / f"{stem}.safetensors")
        if optimizer is not None:
            tensors, state["optimizer"] = _flatten_optimizer(optimizer)
            atomic_save_safetensors(tensors, tmp / "optimizer.safetensors")
        if scheduler is not None:
            state["scheduler"] = scheduler.state_dict()
        atomic_save_safetensors(rng_state(), tmp / "rng.safetensors")
        atomic_write_json(tmp / STATE_FILE, state)
    for old in finished_checkpoints(output_dir)[: -max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


@dataclasses.dataclass
class Checkpoint:
    """A finished checkpoint read back: apply its parts with the ``restore_*`` methods."""

    path: Path
    step: int
    position: dict[str, Any]
    extra: dict[str, Any]
    state: dict[str, Any]

    def weights(self, stem: str = MODEL_WEIGHTS) -> dict[str, torch.Tensor] | None:
        f = self.path / f"{stem}.safetensors"
        return load_file(str(f)) if f.is_file() else None

    def restore_trainable(self, model: torch.nn.Module, stem: str = MODEL_WEIGHTS) -> None:
        """Copy the saved trainable parameters into ``model``; every trainable parameter must be there."""
        state = self.weights(stem)
        if state is None:
            raise DataError(f"{self.path}: checkpoint has no {stem}.safetensors")
        params = dict(model.named_parameters())
        wanted = {n for n, p in params.items() if p.requires_grad}
        missing = sorted(wanted - set(state))
        if missing:
            raise DataError(
                f"{self.path}: checkpoint lacks {len(missing)} trainable parameter(s) of the model, e.g. "
                f"{missing[0]!r}; was it written by a run with different model / LoRA settings?"
            )
        with torch.no_grad():
            for n, t in state.items():
                if n not in params:
                    raise DataError(f"{self.path}: checkpoint parameter {n!r} does not exist in the model")
                params[n].copy_(t.to(params[n].dtype))

    def restore_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        if "optimizer" in self.state:
            tensors = load_file(str(self.path / "optimizer.safetensors"))
            optimizer.load_state_dict(_unflatten_optimizer(tensors, self.state["optimizer"]))

    def restore_scheduler(self, scheduler: Any) -> None:
        if "scheduler" in self.state:
            scheduler.load_state_dict(self.state["scheduler"])

    def restore_rng(self) -> None:
        set_rng_state(load_file(str(self.path / "rng.safetensors")))

    def restore_training(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
    ) -> int:
        """Everything a resumed trainer needs, in one call: trainable weights, optimizer, scheduler and RNG
        (restore the RNG last: nothing may draw from it between here and the first resumed step). Returns
        the step to continue from."""
        self.restore_trainable(model)
        self.restore_optimizer(optimizer)
        self.restore_scheduler(scheduler)
        self.restore_rng()
        return self.step


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read the trainer state of a finished step folder (tensors are loaded by the ``restore_*`` calls)."""
    path = Path(path)
    if not is_complete(path):
        raise DataError(f"no finished checkpoint at {path}")
    state = json.loads((path / STATE_FILE).read_text())
    return Checkpoint(
        path=path,
        step=int(state["step"]),
        position=dict(state.get("position", {})),
        extra=dict(state.get("extra", {})),
        state=state,
    )
