"""One checkpoint layout for every trainer, bitwise ``--resume``, and the same under DDP and FSDP.

Layout under a run's ``output_dir`` (each step folder replaced atomically through
:func:`digiq.utils.io.staged_dir`, so a kill never leaves a half-written checkpoint that looks finished)::

    checkpoints/step-<N>/
        model.safetensors        trainable parameters (LoRA adapters under peft; everything when fully trained)
        <name>.safetensors       further modules a trainer keeps (the critic's EMA ``target``)
        optimizer.safetensors    per-parameter optimiser tensors, keys "<parameter name>.<state name>"
        rng-<rank>.safetensors   python / numpy / torch RNG states of every process (digiq.utils.seed)
        trainer_state.json       step, data position, scheduler state, optimiser hyper-parameters and
                                 scalars, process count, free ``extra`` keys
        _COMPLETE

Weights and optimiser state are *full* (unsharded) state dicts keyed by parameter name, gathered with
``torch.distributed.checkpoint.state_dict`` (https://pytorch.org/docs/stable/distributed.checkpoint.html):
under FSDP the shards are gathered to the main process, which alone writes; on resume under FSDP the main
process alone reads the files and the same API broadcasts them tensor by tensor into every process's shards
(``broadcast_from_rank0``: one full copy in host memory, not one per process), so a checkpoint written by
any number of processes (and by DDP or FSDP) resumes under any other. Only trainable parameters are
gathered: a LoRA run never copies its frozen base to the CPU. :func:`save_checkpoint` is therefore called
by *every* process.

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
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors.torch import load_file

from digiq.errors import DataError
from digiq.utils.io import atomic_save_safetensors, atomic_write_json, is_complete, staged_dir
from digiq.utils.seed import rng_state, set_rng_state

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
MODEL_WEIGHTS = "model"


def _dcp():
    """torch.distributed.checkpoint's state-dict API, imported on first use: it takes ~1.4 s to import, which
    every command would otherwise pay at start-up (measured with ``python -X importtime``)."""
    from torch.distributed.checkpoint import state_dict

    return state_dict


def _full() -> Any:
    """Gather to full tensors, on the CPU (under FSDP only the main process receives them)."""
    return _dcp().StateDictOptions(full_state_dict=True, cpu_offload=True)


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


def is_sharded(model: torch.nn.Module) -> bool:
    """True when the parameters are FSDP shards (DTensors): state dicts must then be gathered / re-sharded."""
    from torch.distributed.tensor import DTensor  # with the state-dict API: see _dcp

    return any(isinstance(p, DTensor) for p in model.parameters())


def inner(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's ``AcceleratedOptimizer`` wrapper (the one the state API reads)."""
    return getattr(optimizer, "optimizer", optimizer)


def trainable_names(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def gather_weights(model: torch.nn.Module, trainable_only: bool = True) -> dict[str, torch.Tensor]:
    """The full state dict of ``model`` on the CPU (its trainable parameters only by default).

    Collective: every process calls it; under FSDP only the main process gets the tensors (the others an
    empty dict). ``model`` is the unwrapped module (``accelerate.unwrap_model``): under FSDP2 that is the
    sharded module itself. With ``trainable_only`` frozen parameters are dropped *before* gathering and
    copying (``ignore_frozen_params``): a LoRA model's base never reaches the CPU.
    """
    options = _dcp().StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only
    )
    state = _dcp().get_model_state_dict(model, options=options)
    keep = trainable_names(model) if trainable_only else set(state)
    return {k: v.detach().cpu().contiguous() for k, v in state.items() if k in keep}


def _broadcasts(model: torch.nn.Module) -> bool:
    """True when a restore reads the files on the main process only and broadcasts them: FSDP shards over
    several processes (under DDP or on one process every process holds the full model and reads its own)."""
    return is_sharded(model) and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _reads(model: torch.nn.Module) -> bool:
    """Whether this process reads the checkpoint's weight / optimizer files."""
    return not _broadcasts(model) or dist.get_rank() == 0


def _raise_everywhere(model: torch.nn.Module, error: str | None) -> None:
    """Raise the main process's error on every process (the others would wait in the broadcast forever)."""
    if _broadcasts(model):
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise DataError(error)


def _load_options(model: torch.nn.Module) -> Any:
    return _dcp().StateDictOptions(
        full_state_dict=is_sharded(model), strict=False, broadcast_from_rank0=_broadcasts(model)
    )


