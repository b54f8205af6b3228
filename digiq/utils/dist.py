"""The one place where accelerate is configured (lerobot's ``make_accelerator`` pattern).

Launch with ``accelerate launch [--config_file configs/accelerate/<x>.yaml] -m digiq <cmd> ...`` on GPUs.
For 2 CPU processes use ``accelerate launch --multi_gpu --num_processes 2`` or ``torchrun
--nproc_per_node 2`` (``accelerate launch --cpu --num_processes 2`` silently runs one process).
"""

from __future__ import annotations

import os

import torch


def make_accelerator(
    mixed_precision: str = "no",
    gradient_accumulation_steps: int = 1,
    find_unused_parameters: bool = False,
    cpu: bool | None = None,
):
    """Build the run's ``Accelerator``. ``cpu=None`` picks the CPU when no CUDA device is visible."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    if cpu is None:
        cpu = not torch.cuda.is_available()
    if cpu and mixed_precision == "fp16":
        mixed_precision = "no"  # fp16 autocast is a GPU feature; bf16 works on CPU
    handlers = []
    if find_unused_parameters:
        # LoRA layers above the feature layer get no gradient; DDP must be told (feasibility.md section 4).
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    # accelerate keeps one process-wide AcceleratorState and refuses a second Accelerator with another
    # mixed_precision. Stages run one after another in one process (`digiq pipeline`, tests), so drop the
    # previous stage's state; the distributed process group (PartialState) is kept.
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state:
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(
        cpu=cpu,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        kwargs_handlers=handlers,
    )


def world_info() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment, without initialising anything."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
