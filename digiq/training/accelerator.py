"""The one place where accelerate is configured (lerobot's ``make_accelerator`` pattern).

Launch with ``accelerate launch [--config_file configs/accelerate/<x>.yaml] -m digiq <cmd> ...`` on GPUs.
For 2 CPU processes use ``accelerate launch --multi_gpu --num_processes 2`` or ``torchrun
--nproc_per_node 2`` (``accelerate launch --cpu --num_processes 2`` silently runs one process).
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, DistributedType

from digiq.config import ConfigError

# Read from the environment by default (a sentinel, since None means "no launcher setting").
_FROM_ENV = "env"


def cuda_bf16() -> bool:
    """A CUDA device with bfloat16 support is visible."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def launcher_mixed_precision() -> str | None:
    """The precision ``accelerate launch`` asked for (``ACCELERATE_MIXED_PRECISION``), or None.

    accelerate writes ``no`` whenever its config has no precision (its default), so ``no`` cannot be told
    apart from "not set" and reads as None: only ``bf16`` / ``fp16`` / ``fp8`` are a launcher's choice.
    """
    value = os.environ.get("ACCELERATE_MIXED_PRECISION", "").strip().lower()
    return None if value in ("", "no") else value


def resolve_mixed_precision(
    setting: str, cpu: bool, launcher: str | None = _FROM_ENV, name: str = "mixed_precision"
) -> str:
    """digiq's ``mixed_precision`` setting against the launcher's: the precision the run uses.

    ``auto``: the launcher's choice if it made one (``fsdp_7b.yaml`` says bf16), else ``bf16`` on a CUDA
    device with bf16 support and ``no`` on the CPU (so a CPU run is exactly the float32 run it always was).
    An explicit setting is used as written, unless the launcher asked for another precision: that is a
    :class:`ConfigError` (before, digiq's ``no`` silently overrode the launcher's bf16).
    """
    if launcher == _FROM_ENV:
        launcher = launcher_mixed_precision()
    if launcher == "no":
        launcher = None
    if setting == "auto":
        if launcher:
            return launcher
        return "bf16" if not cpu and cuda_bf16() else "no"
    if launcher and launcher != setting:
        raise ConfigError(
            f"{name}={setting} in the digiq config, but the launcher asks for mixed_precision {launcher} "
            f"(ACCELERATE_MIXED_PRECISION, from accelerate launch's --mixed_precision or its config file): "
            f"set {name}=auto (follow the launcher) or {name}={launcher}, or launch with --mixed_precision {setting}"
        )
    return setting


def train_dtype(dtype: str, accelerator: Accelerator, frozen_base: bool) -> str:
    """``ModelConfig.dtype`` of a model that trains: ``auto`` -> bfloat16 or float32.

    bfloat16 on a bf16 GPU in a bf16 run where the float32 master weights are not ours to keep: a frozen
    base under LoRA (peft keeps its adapters in float32), or FSDP (accelerate upcasts the sharded parameters
    to float32 master weights under mixed precision, and a bf16 load halves the host memory). A full
    fine-tune under DDP or on one device keeps float32 weights and computes in bf16 (autocast), since
    AdamW steps on bf16 weights lose small updates. The CPU: float32, as before.
    """
    if dtype != "auto":
        return dtype
    if accelerator.device.type != "cuda" or accelerator.mixed_precision != "bf16" or not cuda_bf16():
        return "float32"
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    return "bfloat16" if frozen_base or fsdp else "float32"


def make_accelerator(
    mixed_precision: str | None = "auto",
    gradient_accumulation_steps: int = 1,
    find_unused_parameters: bool = False,
    cpu: bool | None = None,
    name: str = "mixed_precision",
) -> Accelerator:
    """Build the run's ``Accelerator``. ``cpu=None`` picks the CPU when no CUDA device is visible.

    ``mixed_precision`` is resolved by :func:`resolve_mixed_precision` (``name`` is the config key named in
    its errors). ``None`` keeps whatever the process already has (a stage that applies its own
    ``torch.autocast``, as train-critic does).
    """
    if cpu is None:
        cpu = not torch.cuda.is_available()
    if mixed_precision is not None:
        mixed_precision = resolve_mixed_precision(mixed_precision, cpu, name=name)
    if cpu and mixed_precision == "fp16":
        mixed_precision = "no"  # fp16 autocast is a GPU feature; bf16 works on CPU
    handlers = []
    if find_unused_parameters:
        # LoRA layers above the feature layer get no gradient, and DDP must be told so or it waits for
        # their gradients forever (https://pytorch.org/docs/stable/notes/ddp.html, "unused parameters").
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    # accelerate keeps one process-wide AcceleratorState and refuses a second Accelerator with another
    # mixed_precision. Stages run one after another in one process (`digiq pipeline`, tests), so drop the
    # previous stage's state; the distributed process group (PartialState) is kept.
    if AcceleratorState._shared_state:
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(
        cpu=cpu,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        kwargs_handlers=handlers,
    )
