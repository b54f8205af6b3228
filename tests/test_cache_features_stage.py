"""`digiq cache-features`: a readable cache, resume recomputes only missing shards, refusals, 2 processes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from killresume import digiq_env
from PIL import Image, ImageDraw

from digiq.actions import Action, ActionType, make_observation
from digiq.config import load_config
from digiq.data.features import FeatureCache
from digiq.data.schema import FEATURES, load_dataset, save_dataset
from digiq.errors import DataError
from digiq.models.featurize import reference_features
from digiq.models.prompts import previous_action_from_observation
from digiq.models.vlm import load_vlm
from digiq.stages import cache_features as cf
from digiq.utils.io import RUN_RECORD

ROOT = Path(__file__).resolve().parents[1]


def _screen(k: int) -> Image.Image:
    img = Image.new("RGB", (90, 160), (240, 240, 240))
    ImageDraw.Draw(img).rectangle([5 + 7 * k, 10, 60, 40 + 9 * k], fill=(30 * k % 255, 90, 200))
    return img


def make_dataset(path: Path, ragged: bool = False) -> Path:
    """Two trajectories, 5 rows; candidates of 3 (or 1..3 when ragged), index 0 = the dataset action."""
    acts = [
        Action.tap(0.3, 0.4),
        Action.type_text("usb cable"),
        Action.key(ActionType.PRESS_ENTER),
        Action.swipe((0.8, 0.5), (0.2, 0.5)),
        Action(ActionType.STATUS_TASK_COMPLETE),
    ]
    rows: dict[str, list] = {k: [] for k in FEATURES}
    for i, (traj, step) in enumerate([(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]):
        goal = "Turn on wifi" if traj == 0 else 'search for "usb cable"'
        prev = acts[i - 1] if step else None
        cands = [acts[i].render(), acts[(i + 1) % 5].render(), acts[(i + 2) % 5].render()]
        if ragged:
            cands = cands[: 1 + i % 3] if i != 4 else []
        row = dict(
            traj_id=traj,
            step_id=step,
            task=goal,
            observation=make_observation(goal, prev),
            screenshot=_screen(i),
            next_screenshot=_screen(i + 1),
            action=acts[i].render(),
            reward=float(i == 4),
            done=step == 1 and traj == 1,
            mc_return=0.0,
            candidates=cands,
            state_key="",
        )
        for k in FEATURES:
            rows[k].append(row[k])
    save_dataset(Dataset.from_dict(rows, features=FEATURES), path)
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("ds") / "ds")


@pytest.fixture(scope="module")
def full_run(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("feats") / "full"
    summary = cf.run(_cfg(dataset, out))
    assert summary["status"] == "complete" and summary["computed_shards"] == [0, 1, 2]
    return out


def _cfg(ds: Path, out: Path, *extra: str) -> cf.Config:
    return load_config(
        cf.Config, None, [f"dataset={ds}", f"output_dir={out}", "shard_rows=2", "device=cpu", *extra]
    )


def test_cache_is_readable_and_equals_per_pair_reference(dataset: Path, full_run: Path) -> None:
    cache = FeatureCache.open(full_run)
    cache.check_against(5, num_candidates=3)
    assert cache.manifest["rendering"] == "text" and cache.manifest["model"] == "tiny:llava"
    assert [s["file"] for s in cache.manifest["shards"]] == [f"shard-0000{i}.safetensors" for i in range(3)]
    # rows 1 and 4 (different shards) against plain per-pair forwards of the same prompts
    from datasets import load_from_disk

    ds = load_from_disk(str(dataset))
    model, proc = load_vlm("tiny:llava")
    for i in (1, 4):
        r = ds[i]
        prev = previous_action_from_observation(r["observation"])
        acts = cf.row_actions(r["action"], r["candidates"])
        ref = [
            reference_features(model, proc, r["screenshot"], r["task"], prev, a, "text")
            for a in [None, *acts]
        ]
        torch.testing.assert_close(cache.state[i], ref[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(cache.actions[i], torch.stack(ref[1:]), atol=1e-4, rtol=0)
    assert cache.manifest["dataset_fingerprint"] == ds._fingerprint


def test_resume_recomputes_only_missing_shards(dataset: Path, full_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "feats"
    first = cf.run(_cfg(dataset, out, "max_shards=1"))  # a "kill" after one shard
    assert first["status"] == "incomplete" and first["computed_shards"] == [0]
    assert (out / RUN_RECORD).is_file() and not (out / "_COMPLETE").exists()
    with pytest.raises(DataError, match="incomplete"):
        FeatureCache.open(out)  # a partial cache is never served
    # a torn shard (as after a kill mid-write of a non-atomic copy) is detected and recomputed
    shutil.copy(full_run / "shard-00001.safetensors", out / "shard-00001.safetensors")
    data = (out / "shard-00001.safetensors").read_bytes()
    (out / "shard-00001.safetensors").write_bytes(data[: len(data) // 2])
    mtime0 = (out / "shard-00000.safetensors").stat().st_mtime_ns
    with pytest.raises(FileExistsError, match=f"{out} holds an unfinished cache-features run; pass --resume"):
        cf.run(_cfg(dataset, out))
    second = cf.run(_cfg(dataset, out, "resume=true"))
    assert second["status"] == "complete"
    assert second["skipped_shards"] == [0] and second["computed_shards"] == [1, 2]
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == mtime0
    a, b = FeatureCache.open(out), FeatureCache.open(full_run)
    assert torch.equal(a.state, b.state) and torch.equal(a.actions, b.actions)
    # finished: a second identical run does nothing
    assert cf.run(_cfg(dataset, out, "resume=true"))["status"] == "already complete"


def test_mismatched_in_progress_state_is_refused(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "feats"
    cf.run(_cfg(dataset, out, "max_shards=0"))
    with pytest.raises(DataError, match="different configuration.*layer"):
        cf.run(_cfg(dataset, out, "layer=1", "resume=true"))
    with pytest.raises(FileExistsError):
        cf.run(_cfg(dataset, tmp_path, "layer=1"))  # a non-empty folder that is not ours
    done = cf.run(_cfg(dataset, out, "layer=1", "overwrite=true", "dtype=float16", "rendering=overlay"))
    assert done["status"] == "complete"
    cache = FeatureCache.open(out)
    assert cache.state.dtype == torch.float16 and cache.manifest["layer"] == 1
    assert cache.manifest["rendering"] == "overlay"


def test_ragged_candidates_are_padded_and_marked(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path / "ds", ragged=True)
    cf.run(_cfg(ds, tmp_path / "feats", "shard_rows=3"))
    cache = FeatureCache.open(tmp_path / "feats")
    expected = torch.tensor([[True, False, False], [True, True, False], [True, True, True]] * 2)[:5]
    expected[4] = torch.tensor([True, False, False])  # empty candidates: just the dataset action
    assert torch.equal(cache.valid, expected)
    assert torch.equal(cache.actions[~cache.valid], torch.zeros_like(cache.actions[~cache.valid]))


def test_cli_and_finetune_folder(dataset: Path, tmp_path: Path) -> None:
    """The CLI runs the stage; a Stage-1 output folder (holding model/) is accepted as the model."""
    from digiq.models.vlm import save_vlm

    model, proc = load_vlm("tiny:qwen2-vl")
    save_vlm(model, proc, tmp_path / "finetune" / "model")
    out = tmp_path / "feats"
    env = digiq_env()
    cmd = [sys.executable, "-m", "digiq", "cache-features", f"dataset={dataset}", f"output_dir={out}"]
    cmd += [f"model.name_or_path={tmp_path / 'finetune'}", "shard_rows=4", "device=cpu"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    man = json.loads((out / "manifest.json").read_text())
    assert man["model"] == str(tmp_path / "finetune" / "model") and man["num_rows"] == 5
    bad = subprocess.run(
        [*cmd[:4], f"dataset={tmp_path / 'nope'}", f"output_dir={tmp_path / 'x'}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 1 and "dataset not found" in bad.stderr


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_give_identical_features(dataset: Path, full_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "feats2"
    env = digiq_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "digiq", "cache-features", f"dataset={dataset}", f"output_dir={out}", "shard_rows=2"]
    cmd += ["device=cpu"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "rank 0/2" in res.stderr  # really two processes (only the main process logs)
    a, b = FeatureCache.open(out), FeatureCache.open(full_run)
    torch.testing.assert_close(a.state, b.state, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.actions, b.actions, atol=1e-5, rtol=0)


def test_decoding_in_dataloader_workers_gives_the_same_cache(
    dataset: Path, full_run: Path, tmp_path: Path
) -> None:
    """Screenshots read and decoded in 2 worker processes (the GPU default): the same features, bitwise."""
    cf.run(_cfg(dataset, tmp_path / "w", "num_workers=2"))
    a, b = FeatureCache.open(tmp_path / "w"), FeatureCache.open(full_run)
    assert torch.equal(a.state, b.state) and torch.equal(a.actions, b.actions)
    assert json.loads((tmp_path / "w" / "manifest.json").read_text())["model_dtype"] == "float32"  # auto, CPU


def test_a_broken_screenshot_decoded_in_a_worker_is_one_line(tmp_path: Path) -> None:
    from datasets import Image as HFImage

    ds = make_dataset(tmp_path / "ds")
    raw = load_dataset(ds).cast_column("screenshot", HFImage(decode=False)).to_dict()
    raw["screenshot"][3] = {"bytes": b"\x89PNG garbage", "path": None}
    features = FEATURES.copy()
    features["screenshot"] = HFImage(decode=False)
    broken = Dataset.from_dict(raw, features=features)
    save_dataset(broken.cast_column("screenshot", HFImage()), tmp_path / "bad")
    with pytest.raises(DataError) as err:
        cf.run(_cfg(tmp_path / "bad", tmp_path / "out", "num_workers=2"))
    msg = str(err.value)
    assert "\n" not in msg and "screenshot" in msg and "Traceback" not in msg, msg
