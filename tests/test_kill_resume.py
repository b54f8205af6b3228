"""Kill every long stage with SIGKILL mid-run, resume it, and compare with an uninterrupted run.

Each case starts the real CLI in a subprocess (``tests/killresume.py``), waits for a real on-disk sign of
progress (a shard, a checkpoint, a progress line), SIGKILLs the process group, checks that nothing
finished-looking was left behind (no ``_COMPLETE``; the next stage refuses the folder), resumes with
``--resume`` (or re-runs the atomic stages), and checks the final artefacts against an uninterrupted run.
Everything here is deterministic on CPU with fixed seeds, so the comparisons are bitwise (safetensors
bytes, Arrow rows); see docs/reliability.md for the table.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from critic_mdp import make_run_inputs
from killresume import file_digests, kill_when, run_digiq, staged_leftovers, tree_state
from PIL import Image

from digiq.cli import main
from digiq.data.features import FeatureCache
from digiq.data.schema import INFO_FILE, load_dataset
from digiq.errors import DataError
from digiq.training.checkpoint import latest_checkpoint
from digiq.utils.io import COMPLETE_MARKER, is_complete

pytestmark = pytest.mark.slow


def _rows(path: Path) -> dict:
    return load_dataset(path).to_dict()


def _info(path: Path) -> dict:
    info = json.loads((path / INFO_FILE).read_text())
    info.pop("config", None)  # holds output_dir, which differs between the two runs by construction
    return info


def _progress(name: str, at_least: int):
    """A ``ready`` that fires once tqdm for ``name`` printed a count >= ``at_least``."""

    def ready(err: str) -> bool:
        import re

        counts = [int(m) for m in re.findall(rf"{name}:\s+\d+%\|[^|]*\|\s*(\d+)/", err)]
        return bool(counts) and max(counts) >= at_least

    return ready


# --------------------------------------------------------------------------------------------------
# sim collect: atomic (no resume); a kill leaves the previous finished dataset intact
# --------------------------------------------------------------------------------------------------


def test_sim_collect_kill_is_atomic_and_rerun_equals(tmp_path: Path) -> None:
    out = tmp_path / "sim"
    args = ["sim", "collect", f"output_dir={out}", "num_trajectories=250", "num_candidates=3",
            "sim.width=90", "sim.height=160", "overwrite=true"]  # fmt: skip
    # A finished dataset from an earlier run (another seed) is what a user has at out when they re-collect.
    assert run_digiq(*args, "seed=7").returncode == 0
    before = tree_state(out)
    k = kill_when(args, _progress("sim collect", 60))
    assert k.killed, f"the run ended before the kill point: {k.stderr[-2000:]}"
    assert tree_state(out) == before  # the old finished dataset is untouched, byte for byte
    assert _rows(out)["traj_id"][-1] == 249

    # Killed while nothing was there: no finished-looking folder, and the next stage says why.
    fresh = tmp_path / "fresh"
    k = kill_when([*args[:2], f"output_dir={fresh}", *args[3:]], _progress("sim collect", 60))
    assert k.killed and not is_complete(fresh)
    r = run_digiq(
        "train-critic", f"dataset={fresh}", f"features={tmp_path / 'f'}", f"output_dir={tmp_path / 'c'}"
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "dataset not found" in r.stderr or "incomplete" in r.stderr

    # Re-run after the kill == an uninterrupted run (same rows, same info).
    ref = tmp_path / "ref"
    assert run_digiq(*args[:2], f"output_dir={ref}", *args[3:]).returncode == 0
    assert run_digiq(*args).returncode == 0
    assert _rows(out) == _rows(ref) and _info(out) == _info(ref)
    assert not staged_leftovers(out), "a finished re-run cleans its temp siblings"


# --------------------------------------------------------------------------------------------------
# import: atomic (no resume)
# --------------------------------------------------------------------------------------------------


def _write_pt(root: Path, n_traj: int = 400, steps: int = 4) -> tuple[Path, Path]:
    """A post-processed official-style .pt (current + next image paths) with ``n_traj`` trajectories."""
    from digiq.actions import Action

    shots = root / "shots"
    shots.mkdir(parents=True)
    for k in range(steps + 1):
        Image.new("RGB", (24, 40), (40 * k, 90, 200)).save(shots / f"s{k}.png")
    rng = np.random.default_rng(0)
    data = []
    for i in range(n_traj):
        traj = []
        for t in range(steps):
            act = Action.tap(0.1 * (t + 1), 0.5).render()
            traj.append({
                "observation": f"Previous Actions: Goal: task {i}</s>", "task": f"task {i}",
                "image_path": f"shots/s{t}.png", "next_image_path": f"shots/s{t + 1}.png",
                "reward": int(t == steps - 1 and i % 2 == 0), "done": t == steps - 1, "action": act,
                "mc_return": 0.0, "traj_id": i, "step_id": t, "action_list": [act, "PRESS_BACK"],
                "q_rep_out_list": rng.standard_normal((2, 8)).astype(np.float32),
                "image_features": rng.standard_normal(4).astype(np.float32),
            })  # fmt: skip
        data.append(traj)
    pt = root / "data.pt"
    torch.save(data, pt)
    return pt, root


def test_import_kill_leaves_nothing_finished_and_rerun_equals(tmp_path: Path) -> None:
    pt, image_root = _write_pt(tmp_path / "in")
    out, feats = tmp_path / "ds", tmp_path / "feats"
    args = [
        "import",
        f"inputs=[{pt}]",
        f"output={out}",
        f"features_output={feats}",
        "features_shard_rows=256",
    ]
    k = kill_when(args, _progress("import", 200))
    assert k.killed, k.stderr[-2000:]
    assert not is_complete(out) and not is_complete(feats)
    r = run_digiq("train-critic", f"dataset={out}", f"features={feats}", f"output_dir={tmp_path / 'c'}")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]

    ref, ref_feats = tmp_path / "ref", tmp_path / "ref_feats"
    assert (
        run_digiq("import", args[1], f"output={ref}", f"features_output={ref_feats}", args[4]).returncode == 0
    )
    r = run_digiq(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _rows(out) == _rows(ref) and _info(out) == _info(ref)
    a, b = FeatureCache.open(feats), FeatureCache.open(ref_feats)
    assert torch.equal(a.state, b.state) and torch.equal(a.actions, b.actions)
    # the scratch folder of the killed run is left as a hidden sibling (never taken for an output)
    assert all(name.startswith(".ds.") for name in staged_leftovers(out))


# --------------------------------------------------------------------------------------------------
# cache-features: resumable in place (shards)
# --------------------------------------------------------------------------------------------------


def test_cache_features_sigkill_then_resume_is_bitwise_equal(sim_dataset: Path, tmp_path: Path) -> None:
    n_rows = len(load_dataset(sim_dataset))
    assert n_rows >= 20
    out, ref = tmp_path / "feats", tmp_path / "ref"
    args = ["cache-features", f"dataset={sim_dataset}", "shard_rows=3", "device=cpu", "dtype=float32"]
    k = kill_when([*args, f"output_dir={out}"], lambda _: (out / "shard-00001.safetensors").exists())
    assert k.killed, k.stderr[-2000:]
    assert not is_complete(out) and not (out / "manifest.json").exists()
    # the next stage refuses the half-written cache with a clear message
    r = run_digiq("train-critic", f"dataset={sim_dataset}", f"features={out}", f"output_dir={tmp_path / 'c'}")
    assert r.returncode == 1 and "incomplete" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]

    done_before = sorted(p.name for p in out.glob("shard-*.safetensors"))
    r = run_digiq(*args, f"output_dir={out}", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{len(done_before)} already done" in r.stderr  # the shards of the killed run were kept
    assert run_digiq(*args, f"output_dir={ref}").returncode == 0
    a, b = FeatureCache.open(out), FeatureCache.open(ref)
    assert torch.equal(a.state, b.state) and torch.equal(a.actions, b.actions)  # bitwise
    skip = {COMPLETE_MARKER, "config.yaml", "manifest.json"}  # these name output_dir / hold a timestamp
    assert file_digests(out, skip) == file_digests(ref, skip)
    man_a, man_b = (json.loads((p / "manifest.json").read_text()) for p in (out, ref))
    assert man_a == man_b


# --------------------------------------------------------------------------------------------------
# train-critic: checkpoint every epoch, resume replays the interrupted epoch exactly
# --------------------------------------------------------------------------------------------------


def test_train_critic_sigkill_then_resume_is_bitwise_equal(tmp_path: Path) -> None:
    ds, feats, _, _ = make_run_inputs(tmp_path / "in", num_traj=60, gamma=0.9)
    args = ["train-critic", f"dataset={ds}", f"features={feats}", "gamma=0.9", "batch_size=64",
            "steps_per_epoch=60", "epochs=6", "critic.q_hidden=[64,64]", "critic.v_hidden=[64,64]",
            "log_every=7", "q_star=skip", "wandb.mode=disabled", "device=cpu"]  # fmt: skip
    out, ref = tmp_path / "run", tmp_path / "ref"

    def after_first_checkpoint(_: str) -> bool:
        return latest_checkpoint(out) is not None

    k = kill_when([*args, f"output_dir={out}"], after_first_checkpoint)
    assert k.killed, k.stderr[-2000:]
    assert not (out / "critic").exists() and not (out / "metrics.json").exists()
    killed_epoch = json.loads((latest_checkpoint(out) / "trainer_state.json").read_text())["position"][
        "epoch"
    ]
    assert killed_epoch < 6
    # a plain re-run refuses to clobber the interrupted run; --resume continues it
    r = run_digiq(*args, f"output_dir={out}")
    assert r.returncode == 1 and "--resume" in r.stderr
    r = run_digiq(*args, f"output_dir={out}", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert run_digiq(*args, f"output_dir={ref}").returncode == 0
    skip = {COMPLETE_MARKER, "config.yaml"}
    got, want = file_digests(out, skip), file_digests(ref, skip)
    assert got.keys() == want.keys()
    for name in want:
        if name != "metrics.jsonl":
            assert got[name] == want[name], name  # weights, target, Adam state, RNG, metrics.json: bitwise
    # metrics.jsonl: same rows (the interrupted epoch's lines were dropped and re-logged)
    rows = [(out / "metrics.jsonl").read_text(), (ref / "metrics.jsonl").read_text()]
    assert [json.loads(x) for x in rows[0].splitlines()] == [json.loads(x) for x in rows[1].splitlines()]


def test_train_critic_resume_survives_a_torn_metrics_line(tmp_path: Path) -> None:
    """A kill in the middle of appending to metrics.jsonl leaves half a JSON line; --resume must cope."""
    ds, feats, _, _ = make_run_inputs(tmp_path / "in", num_traj=30, gamma=0.9)
    args = ["train-critic", f"dataset={ds}", f"features={feats}", "gamma=0.9", "batch_size=32",
            "steps_per_epoch=10", "epochs=2", "critic.q_hidden=[16]", "critic.v_hidden=[16]", "log_every=5",
            "q_star=skip", "wandb.mode=disabled", "device=cpu", f"output_dir={tmp_path / 'run'}"]  # fmt: skip
    assert main(args[:1] + [*args[1:], "epochs=1"]) == 0  # in-process: the kill itself is not the point here
    with (tmp_path / "run" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 13, "train/lo')  # torn: no closing brace, no newline
    assert main([*args, "--resume"]) == 0
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(x)["step"] <= 20 for x in lines) and json.loads(lines[-1])["step"] == 20


def test_incomplete_outputs_are_refused_by_readers(tmp_path: Path, sim_dataset: Path) -> None:
    """A folder without its _COMPLETE marker is never read as a finished dataset or feature cache."""
    import shutil

    ds = tmp_path / "ds"
    shutil.copytree(sim_dataset, ds)
    (ds / COMPLETE_MARKER).unlink()
    with pytest.raises(DataError, match="incomplete"):
        load_dataset(ds)
    with pytest.raises(DataError, match="incomplete|_COMPLETE"):
        FeatureCache.open(ds)


# --------------------------------------------------------------------------------------------------
# finetune-vlm: checkpoints/step-N/ every save_every steps; resume replays the data order exactly
# --------------------------------------------------------------------------------------------------


def _json_or_none(path: Path) -> dict | None:
    try:  # the checkpoint folder may be mid-swap (staged_dir rename) while we poll
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _safetensors_differing(a: Path, b: Path) -> list[str]:
    """Names of the .safetensors files under ``a`` whose tensors differ (bitwise) from ``b``'s."""
    from safetensors.torch import load_file

    bad = []
    for f in sorted(a.rglob("*.safetensors")):
        ta, tb = load_file(str(f)), load_file(str(b / f.relative_to(a)))
        if ta.keys() != tb.keys() or any(not torch.equal(ta[k], tb[k]) for k in ta):
            bad.append(str(f.relative_to(a)))
    return bad


