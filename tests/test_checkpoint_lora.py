"""Checkpoints of a LoRA run: adapter tensors only, gathered without copying the frozen base, resumed bit for bit."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from digiq.config import LoraConfig
from digiq.models.tiny import TinySpec
from digiq.models.vlm import apply_lora, build_tiny_vlm
from digiq.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, trainable_names
from digiq.training.schedule import make_scheduler

SPEC = TinySpec(hidden=32, layers=2, heads=2, kv_heads=1, vision_hidden=32, vision_layers=1, image_size=56)
STEPS = 4


def _lora_run() -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    model, _ = build_tiny_vlm("llava", SPEC, seed=0)
    model = apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, opt, make_scheduler(opt, "cosine", STEPS, 0.25)


def _steps(model: torch.nn.Module, opt: torch.optim.Optimizer, sched, start: int, stop: int) -> None:
    for i in range(start, stop):
        ids = torch.randint(3, 200, (2, 6), generator=torch.Generator().manual_seed(i))
        loss = model(input_ids=ids, use_cache=False).logits.float().pow(2).mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def _adapters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _freeze_base_on_meta(model: torch.nn.Module) -> int:
    """Replace every frozen parameter by a meta tensor (no data): copying one to the CPU raises."""
    moved = 0
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if not p.requires_grad:
                module._parameters[name] = torch.nn.Parameter(torch.empty_like(p, device="meta"), False)
                moved += 1
    return moved


def test_lora_checkpoint_holds_adapters_only_never_copies_the_base_and_resumes_bitwise(tmp_path: Path):
    torch.manual_seed(0)
    model, opt, sched = _lora_run()
    _steps(model, opt, sched, 0, 2)
    after_two = _adapters(model)
    # The frozen base is never gathered or copied: with its weights on the meta device (no data) a checkpoint
    # that touched them would fail ("Cannot copy out of meta tensor").
    assert _freeze_base_on_meta(model) > 0
    save_checkpoint(tmp_path, 2, model, opt, sched, position={"epoch": 0})
    ck = load_checkpoint(latest_checkpoint(tmp_path))
    weights = ck.weights()
    assert set(weights) == trainable_names(model) and all("lora_" in k for k in weights)
    assert all(torch.equal(weights[k], after_two[k]) for k in weights)
    optimizer = load_file(str(ck.path / "optimizer.safetensors"))
    assert optimizer and all("lora_" in k for k in optimizer)

    torch.manual_seed(0)
    straight, opt_s, sched_s = _lora_run()
    _steps(straight, opt_s, sched_s, 0, STEPS)

    resumed, opt_r, sched_r = _lora_run()  # fresh adapters: everything trained comes from the checkpoint
    assert ck.restore_training(resumed, opt_r, sched_r) == 2
    _steps(resumed, opt_r, sched_r, 2, STEPS)
    want, got = _adapters(straight), _adapters(resumed)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
