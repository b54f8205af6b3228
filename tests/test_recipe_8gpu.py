"""docs/distributed.md's one-node, 8-GPU recipe, Stage 1: the shipped LLaVA-1.5-7B LoRA config under a 2-process
launcher on the CPU (torchrun, gloo), with a tiny LLaVA in place of the 7B weights. The other recipe commands have
their 2-process tests in tests/test_distributed.py, tests/test_critic_train.py and tests/test_cache_features_stage.py
(the table in docs/distributed.md says which)."""

from __future__ import annotations

import contextlib
import io
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from killresume import digiq_env

from digiq.cli import main
from digiq.config import load_config
from digiq.stages import finetune_vlm

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/finetune-vlm/llava-1.5-7b.yaml"
DOC = ROOT / "docs/distributed.md"


def recipe_commands() -> list[list[str]]:
    """The digiq arguments of each ``$A -m digiq ...`` command in the doc's one-node recipe block."""
    text = DOC.read_text()
    block = text.split("## One node, 8 GPUs", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    joined = block.replace("\\\n", " ")
    return [shlex.split(line)[3:] for line in joined.splitlines() if line.startswith("$A -m digiq ")]


def test_every_recipe_command_loads_its_config() -> None:
    commands = recipe_commands()
    assert [c[0] for c in commands] == [
        "finetune-vlm", "train-bc", "candidates", "cache-features", "train-critic", "extract-policy"
    ]  # fmt: skip
    for argv in commands:
        with contextlib.redirect_stdout(io.StringIO()):
            assert main([*argv, "--print-config"]) == 0, argv


@pytest.mark.slow
@pytest.mark.distributed
def test_stage1_lora_recipe_under_two_processes(synthetic_dataset: Path, tmp_path: Path) -> None:
    """LoRA under DDP is the recipe's risky part: the adapters above the feature layer get no gradient, and DDP
    waits for them forever unless told (find_unused_parameters). The shipped settings are kept (LoRA on q/k/v/o,
    bf16 mixed precision, gradient checkpointing); only the model, the data and the step count are small."""
    cfg = load_config(finetune_vlm.Config, RECIPE)
    assert cfg.lora.enabled and cfg.mixed_precision == "bf16" and cfg.model.gradient_checkpointing
    out = tmp_path / "ft"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "digiq",
           "finetune-vlm", "--config", str(RECIPE), "model.name_or_path=tiny:llava",
           "lora.r=8", "lora.alpha=16", f"dataset={synthetic_dataset}", f"output_dir={out}", "batch_size=4",
           "eval_batch_size=4", "max_steps=2", "save_every=1", "val_fraction=0.25", "max_val_rows=8",
           "progress=false", "wandb.mode=disabled"]  # fmt: skip
    r = subprocess.run(cmd, cwd=tmp_path, env=digiq_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert (out / "_COMPLETE").is_file() and (out / "model" / "config.json").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]