def _flatten_optimizer(osd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for name, st in osd.get("state", {}).items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{name}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(name), {})[k] = v
    return tensors, {"param_groups": osd.get("param_groups", []), "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for key, t in tensors.items():
        name, k = key.rsplit(".", 1)  # parameter names hold dots, optimiser state names do not
        state.setdefault(name, {})[k] = t
    for name, d in meta.get("scalars", {}).items():
        state.setdefault(name, {}).update(d)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    position: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    keep: int = 2,
    trainable_only: bool = True,
    others: dict[str, torch.nn.Module] | None = None,
    accelerator: Accelerator | None = None,
) -> Path | None:
    """Write ``checkpoints/step-<step>/`` and prune all but the newest ``keep`` finished ones.

    Call it on every process (gathering is collective); the main process writes, the others wait.
    ``model`` (unwrapped) is what ``optimizer`` trains: its trainable parameters are saved, or its whole
    state with ``trainable_only=False`` (small heads with buffers); ``others`` are further modules saved
    whole (``{"target": target}``). ``position`` is the data position a resumed run continues from.
    Returns the folder on the main process.
    """
    weights = {MODEL_WEIGHTS: gather_weights(model, trainable_only)}
    for stem, module in (others or {}).items():
        weights[stem] = gather_weights(module, trainable_only=False)
    osd = (
        _dcp().get_optimizer_state_dict(model, optimizer, options=_full()) if optimizer is not None else None
    )
    world = accelerator.num_processes if accelerator is not None else 1
    rngs = gather_object([rng_state()]) if world > 1 else [rng_state()]
    final = None
    if accelerator is None or accelerator.is_main_process:
        final = step_dir(output_dir, step)
        state: dict[str, Any] = {
            "step": int(step), "position": position or {}, "extra": extra or {}, "processes": world,
        }  # fmt: skip
        with staged_dir(final, overwrite=True) as tmp:
            for stem, tensors in weights.items():
                atomic_save_safetensors(tensors, tmp / f"{stem}.safetensors")
            if osd is not None:
                tensors, state["optimizer"] = _flatten_optimizer(osd)
                atomic_save_safetensors(tensors, tmp / "optimizer.safetensors")
            if scheduler is not None:
                state["scheduler"] = scheduler.state_dict()
            for rank, rng in enumerate(rngs):
                atomic_save_safetensors(rng, tmp / f"rng-{rank}.safetensors")
            atomic_write_json(tmp / STATE_FILE, state)
        for old in finished_checkpoints(output_dir)[: -max(1, keep)]:
            shutil.rmtree(old, ignore_errors=True)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return final


@dataclasses.dataclass
class Checkpoint:
    """A finished checkpoint read back: apply its parts with the ``restore_*`` methods (on every process,
    after ``accelerator.prepare``: under FSDP the full tensors are sharded onto the prepared model)."""

    path: Path
    step: int
    position: dict[str, Any]
    extra: dict[str, Any]
    state: dict[str, Any]

    def weights(self, stem: str = MODEL_WEIGHTS) -> dict[str, torch.Tensor] | None:
        f = self.path / f"{stem}.safetensors"
        return load_file(str(f)) if f.is_file() else None

    def restore_weights(
        self, model: torch.nn.Module, stem: str = MODEL_WEIGHTS, trainable_only: bool = True
    ) -> None:
        """Load the saved tensors into ``model`` (unwrapped); every trainable parameter (with
        ``trainable_only``) or every state entry must be there, and nothing the model lacks."""
        state: dict[str, torch.Tensor] = {}
        error = None
        if _reads(model):  # under FSDP the main process alone: the others receive its tensors
            state = self.weights(stem) or {}
            error = self._check_weights(model, stem, state, trainable_only)
        _raise_everywhere(model, error)
        _dcp().set_model_state_dict(model, state, options=_load_options(model))

    def _check_weights(
        self, model: torch.nn.Module, stem: str, state: dict[str, torch.Tensor], trainable_only: bool
    ) -> str | None:
        if not (self.path / f"{stem}.safetensors").is_file():
            return f"{self.path}: checkpoint has no {stem}.safetensors"
        names = set(model.state_dict())
        wanted = trainable_names(model) if trainable_only else names
        missing = sorted(wanted - set(state))
        if missing:
            return (
                f"{self.path}: checkpoint lacks {len(missing)} trainable parameter(s) of the model, e.g. "
                f"{missing[0]!r}; was it written by a run with different model / LoRA settings?"
            )
        unknown = sorted(set(state) - names)
        if unknown:
            return f"{self.path}: checkpoint parameter {unknown[0]!r} does not exist in the model"
        return None

    def restore_optimizer(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if "optimizer" in self.state:
            osd: dict[str, Any] = {}
            if _reads(model):  # under FSDP the main process alone, as restore_weights
                tensors = load_file(str(self.path / "optimizer.safetensors"))
                osd = _unflatten_optimizer(tensors, self.state["optimizer"])
            # Not strict: a parameter that never received a gradient (LLaVA's unused vision post-layernorm)
            # has no AdamW state, at saving as now.
            _dcp().set_optimizer_state_dict(model, optimizer, osd, options=_load_options(model))

    def restore_scheduler(self, scheduler: Any) -> None:
        if "scheduler" in self.state:
            scheduler.load_state_dict(self.state["scheduler"])

    def restore_rng(self, rank: int = 0) -> None:
        """This process's RNG state (a checkpoint of fewer processes gives the extra ranks rank 0's)."""
        f = self.path / f"rng-{rank}.safetensors"
        set_rng_state(load_file(str(f if f.is_file() else self.path / "rng-0.safetensors")))

    def restore_training(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, rank: int = 0
    ) -> int:
        """Everything a resumed trainer needs, in one call: trainable weights, optimizer, scheduler and RNG
        (restore the RNG last: nothing may draw from it between here and the first resumed step). Returns
        the step to continue from."""
        self.restore_weights(model)
        self.restore_optimizer(model, optimizer)
        self.restore_scheduler(scheduler)
        self.restore_rng(rank)
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
