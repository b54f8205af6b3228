"""``torchrun --nproc_per_node 2 tests/fsdp_reference.py extract-policy ...``: extract-policy under accelerate's
FSDP2 plugin on the CPU (tests/fsdp_launch.py) with RAM-efficient loading as its contract allows it: only
local rank 0 loads the checkpoint's values, the other processes get placeholders (zeros here) that
accelerate's ``prepare`` replaces with rank 0's in the model it shards (transformers before 5 loaded
``torch.empty`` there). Records the frozen pi_beta reference every process trains against and prints
``REFERENCE same=<bool> loaded=<bool>`` on the main process: every process's reference equals rank 0's, and
rank 0's holds the loaded (non-zero) weights.
"""

from __future__ import annotations

import inspect
import os
import sys

import fsdp_launch  # noqa: F401 (accelerate's FSDP2 on CPU processes)
import torch
import torch.distributed as dist
import transformers

from digiq.training import policy_loop

_from_pretrained = transformers.AutoModelForImageTextToText.from_pretrained
_train_steps = policy_loop.train_steps


def _rank0_only_loading(*args, **kwargs):
    model = _from_pretrained(*args, **kwargs)
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
    return model


def _recording_train_steps(*args, **kwargs):
    ref = inspect.signature(_train_steps).bind(*args, **kwargs).arguments["ref_model"]
    state = {k: v.detach().cpu().clone() for k, v in ref.state_dict().items()}
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, state)
    if dist.get_rank() == 0:
        same = all(
            s.keys() == state.keys() and all(torch.equal(s[k], state[k]) for k in state) for s in every
        )
        loaded = any(float(p.detach().abs().sum()) > 0 for p in ref.parameters())
        print(f"REFERENCE same={same} loaded={loaded}", flush=True)
    return _train_steps(*args, **kwargs)


transformers.AutoModelForImageTextToText.from_pretrained = _rank0_only_loading
policy_loop.train_steps = _recording_train_steps

if __name__ == "__main__":
    from digiq.cli import main

    raise SystemExit(main(sys.argv[1:]))
