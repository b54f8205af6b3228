"""``torchrun --nproc_per_node N tests/fsdp_launch.py <digiq command> ...``: a digiq command under accelerate's
FSDP2 plugin on CPU processes (gloo), for tests.

accelerate shards with FSDP only on accelerators: on the CPU its state says MULTI_CPU and ``prepare`` wraps in
DDP, whatever ``accelerate launch`` config is given (so no configs/accelerate file can run FSDP on the CPU).
This launcher sets the environment ``accelerate launch --config_file configs/accelerate/fsdp_7b.yaml`` exports
(FSDP2, transformer-based wrap of the model's ``_no_split_modules``, full state dicts, rank-0 RAM-efficient
loading) and turns the MULTI_CPU state into FSDP, so ``accelerator.prepare`` runs accelerate's own FSDP2
path (``fsdp2_prepare_model``: ``fully_shard`` per decoder / vision layer and at the root) and everything
after it (unwrap, clip, checkpoints, resume, export) is what a GPU run executes. Each process prints
``FSDP2-PREPARED <class>`` once its model is sharded.
"""

from __future__ import annotations

import os
import sys

import accelerate.accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

for key, value in {
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_VERSION": "2",
    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
    "FSDP_RESHARD_AFTER_FORWARD": "true",
    "FSDP_CPU_RAM_EFFICIENT_LOADING": "true",
    "FSDP_OFFLOAD_PARAMS": "false",
}.items():
    os.environ.setdefault(key, value)

_init = AcceleratorState.__init__
_prepare = accelerate.accelerator.fsdp2_prepare_model


def _fsdp_on_cpu(self, *args, **kwargs) -> None:
    _init(self, *args, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        if getattr(self, "fsdp_plugin", None) is None:
            self.fsdp_plugin = kwargs.get("fsdp_plugin") or FullyShardedDataParallelPlugin()


def _prepare_and_say(accelerator, model):
    model = _prepare(accelerator, model)
    print(f"FSDP2-PREPARED {type(model).__name__}", flush=True)
    return model


AcceleratorState.__init__ = _fsdp_on_cpu
accelerate.accelerator.fsdp2_prepare_model = _prepare_and_say

if __name__ == "__main__":
    from digiq.cli import main

    raise SystemExit(main(sys.argv[1:]))
