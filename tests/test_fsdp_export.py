"""Exports and resumes of FSDP-sharded runs: finetune-vlm (full and LoRA) and train-bc under accelerate's FSDP2
plugin on 2 CPU processes (gloo; tests/fsdp_launch.py), each export reloaded with plain ``transformers`` and
compared with the trained weights; plus the single-process LoRA merge the sharded export relies on."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from killresume import digiq_env

from digiq.config import LoraConfig, ModelConfig
from digiq.training.checkpoint import finished_checkpoints, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = Path(__file__).resolve().parent / "fsdp_launch.py"
LLAVA = "tiny:llava@image_size=56"
FT = ["batch_size=2", "max_steps=2", "save_every=1", "val_fraction=0.25", "wandb.mode=disabled"]
BC = ["max_rows=16", "train.batch_size=4", "train.max_steps=4", "train.save_every=2", "train.num_workers=0",
      "wandb.mode=disabled"]  # fmt: skip


def launch_fsdp(
    args: list[str], timeout: float = 600, script: Path = LAUNCHER
) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 tests/fsdp_launch.py <args>``: both processes must shard their model."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           *args]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, env=digiq_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.count("FSDP2-PREPARED") == 2, r.stdout[-2000:]
    return r


def reloaded(folder: Path) -> dict[str, torch.Tensor]:
    """The export read back by plain transformers (no digiq code involved)."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(folder).state_dict()


def initial(name: str) -> dict[str, torch.Tensor]:
    from digiq.models.vlm import load_vlm

    return load_vlm(ModelConfig(name_or_path=name))[0].state_dict()


def assert_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(want) - set(got))
    assert not missing, missing[:3]
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, differ[:3]


def assert_trained(export: dict[str, torch.Tensor], init: dict[str, torch.Tensor]) -> None:
    assert any(not torch.equal(export[k], init[k]) for k in init), "the export holds the initial weights"


def drop_after(run: Path, copy: Path, step: int) -> Path:
    """A copy of ``run`` as if killed right after its step-``step`` checkpoint."""
    shutil.copytree(run, copy)
    for p in [c for c in finished_checkpoints(copy) if int(c.name[5:]) > step] + [
        copy / name for name in ("model", "policy", "metrics.json", "_COMPLETE")
    ]:
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    return copy


@pytest.mark.slow
@pytest.mark.distributed
def test_finetune_vlm_under_fsdp_exports_the_trained_full_weights(synthetic_dataset: Path, tmp_path: Path):
    out = tmp_path / "ft"
    launch_fsdp(["finetune-vlm", f"dataset={synthetic_dataset}", f"output_dir={out}",
                 f"model.name_or_path={LLAVA}", *FT])  # fmt: skip
    export = reloaded(out / "model")
    # full fine-tuning: the last checkpoint holds every trained parameter, gathered from the shards
    trained = load_checkpoint(finished_checkpoints(out)[-1]).weights()
    assert len(trained) > 10
    assert_equal(export, trained)
    assert_trained(export, initial(LLAVA))


@pytest.mark.slow
@pytest.mark.distributed
def test_finetune_vlm_lora_under_fsdp_merges_and_resumes_bitwise(synthetic_dataset: Path, tmp_path: Path):
    from digiq.models.vlm import apply_lora, load_vlm

    out = tmp_path / "ft"
    args = ["finetune-vlm", f"dataset={synthetic_dataset}", f"model.name_or_path={LLAVA}", "lora.enabled=true",
            "lora.r=4", "merge_lora=true", *FT]  # fmt: skip
    launch_fsdp([*args, f"output_dir={out}"])
    last = load_checkpoint(finished_checkpoints(out)[-1])
    assert last.weights() and all("lora_" in k for k in last.weights())  # adapters only
    # the export is the base with the trained adapters merged, as merge_and_unload on one process makes it
    model, _ = load_vlm(ModelConfig(name_or_path=LLAVA))
    model = apply_lora(model, LoraConfig(enabled=True, r=4))
    last.restore_weights(model)
    export = reloaded(out / "model")
    assert_equal(export, model.merge_and_unload().state_dict())
    assert_trained(export, initial(LLAVA))
    # killed after step 1: resumed under FSDP (rank 0 reads, the adapters are broadcast) to the same export
    broken = drop_after(out, tmp_path / "broken", 1)
    r = launch_fsdp([*args, f"output_dir={broken}", "--resume"])
    assert "resumed from" in r.stderr and "step 1" in r.stderr
    assert_equal(reloaded(broken / "model"), export)


