"""Every stage under a 2-process launcher on the CPU (torchrun, gloo): only the main process writes, a
checkpoint written by the distributed run resumes bit for bit, the export loads with plain transformers,
and work split over processes gives the 1-process result.

Which process writes what is recorded by tests/write_trace/sitecustomize.py (every open-for-write,
os.replace, rename, mkdir, unlink and rmtree, by RANK) in each launched process.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from killresume import digiq_env
from safetensors.torch import load_file

from digiq.data.schema import load_dataset
from digiq.training.checkpoint import finished_checkpoints

ROOT = Path(__file__).resolve().parents[1]
TRACER = Path(__file__).resolve().parent / "write_trace"
pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def launch(args: list[str], trace: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 -m digiq <args>`` with the write tracer loaded in both processes."""
    trace.mkdir(parents=True, exist_ok=True)
    env = digiq_env(PYTHONPATH=f"{TRACER}:{ROOT}", DIGIQ_WRITE_TRACE=str(trace))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "digiq", *args]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def writes(trace: Path, rank: int, under: Path) -> list[str]:
    f = trace / f"{rank}.txt"
    lines = f.read_text().splitlines() if f.exists() else []
    return sorted({p for p in lines if p.startswith(str(under.resolve()))})


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


BC = ["max_rows=16", "train.batch_size=4", "train.max_steps=4", "train.save_every=2", "train.num_workers=0",
      "wandb.mode=disabled"]  # fmt: skip


