"""The one place where accelerate is configured (lerobot's ``make_accelerator`` pattern).

Launch with ``accelerate launch [--config_file configs/accelerate/<x>.yaml] -m digiq <cmd> ...`` on GPUs.
For 2 CPU processes use ``accelerate launch --multi_gpu --num_processes 2`` or ``torchrun
--nproc_per_node 2`` (``accelerate launch --cpu --num_processes 2`` silently runs one process).
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs


def make_accelerator(
    mixed_precision: str | None = "no",
    gradient_accumulation_steps: int = 1,
    find_unused_parameters: bool = False,
    cpu: bool | None = None,
) -> Accelerator:
    """Build the run's ``Accelerator``. ``cpu=None`` picks the CPU when no CUDA device is visible.

    ``mixed_precision=None`` keeps whatever the process already has (a stage that applies its own
    ``torch.autocast``, as train-critic does).
    """
    if cpu is None:
        cpu = not torch.cuda.is_available()
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
