"""Run under ``torchrun --nproc_per_node 2`` by tests/test_distributed.py: the training toolkit's checkpoints
with an FSDP2-sharded tiny VLM on the CPU (gloo).

accelerate shards with FSDP only on GPUs, so the model is sharded here with torch's own ``fully_shard``
(what accelerate's FSDP2 plugin calls), per decoder layer and at the root. Trains 4 steps and checkpoints
at step 2 through digiq.training.checkpoint; then a fresh sharded model resumes from that checkpoint and
trains steps 3-4. Prints ``FSDP-RESUME bitwise=<bool> ...`` on the main process, with the checkpoint files
each process read on resume (``reads=[rank 0's, rank 1's]``: only the main process may read the weights and
the optimizer state, the others receive them by broadcast).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from digiq.models.prompts import make_inputs, yes_no_token_ids
from digiq.models.tiny import TinySpec
from digiq.models.vlm import answer_logits, build_tiny_vlm, decoder_layers
from digiq.stages.finetune_vlm import yes_no_loss
from digiq.training import checkpoint
from digiq.training.accelerator import make_accelerator
from digiq.training.checkpoint import gather_weights, latest_checkpoint, load_checkpoint, save_checkpoint
from digiq.training.schedule import make_scheduler

SPEC = TinySpec(
    hidden=32, layers=2, heads=2, kv_heads=1, vision_hidden=32, vision_layers=1, image_size=56, patch=14
)


def sharded_model(mesh):
    model, processor = build_tiny_vlm("llava", SPEC, seed=0)
    model.train()
    for layer in decoder_layers(model.model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, processor, opt, make_scheduler(opt, "cosine", 4, 0.25)


def step(model, processor, opt, sched, step_i: int, rank: int) -> None:
    colour = (40 * step_i + 100 * rank) % 255
    imgs = [Image.new("RGB", (40, 72), (colour, 80, 200 - colour)) for _ in range(2)]
    inputs = make_inputs(processor, imgs, ["Turn on wifi"] * 2, [None, None], ["tap 0.2 0.3", "back"], "text")
    yes, no = yes_no_token_ids(processor)
    loss = yes_no_loss(answer_logits(model, inputs), torch.tensor([1, step_i % 2]), yes, no)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    opt.zero_grad()


def main(out: Path) -> None:
    acc = make_accelerator(cpu=True)
    rank = acc.process_index
    mesh = init_device_mesh("cpu", (acc.num_processes,))
    model, processor, opt, sched = sharded_model(mesh)
    plain, _ = build_tiny_vlm("llava", SPEC, seed=0)
    gathered = gather_weights(model)
    same_init = rank != 0 or all(
        torch.equal(gathered[k], v) for k, v in plain.state_dict().items() if k in gathered
    )
    for i in range(4):
        step(model, processor, opt, sched, i, rank)
        if i == 1:
            save_checkpoint(out, 2, model, opt, sched, position={"epoch": 0}, accelerator=acc)
    reference = gather_weights(model)

    model2, processor2, opt2, sched2 = sharded_model(mesh)
    read: list[str] = []
    load_file = checkpoint.load_file

    def counting_load_file(path: str, *args, **kwargs):
        read.append(Path(path).name)
        return load_file(path, *args, **kwargs)

    checkpoint.load_file = counting_load_file
    resumed_at = load_checkpoint(latest_checkpoint(out)).restore_training(model2, opt2, sched2, rank)
    checkpoint.load_file = load_file
    reads: list = [None] * acc.num_processes
    dist.all_gather_object(reads, sorted(read))
    for i in range(resumed_at, 4):
        step(model2, processor2, opt2, sched2, i, rank)
    got = gather_weights(model2)
    if acc.is_main_process:
        bitwise = reference.keys() == got.keys() and all(torch.equal(reference[k], got[k]) for k in reference)
        files = sorted(p.name for p in latest_checkpoint(out).iterdir())
        print(
            f"FSDP-RESUME bitwise={bitwise} same_init={same_init} resumed_at={resumed_at} files={files} "
            f"reads={reads}"
        )
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