@pytest.fixture(scope="module")
def bc_run(sim_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "bc"
    launch(["train-bc", f"dataset={sim_dataset}", f"output_dir={out}", *BC], out.parent / "trace_bc")
    return out


def test_train_bc_writes_on_rank0_resumes_bitwise_and_exports(
    bc_run: Path, sim_dataset: Path, tmp_path: Path
):
    from transformers import AutoModelForImageTextToText

    trace = bc_run.parent / "trace_bc"
    assert writes(trace, 0, bc_run) and not writes(trace, 1, bc_run)
    last = finished_checkpoints(bc_run)[-1]
    assert {p.name for p in last.glob("rng-*.safetensors")} == {"rng-0.safetensors", "rng-1.safetensors"}
    # the export loads with plain transformers
    model = AutoModelForImageTextToText.from_pretrained(bc_run / "policy")
    assert sum(p.numel() for p in model.parameters()) > 0
    # kill after the step-2 checkpoint (drop what came after), resume with 2 processes: the same weights
    broken = tmp_path / "bc"
    shutil.copytree(bc_run, broken)
    for p in ("checkpoints/step-4", "policy", "metrics.json", "_COMPLETE"):
        shutil.rmtree(broken / p) if (broken / p).is_dir() else (broken / p).unlink()
    r = launch(
        ["train-bc", f"dataset={sim_dataset}", f"output_dir={broken}", *BC, "--resume"], tmp_path / "t"
    )
    assert "at step 2 / 4" in r.stderr
    a, b = _weights(bc_run / "policy"), _weights(broken / "policy")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not writes(tmp_path / "t", 1, broken)


def test_extract_policy_writes_on_rank0(bc_run: Path, sim_dataset: Path, tmp_path: Path):
    out, trace = tmp_path / "ex", tmp_path / "trace"
    launch(["extract-policy", f"dataset={sim_dataset}", f"init_policy={bc_run / 'policy'}", f"output_dir={out}",
            "scorer=q_star", "threshold=-1", "train.batch_size=4", "train.max_steps=2", "train.num_workers=0",
            "wandb.mode=disabled"], trace)  # fmt: skip
    assert (out / "policy" / "digiq_policy.json").is_file()
    assert writes(trace, 0, out) and not writes(trace, 1, out)


def test_finetune_vlm_writes_on_rank0(synthetic_dataset: Path, tmp_path: Path):
    out, trace = tmp_path / "ft", tmp_path / "trace"
    launch(["finetune-vlm", f"dataset={synthetic_dataset}", f"output_dir={out}",
            "model.name_or_path=tiny:qwen2-vl@image_size=56", "batch_size=2", "max_steps=2", "save_every=1",
            "val_fraction=0.25", "wandb.mode=disabled"], trace)  # fmt: skip
    assert (out / "model").is_dir() and writes(trace, 0, out) and not writes(trace, 1, out)


def test_candidates_split_over_processes_equal_one_process(bc_run: Path, sim_dataset: Path, tmp_path: Path):
    from digiq.config import load_config
    from digiq.stages import candidates

    args = [f"dataset={sim_dataset}", "source=policy", f"policy={bc_run / 'policy'}", "num_candidates=3",
            "batch_size=4", "max_rows=12", "max_resamples=1"]  # fmt: skip
    out2, trace = tmp_path / "c2", tmp_path / "trace"
    launch(["candidates", *args, f"output_dir={out2}"], trace)
    assert writes(trace, 0, out2) and not writes(trace, 1, out2)
    candidates.run(load_config(candidates.Config, None, [*args, f"output_dir={tmp_path / 'c1'}"]))
    assert load_dataset(out2)["candidates"] == load_dataset(tmp_path / "c1")["candidates"]


def test_a_single_process_command_runs_once(tmp_path: Path):
    out, trace = tmp_path / "eval", tmp_path / "trace"
    launch(["evaluate", "policy=behaviour", "num_episodes=4", f"output_dir={out}"], trace)
    assert (out / "metrics.json").is_file()
    assert writes(trace, 0, out) and not writes(trace, 1, out)


def test_train_critic_writes_on_rank0(tmp_path: Path):
    from critic_mdp import make_run_inputs

    ds, feats, _, _ = make_run_inputs(tmp_path / "in", num_traj=20, gamma=0.9)
    out, trace = tmp_path / "critic", tmp_path / "trace"
    launch(["train-critic", f"dataset={ds}", f"features={feats}", f"output_dir={out}", "gamma=0.9", "epochs=2",
            "steps_per_epoch=5", "batch_size=32", "critic.q_hidden=[16]", "critic.v_hidden=[16]", "q_star=skip",
            "device=cpu", "wandb.mode=disabled"], trace)  # fmt: skip
    assert (out / "critic").is_dir() and writes(trace, 0, out) and not writes(trace, 1, out)


def test_cache_features_shards_are_written_by_their_owner_only(sim_dataset: Path, tmp_path: Path):
    out, trace = tmp_path / "feats", tmp_path / "trace"
    launch(
        ["cache-features", f"dataset={sim_dataset}", f"output_dir={out}", "shard_rows=8", "device=cpu"], trace
    )
    rank1 = writes(trace, 1, out)
    # by design each process writes the shards it computed (odd shards here), and nothing else
    assert rank1 and all(
        Path(p).name.startswith("shard-0000") and int(Path(p).stem[-1]) % 2 == 1 for p in rank1
    )
    assert (out / "manifest.json").as_posix() in writes(trace, 0, out)


def test_fsdp_sharded_checkpoint_resumes_bitwise(tmp_path: Path):
    """FSDP2 (torch's fully_shard, per decoder layer) on 2 CPU processes: the toolkit gathers the shards into
    one full checkpoint written by rank 0, and a freshly sharded model resumes from it bit for bit with only
    rank 0 reading the weights and optimizer state (the others receive them by broadcast)."""
    env = digiq_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).parent / "fsdp_resume.py"), str(tmp_path / "run")]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("FSDP-RESUME"))
    assert "bitwise=True" in line and "same_init=True" in line and "resumed_at=2" in line, line
    assert "rng-1.safetensors" in line
    # only the main process reads the full weights and optimizer state; each process its own RNG file
    rank0 = "['model.safetensors', 'optimizer.safetensors', 'rng-0.safetensors']"
    assert f"reads=[{rank0}, ['rng-1.safetensors']]" in line, line