def test_finetune_vlm_sigkill_then_resume_is_bitwise_equal(sim_dataset: Path, tmp_path: Path) -> None:
    args = ["finetune-vlm", f"dataset={sim_dataset}", "model.name_or_path=tiny:qwen2-vl@image_size=56",
            "batch_size=2", "eval_batch_size=8", "val_fraction=0.2", "max_steps=8", "save_every=2",
            "keep_checkpoints=10", "log_every=1", "wandb.mode=disabled"]  # fmt: skip
    out, ref = tmp_path / "run", tmp_path / "ref"
    k = kill_when([*args, f"output_dir={out}"], lambda _: is_complete(out / "checkpoints" / "step-2"))
    assert k.killed, k.stderr[-2000:]
    assert not is_complete(out) and not (out / "model").exists() and not (out / "metrics.json").exists()
    assert not is_complete(out / "checkpoints" / "step-8")
    r = run_digiq(*args, f"output_dir={out}")  # a plain re-run refuses the unfinished folder
    assert r.returncode == 1 and "--resume" in r.stderr, r.stderr[-2000:]
    r = run_digiq(*args, f"output_dir={out}", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    assert run_digiq(*args, f"output_dir={ref}").returncode == 0
    # weights of the final model and of every checkpoint (weights, Adam moments, RNG): bitwise
    assert not _safetensors_differing(ref / "model", out / "model")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == sorted(
        p.name for p in (ref / "checkpoints").iterdir()
    )
    assert not _safetensors_differing(ref / "checkpoints", out / "checkpoints")
    ma, mb = (json.loads((p / "metrics.json").read_text()) for p in (out, ref))
    ma.pop("seconds"), mb.pop("seconds")
    assert ma == mb  # held-out accuracy/AUC/loss/confusion identical
    loss = [{r["step"]: r["train/loss"] for r in map(json.loads, (p / "metrics.jsonl").read_text().splitlines())
             if "train/loss" in r} for p in (out, ref)]  # fmt: skip
    assert loss[0] == loss[1] and sorted(loss[1]) == list(range(1, 9))


# --------------------------------------------------------------------------------------------------
# train-bc / extract-policy: <out>/checkpoints/step-N every train.save_every steps (digiq.training.checkpoint)
# --------------------------------------------------------------------------------------------------


def _policy_kill_resume(args: list[str], out: Path, ref: Path, kill_step: int, total: int) -> None:
    def ready(_: str) -> bool:
        ck = latest_checkpoint(out)
        st = None if ck is None else _json_or_none(ck / "trainer_state.json")
        return st is not None and st["step"] >= kill_step

    k = kill_when([*args, f"output_dir={out}"], ready)
    assert k.killed, k.stderr[-2000:]
    killed_at = json.loads((latest_checkpoint(out) / "trainer_state.json").read_text())["step"]
    assert killed_at < total, "the kill came after the last step: nothing left to resume"
    assert not is_complete(out / "policy") and not (out / "metrics.json").exists()
    r = run_digiq(*args, f"output_dir={out}", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"at step {killed_at} / {total}" in r.stderr  # it continued, it did not start over
    assert run_digiq(*args, f"output_dir={ref}").returncode == 0
    assert not _safetensors_differing(ref / "policy", out / "policy")  # the exported policy: bitwise
    assert not _safetensors_differing(ref / "checkpoints", out / "checkpoints")  # weights, Adam, RNG
    sa, sb = (json.loads((latest_checkpoint(p) / "trainer_state.json").read_text()) for p in (out, ref))
    assert sa == sb
    loss = [{r["step"]: r["train/loss"] for r in map(json.loads, (p / "metrics.jsonl").read_text().splitlines())
             if "train/loss" in r} for p in (out, ref)]  # fmt: skip
    assert loss[0] == loss[1] and sorted(loss[1]) == list(range(1, total + 1))


def test_train_bc_sigkill_then_resume_is_bitwise_equal(sim_dataset: Path, tmp_path: Path) -> None:
    args = ["train-bc", f"dataset={sim_dataset}", "max_rows=16", "trajectories=all", "train.batch_size=2",
            "train.max_steps=8", "train.save_every=2", "train.log_every=1", "wandb.mode=disabled"]  # fmt: skip
    _policy_kill_resume(args, tmp_path / "run", tmp_path / "ref", kill_step=2, total=8)


def test_extract_policy_sigkill_then_resume_is_bitwise_equal(sim_dataset: Path, tmp_path: Path) -> None:
    bc = tmp_path / "bc"
    r = run_digiq("train-bc", f"dataset={sim_dataset}", f"output_dir={bc}", "max_rows=4", "trajectories=all",
                  "train.batch_size=2", "train.max_steps=1", "wandb.mode=disabled")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    args = ["extract-policy", f"dataset={sim_dataset}", f"init_policy={bc / 'policy'}", "scorer=q_star",
            "threshold=-1", "train.batch_size=2", "train.max_steps=8", "train.save_every=2",
            "train.log_every=1", "wandb.mode=disabled"]  # fmt: skip
    _policy_kill_resume(args, tmp_path / "run", tmp_path / "ref", kill_step=2, total=8)


# --------------------------------------------------------------------------------------------------
# digiq pipeline: killed in a middle stage; --resume skips the finished stages and resumes that one
# --------------------------------------------------------------------------------------------------


def test_pipeline_sigkill_mid_stage_then_resume(tmp_path: Path) -> None:
    from digiq.stages.pipeline import FOLDERS, STAGES

    out = tmp_path / "p"
    # 20 trajectories instead of the smoke run's 30: fewer rows to fine-tune on and cache features for
    args = [
        "pipeline",
        "--config",
        "configs/pipeline/smoke.yaml",
        f"output_dir={out}",
        "collect.num_trajectories=20",
    ]
    critic = out / FOLDERS["train_critic"]

    def in_train_critic(_: str) -> bool:  # epoch 1 of 2 checkpointed, the stage not finished
        return latest_checkpoint(critic) is not None and not is_complete(critic)

    # the critic's epoch takes seconds: polling every 50 ms catches it and leaves the 2 cores to the run
    k = kill_when(args, in_train_critic, timeout=540, poll=0.05)
    assert k.killed, k.stderr[-2000:]
    before_kill = STAGES[: STAGES.index("train_critic")]
    assert all(is_complete(out / FOLDERS[s]) for s in before_kill)
    assert not is_complete(critic) and not (out / "summary.md").exists()
    finished = {s: tree_state(out / FOLDERS[s]) for s in before_kill}

    r = run_digiq(*args, "--resume", timeout=540)
    assert r.returncode == 0, r.stderr[-3000:]
    for s in before_kill:
        assert f"[{s}] complete at" in r.stderr, s  # skipped, not recomputed
        assert tree_state(out / FOLDERS[s]) == finished[s], f"{s}: a finished stage's folder changed"
    assert "[train_critic] resuming the unfinished run" in r.stderr
    assert "no finished checkpoint" not in r.stderr  # it continued from the epoch-1 checkpoint
    assert all(is_complete(out / FOLDERS[s]) for s in STAGES)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["stages"]) == set(STAGES)
    assert (out / "summary.md").read_text().startswith("# digiq pipeline summary")