@pytest.mark.slow
@pytest.mark.distributed
def test_train_bc_under_fsdp_exports_the_trained_policy_and_resumes_bitwise(
    sim_dataset: Path, tmp_path: Path
):
    from digiq.stages.train_bc import TINY_POLICY

    out = tmp_path / "bc"
    launch_fsdp(["train-bc", f"dataset={sim_dataset}", f"output_dir={out}", *BC])
    assert (out / "policy" / "digiq_policy.json").is_file()
    export = reloaded(out / "policy")
    trained = load_checkpoint(finished_checkpoints(out)[-1]).weights()
    assert len(trained) > 10
    assert_equal(export, trained)
    assert_trained(export, initial(TINY_POLICY))
    broken = drop_after(out, tmp_path / "broken", 2)
    r = launch_fsdp(["train-bc", f"dataset={sim_dataset}", f"output_dir={broken}", *BC, "--resume"])
    assert "at step 2 / 4" in r.stderr
    assert_equal(reloaded(broken / "policy"), export)


@pytest.mark.slow
@pytest.mark.distributed
def test_extract_policy_kl_reference_is_rank0s_on_every_process(sim_dataset: Path, tmp_path: Path):
    """With RAM-efficient loading only rank 0 loads pi_beta (tests/fsdp_reference.py gives rank 1 zeros, as
    the loader may): the trained policy gets rank 0's weights through FSDP's preparation, and the frozen
    KL reference, which no launcher prepares, must too."""
    from digiq.config import load_config
    from digiq.stages import train_bc

    bc = tmp_path / "bc"
    train_bc.run(load_config(train_bc.Config, None, [f"dataset={sim_dataset}", f"output_dir={bc}", *BC]))
    r = launch_fsdp(["extract-policy", f"dataset={sim_dataset}", f"init_policy={bc / 'policy'}",
                     f"output_dir={tmp_path / 'ex'}", "scorer=q_star", "threshold=-1", "train.batch_size=4",
                     "train.max_steps=2", "train.num_workers=0", "log_kl=true", "wandb.mode=disabled"],
                    script=LAUNCHER.parent / "fsdp_reference.py")  # fmt: skip
    assert "REFERENCE same=True loaded=True" in r.stdout, r.stdout[-2000:]
    assert (tmp_path / "ex" / "policy" / "digiq_policy.json").is_file()


def test_merged_lora_state_equals_merge_and_unload():
    """The merge a sharded export applies to gathered weights gives merge_and_unload's weights, bit for bit."""
    from digiq.models.tiny import TinySpec
    from digiq.models.vlm import apply_lora, build_tiny_vlm, export_state, merged_lora_state

    model, _ = build_tiny_vlm("llava", TinySpec(hidden=32, layers=2, heads=2, kv_heads=1), seed=0)
    model = apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8))
    with torch.no_grad():  # peft starts lora_B at zero: give the adapters something to merge
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p))
    assert export_state(model) is None  # not sharded: the single-process export saves the live model
    merged = merged_lora_state(model, {k: v.clone() for k, v in model.state_dict().items()})
    want = model.merge_and_unload().state_dict()
    assert merged.keys() == want.keys()
    assert all(torch.equal(merged[k], want[k]) for k in want)
