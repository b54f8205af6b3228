"""``digiq import``: official .pt files (both quirk variants) -> exactly the expected rows; named errors."""

from __future__ import annotations

import dataclasses
import fractions
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from killresume import digiq_env
from PIL import Image

from digiq.actions import Action, ActionType, make_observation
from digiq.data.importer import Config, load_pt, run
from digiq.data.schema import COLUMNS, discounted_returns, load_dataset
from digiq.errors import DataError

N_CAND = 3
D_FEAT = 6
D_STATE = 4


@dataclasses.dataclass
class TrueTraj:
    """The ground truth one trajectory encodes; both official variants are generated from it."""

    image_id: str
    task: str
    actions: list[str]
    candidates: list[list[str]]
    rewards: list[float]
    dones: list[bool]
    colors: list[tuple[int, int, int]]  # T + 1 screens
    feats: list[np.ndarray]  # (N, D) per step
    state: list[np.ndarray]  # (D_STATE,) per step


def _truth(
    seed: int = 0, lengths: tuple[int, ...] = (3, 2, 4), success: tuple[bool, ...] = (True, False, True)
):
    rng = np.random.default_rng(seed)
    trajs = []
    for i, (T, ok) in enumerate(zip(lengths, success)):
        acts = [
            Action.tap(0.1 * (t + 1), 0.5).render()
            if t % 2 == 0
            else Action.type_text(f'pizza, "near" me\n#{i}').render()
            for t in range(T)
        ]
        cands = [[a, Action.key(ActionType.PRESS_BACK).render(), Action.tap(0.9, 0.1).render()] for a in acts]
        rewards = [0.0] * T
        if ok:
            rewards[-1] = 1.0
        trajs.append(
            TrueTraj(
                image_id=f"1715155212.{i}",
                task=f"task number {i}",
                actions=acts,
                candidates=cands,
                rewards=rewards,
                dones=[t == T - 1 for t in range(T)],
                colors=[tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(T + 1)],
                feats=[rng.standard_normal((N_CAND, D_FEAT)).astype(np.float32) for _ in range(T)],
                state=[rng.standard_normal(D_STATE).astype(np.float32) for _ in range(T)],
            )
        )
    return trajs


def _write_pngs(truth: list[TrueTraj], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for tr in truth:
        for k, color in enumerate(tr.colors):
            Image.new("RGB", (12, 20), color).save(folder / f"{tr.image_id}_{k}.png")


def _observations(tr: TrueTraj) -> list[str]:
    from digiq.actions import parse_action

    return [
        make_observation(tr.task, parse_action(tr.actions[t - 1]) if t else None)
        for t in range(len(tr.actions))
    ]


def raw_variant(truth: list[TrueTraj]) -> list[list[dict]]:
    """A raw collection: image_path = NEXT screen under '<path_to_images>', joined action_list, list
    q_rep_out_list, 0-d numpy reward/done, no traj_id/step_id (released files, Digi-Q issue #14)."""
    out = []
    for tr in truth:
        obs = _observations(tr)
        steps = []
        for t in range(len(tr.actions)):
            steps.append(
                {
                    "observation": obs[t],
                    "next_observation": obs[t + 1] if t + 1 < len(obs) else "",
                    "image_features": tr.state[t],
                    # s_(t+1): the next step's image_features; after the last step a screen of its own
                    "next_image_features": tr.state[t + 1] if t + 1 < len(tr.state) else tr.state[t] + 1,
                    "image_path": f"<path_to_images>/images/test3/{tr.image_id}_{t + 1}.png",
                    "video_path": None,
                    "task": tr.task,
                    "reward": np.array(tr.rewards[t]),
                    "done": np.array(tr.dones[t]),
                    "action": tr.actions[t],
                    "trajectory_reward": np.int64(sum(tr.rewards)),
                    "mc_return": np.float64(123.0),  # stale: must be recomputed
                    "action_list": "<split>".join(tr.candidates[t]),
                    "q_rep_out": tr.feats[t][0],
                    "q_rep_out_list": [f for f in tr.feats[t]],
                    "q_response": "Yes",
                }
            )
        out.append(steps)
    return out


def post_variant(truth: list[TrueTraj], image_dir: str) -> list[list[dict]]:
    """After nv2v.py: image_path = current screen (relative), next_image_path, list action_list, array
    q_rep_out_list, python reward/done, traj_id/step_id present (steps stored out of order)."""
    out = []
    for i, tr in enumerate(truth):
        obs = _observations(tr)
        steps = []
        for t in range(len(tr.actions)):
            steps.append(
                {
                    "observation": obs[t],
                    "image_features": tr.state[t],
                    "image_path": f"{image_dir}/{tr.image_id}_{t}.png",
                    "next_image_path": f"{image_dir}/{tr.image_id}_{t + 1}.png",
                    "task": tr.task,
                    "reward": int(tr.rewards[t]),
                    "done": bool(tr.dones[t]),
                    "action": tr.actions[t],
                    "mc_return": 0.0,
                    "traj_id": 100 + i,
                    "step_id": t,
                    "action_list": list(tr.candidates[t]),
                    "q_rep_out": tr.feats[t][0],
                    "q_rep_out_list": tr.feats[t],
                }
            )
        out.append(steps[::-1])  # the official merge can reorder steps; step_id puts them back
    return out


def _pixels(img: Any) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


def _undecoded(ds):
    from datasets import Image as HFImage

    return ds.cast_column("screenshot", HFImage(decode=False))


def _check_rows(ds, truth: list[TrueTraj], traj_ids: list[int], gamma: float) -> None:
    assert list(ds.column_names) == list(COLUMNS) or set(ds.column_names) == set(COLUMNS)
    assert len(ds) == sum(len(t.actions) for t in truth)
    r = 0
    for tr, tid in zip(truth, traj_ids):
        mc = discounted_returns(tr.rewards, gamma)
        obs = _observations(tr)
        for t in range(len(tr.actions)):
            row = ds[r]
            assert row["traj_id"] == tid and row["step_id"] == t
            assert row["task"] == tr.task and row["observation"] == obs[t]
            assert row["action"] == tr.actions[t]
            assert row["candidates"] == tr.candidates[t]
            assert row["reward"] == tr.rewards[t] and row["done"] == tr.dones[t]
            assert row["mc_return"] == pytest.approx(float(mc[t]), abs=1e-6)
            assert row["state_key"] == ""
            cur, nxt = _pixels(row["screenshot"]), _pixels(row["next_screenshot"])
            assert cur.shape == (20, 12, 3)
            assert (cur == np.array(tr.colors[t], np.uint8)).all(), (tid, t)
            assert (nxt == np.array(tr.colors[t + 1], np.uint8)).all(), (tid, t)
            r += 1


@pytest.fixture()
def raw_setup(tmp_path: Path):
    truth = _truth()
    _write_pngs(truth, tmp_path / "released" / "images" / "test3")
    pt = tmp_path / "raw.pt"
    torch.save(raw_variant(truth), pt)
    return truth, pt, tmp_path / "released"


@pytest.fixture()
def post_setup(tmp_path: Path):
    truth = _truth(seed=1, lengths=(2, 5), success=(False, True))
    _write_pngs(truth, tmp_path / "pp" / "shots")
    pt = tmp_path / "pp" / "post.pt"
    torch.save(post_variant(truth, "shots"), pt)
    return truth, pt


def test_raw_collection_variant(raw_setup, tmp_path: Path, capsys) -> None:
    truth, pt, root = raw_setup
    out = tmp_path / "ds"
    summary = run(Config(inputs=(str(pt),), output=str(out), image_root=str(root), gamma=0.9))
    ds = load_dataset(out)
    _check_rows(ds, truth, [0, 1, 2], gamma=0.9)
    assert summary.trajectories == 3 and summary.steps == 9 and summary.traj_ids == "position"
    assert summary.success_rate == pytest.approx(2 / 3)
    assert summary.candidates_min == summary.candidates_max == N_CAND and summary.invalid_actions == 0
    printed = capsys.readouterr().out
    assert "3 trajectories, 9 steps" in printed and "0.667" in printed
    info = json.loads((out / "digiq_dataset.json").read_text())
    assert info["gamma"] == 0.9 and info["traj_id_source"] == "position"


def test_post_processed_variant(post_setup, tmp_path: Path) -> None:
    truth, pt = post_setup
    out = tmp_path / "ds"
    # relative paths resolve against the .pt file's folder when no image_root is given
    run(Config(inputs=(str(pt),), output=str(out)))
    _check_rows(load_dataset(out), truth, [100, 101], gamma=0.95)


def test_both_variants_agree_and_concatenate(raw_setup, post_setup, tmp_path: Path) -> None:
    """Two files import as one dataset; explicit image_path_mode equals auto."""
    truth_a, pt_a, root = raw_setup
    truth_b, pt_b = post_setup
    out = tmp_path / "both"
    # raw needs 'next'; auto picks it per trajectory, while the post-processed file gets 'current'
    run(Config(inputs=(str(pt_a), str(pt_b)), output=str(out), image_root=str(root)))
    ds = load_dataset(out)
    # the post-processed file's relative paths are not under image_root: found next to the .pt file
    _check_rows(ds, truth_a + truth_b, [0, 1, 2, 3, 4], gamma=0.95)


def test_explicit_modes(raw_setup, tmp_path: Path) -> None:
    truth, pt, root = raw_setup
    a, b = tmp_path / "a", tmp_path / "b"
    run(Config(inputs=(str(pt),), output=str(a), image_root=str(root), image_path_mode="next"))
    run(Config(inputs=(str(pt),), output=str(b), image_root=str(root), image_path_mode="auto"))
    da, db = load_dataset(a), load_dataset(b)
    for col in ("action", "reward", "candidates"):
        assert da[col] == db[col]
    # 'current' on a raw file cannot know the last step's next screen: a named error, not a silent shift
    with pytest.raises(DataError, match=r"trajectory 0, step 2, key 'next_image_path': missing on the last"):
        run(
            Config(
                inputs=(str(pt),), output=str(tmp_path / "c"), image_root=str(root), image_path_mode="current"
            )
        )
    # with next_image_path on every step, 'next' and 'current' really differ: 'next' ignores it
    data = raw_variant(truth)
    for traj in data:
        for step in traj:
            step["next_image_path"] = step["image_path"]
    pt2 = tmp_path / "with_next.pt"
    torch.save(data, pt2)
    d = tmp_path / "d"
    run(Config(inputs=(str(pt2),), output=str(d), image_root=str(root), image_path_mode="current"))
    row = load_dataset(d)[0]  # image_path taken as s_0 although it is s_1
    assert (_pixels(row["screenshot"]) == np.array(truth[0].colors[1], np.uint8)).all()
    e = tmp_path / "e"
    run(Config(inputs=(str(pt2),), output=str(e), image_root=str(root), image_path_mode="next"))
    _check_rows(load_dataset(e), truth, [0, 1, 2], gamma=0.95)


def test_absolute_author_paths_found_under_image_root(tmp_path: Path) -> None:
    truth = _truth(lengths=(2,), success=(True,))
    _write_pngs(truth, tmp_path / "unzipped" / "images" / "test3")
    data = raw_variant(truth)
    for step in data[0]:
        step["image_path"] = step["image_path"].replace("<path_to_images>", "/home/yifeizhou/logs")
    pt = tmp_path / "abs.pt"
    torch.save(data, pt)
    out = tmp_path / "ds"
    run(Config(inputs=(str(pt),), output=str(out), image_root=str(tmp_path / "unzipped")))
    _check_rows(load_dataset(out), truth, [0], gamma=0.95)


def test_numpy1_pickles_load(raw_setup, tmp_path: Path) -> None:
    """Files written under numpy 1.x name numpy.core.multiarray.*; the allow-list has those aliases."""
    truth, pt, root = raw_setup
    old = tmp_path / "np1.pt"
    with zipfile.ZipFile(pt) as zin, zipfile.ZipFile(old, "w", zipfile.ZIP_STORED) as zout:
        for name in zin.namelist():
            data = zin.read(name)
            if name.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            zout.writestr(name, data)
    loaded = load_pt(old)
    assert isinstance(loaded[0][0]["q_rep_out_list"][0], np.ndarray)
    out = tmp_path / "ds"
    run(Config(inputs=(str(old),), output=str(out), image_root=str(root)))
    _check_rows(load_dataset(out), truth, [0, 1, 2], gamma=0.95)


def test_disallowed_global_refused_without_trust(raw_setup, tmp_path: Path) -> None:
    truth, _pt, root = raw_setup
    data = raw_variant(truth)
    data[0][0]["extra"] = fractions.Fraction(1, 3)  # any non-allow-listed class
    pt = tmp_path / "pickled.pt"
    torch.save(data, pt)
    out = tmp_path / "ds"
    with pytest.raises(DataError, match=r"pickled\.pt.*fractions\.Fraction.*trust_pickle=true"):
        run(Config(inputs=(str(pt),), output=str(out), image_root=str(root)))
    assert not out.exists()
    run(Config(inputs=(str(pt),), output=str(out), image_root=str(root), trust_pickle=True))
    _check_rows(load_dataset(out), truth, [0, 1, 2], gamma=0.95)


# -- corrupted inputs ------------------------------------------------------------------------------


def _mutate(name: str, data: list, root: Path, truth: list[TrueTraj]):
    """Apply one corruption; returns the config override dict (if any)."""
    step = data[1][1]
    if name == "missing key":
        del step["action"]
    elif name == "wrong type":
        step["action"] = 5
    elif name == "nan reward":
        step["reward"] = np.array(float("nan"))
    elif name == "array reward":
        step["reward"] = np.zeros(2)
    elif name == "bad done":
        step["done"] = 2
    elif name == "string reward":
        step["reward"] = "1"
    elif name == "empty trajectory":
        data[1] = []
    elif name == "trajectory not a list":
        data[1] = {"steps": []}
    elif name == "step not a dict":
        data[1][1] = "step"
    elif name == "missing image":
        (root / "images" / "test3" / f"{truth[1].image_id}_2.png").unlink()
    elif name == "truncated image":
        p = root / "images" / "test3" / f"{truth[1].image_id}_2.png"
        p.write_bytes(p.read_bytes()[:-30])
    elif name == "garbage image":
        (root / "images" / "test3" / f"{truth[1].image_id}_2.png").write_bytes(b"\x89PNG\r\n\x1a\nnot a png")
    elif name == "action_list not first":
        step["action_list"] = "<split>".join(reversed(step["action_list"].split("<split>")))
    elif name == "action_list wrong type":
        step["action_list"] = 7
    elif name == "double-joined action_list":
        step["action_list"] = "<split>".join(step["action_list"])
    elif name == "image_path not a string":
        step["image_path"] = None
    elif name == "bad step_id":
        for t, s in enumerate(data[1]):
            s["step_id"] = t + 5
    elif name == "feature count":
        step["q_rep_out_list"] = step["q_rep_out_list"][:2]
        return {"features_output": "feats"}
    elif name == "feature nan":
        step["q_rep_out_list"] = [np.full(D_FEAT, np.nan, np.float32)] * N_CAND
        return {"features_output": "feats"}
    elif name == "no image_root":
        return {"image_root": ""}
    else:
        raise AssertionError(name)
    return {}


CORRUPTIONS = {
    # name: regex the DataError message must match (file, trajectory and step are checked separately)
    "missing key": r"step 1, key 'action': missing",
    "wrong type": r"step 1, key 'action': expected a string, got int",
    "nan reward": r"step 1, key 'reward': non-finite reward nan",
    "array reward": r"step 1, key 'reward': expected a scalar",
    "bad done": r"step 1, key 'done': expected a bool",
    "string reward": r"step 1, key 'reward': expected a number, got str",
    "empty trajectory": r"trajectory 1: empty trajectory",
    "trajectory not a list": r"trajectory 1: expected a list of step dicts, got dict",
    "step not a dict": r"step 1: expected a step dict, got str",
    "missing image": r"step 1: image '<path_to_images>/images/test3/1715155212.1_2.png' not found",
    "truncated image": r"step 1: image '<path_to_images>/images/test3/1715155212.1_2.png' .* does not decode",
    "garbage image": r"step 1: image .*1715155212.1_2.png.* does not decode",
    "action_list not first": r"step 1, key 'action_list': item 0 must be the dataset action",
    "action_list wrong type": r"step 1, key 'action_list': expected a list",
    "double-joined action_list": r"step 1, key 'action_list': looks joined twice",
    "image_path not a string": r"step 1, key 'image_path': expected a path string",
    "bad step_id": r"trajectory 1: step_id values \[5, 6\] are not 0..1",
    "feature count": r"step 1, key 'q_rep_out_list': 2 features for 3 candidate",
    "feature nan": r"step 1, key 'q_rep_out_list': holds NaN",
    "no image_root": r"trajectory 0, step 0: image path .* placeholder <path_to_images>; set image_root",
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corrupted_inputs_name_the_place(name: str, raw_setup, tmp_path: Path) -> None:
    truth, _pt, root = raw_setup
    data = raw_variant(truth)
    extra = _mutate(name, data, root, truth)
    if "features_output" in extra:
        extra["features_output"] = str(tmp_path / extra["features_output"])
    pt = tmp_path / "bad.pt"
    torch.save(data, pt)
    cfg = Config(inputs=(str(pt),), output=str(tmp_path / "out"), image_root=str(root))
    cfg = dataclasses.replace(cfg, **extra)
    with pytest.raises(DataError, match=CORRUPTIONS[name]) as err:
        run(cfg)
    msg = str(err.value)
    assert str(pt) in msg
    if name not in ("no image_root",):
        assert "trajectory 1" in msg
    assert not (tmp_path / "out").exists() and not (tmp_path / "feats").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")], "scratch left behind"


@pytest.mark.parametrize(
    "name, payload, message",
    [
        ("empty file", b"", r"empty file\.pt: the file is empty"),
        ("not torch", b"hello world, not a zip", r"not torch\.pt: not a readable torch file"),
        ("not a list", {"trajectories": []}, r"not a list\.pt: expected a list of trajectories, got dict"),
        ("empty list", [], r"empty list\.pt: holds no trajectories"),
    ],
)
def test_bad_files(name: str, payload: Any, message: str, tmp_path: Path) -> None:
    pt = tmp_path / f"{name}.pt"
    if isinstance(payload, bytes):
        pt.write_bytes(payload)
    else:
        torch.save(payload, pt)
    with pytest.raises(DataError, match=message):
        run(Config(inputs=(str(pt),), output=str(tmp_path / "out")))
    with pytest.raises(DataError, match="no such file"):
        run(Config(inputs=(str(tmp_path / "missing.pt"),), output=str(tmp_path / "out")))


def test_failed_import_keeps_existing_output(raw_setup, tmp_path: Path) -> None:
    truth, pt, root = raw_setup
    out = tmp_path / "ds"
    run(Config(inputs=(str(pt),), output=str(out), image_root=str(root)))
    before = _undecoded(load_dataset(out))[:]
    # without overwrite: refused before any work
    with pytest.raises(FileExistsError, match="overwrite=true"):
        run(Config(inputs=(str(pt),), output=str(out), image_root=str(root)))
    # with overwrite but a bad input (an image that fails late, after rows were written): untouched
    (root / "images" / "test3" / f"{truth[2].image_id}_4.png").write_bytes(b"broken")
    with pytest.raises(DataError, match="does not decode"):
        run(Config(inputs=(str(pt),), output=str(out), image_root=str(root), overwrite=True))
    after = _undecoded(load_dataset(out))[:]
    assert after["action"] == before["action"] and after["traj_id"] == before["traj_id"]
    assert [r["bytes"] for r in after["screenshot"]] == [r["bytes"] for r in before["screenshot"]]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# -- feature cache ---------------------------------------------------------------------------------


def _read_cache(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    manifest = json.loads((path / "manifest.json").read_text())
    parts = [load_file(path / s["file"]) for s in manifest["shards"]]
    tensors = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return manifest, tensors


def test_features_output(raw_setup, tmp_path: Path) -> None:
    truth, pt, root = raw_setup
    out, feats = tmp_path / "ds", tmp_path / "feats"
    run(
        Config(
            inputs=(str(pt),),
            output=str(out),
            image_root=str(root),
            features_output=str(feats),
            features_shard_rows=4,
        )
    )
    assert (feats / "_COMPLETE").is_file()
    manifest, t = _read_cache(feats)
    assert manifest["format"] == "digiq-features-v1" and manifest["num_rows"] == 9
    assert manifest["num_candidates"] == N_CAND and manifest["action_dim"] == D_FEAT
    assert manifest["state_dim"] == D_STATE and manifest["dtype"] == "float32"
    assert manifest["rendering"] == "imported" and "image_features" in manifest["state_features"]
    assert [(s["start"], s["end"]) for s in manifest["shards"]] == [(0, 4), (4, 8), (8, 9)]
    assert manifest["dataset_fingerprint"] == load_dataset(out)._fingerprint
    expected_actions = np.stack([f for tr in truth for f in tr.feats])
    expected_state = np.stack([s for tr in truth for s in tr.state])
    np.testing.assert_array_equal(t["actions"].numpy(), expected_actions)
    np.testing.assert_array_equal(t["state"].numpy(), expected_state)
    assert "valid" not in t


def test_features_padding_and_no_state(post_setup, tmp_path: Path) -> None:
    """Steps with fewer candidates are zero-padded and masked; no image_features -> zero state of dim 1."""
    truth, _pt = post_setup
    data = post_variant(truth, "shots")
    for traj in data:
        for step in traj:
            del step["image_features"]
    short = data[1][0]  # stored reversed: this is step 4 of trajectory 1
    short["action_list"] = short["action_list"][:2]
    short["q_rep_out_list"] = short["q_rep_out_list"][:2]
    pt = _pt.parent / "padded.pt"
    torch.save(data, pt)
    feats = tmp_path / "feats"
    run(
        Config(
            inputs=(str(pt),),
            output=str(tmp_path / "ds"),
            features_output=str(feats),
            features_dtype="bfloat16",
        )
    )
    manifest, t = _read_cache(feats)
    assert manifest["state_dim"] == 1 and "zeros" in manifest["state_features"]
    assert t["state"].shape == (7, 1) and not t["state"].float().any()
    assert t["actions"].dtype == torch.bfloat16 and t["actions"].shape == (7, N_CAND, D_FEAT)
    row = 2 + 4  # trajectory 0 has 2 steps; the short one is step 4 of trajectory 1
    assert t["valid"].sum() == 7 * N_CAND - 1 and not t["valid"][row, 2] and t["valid"][row, :2].all()
    assert not t["actions"][row, 2].float().any()
    np.testing.assert_allclose(
        t["actions"][row, :2].float().numpy(), truth[1].feats[4][:2], rtol=1e-2, atol=1e-2
    )
    assert load_dataset(tmp_path / "ds")[row]["candidates"] == truth[1].candidates[4][:2]


def test_cli_import(raw_setup, tmp_path: Path, capsys) -> None:
    from digiq.cli import main

    truth, pt, root = raw_setup
    out = tmp_path / "cli"
    assert main(["import", str(pt), f"output={out}", f"image_root={root}", "gamma=0.5"]) == 0
    assert "3 trajectories, 9 steps" in capsys.readouterr().out
    _check_rows(load_dataset(out), truth, [0, 1, 2], gamma=0.5)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"")
    assert main(["import", str(bad), f"output={tmp_path / 'x'}"]) == 1
    err = capsys.readouterr().err
    assert "digiq import: error:" in err and "bad.pt: the file is empty" in err and len(err.splitlines()) == 1
    assert main(["import", f"output={tmp_path / 'x'}"]) == 2  # no inputs: config error


def test_torch_tensor_fields_and_max_trajectories(raw_setup, post_setup, tmp_path: Path) -> None:
    """Tensors instead of numpy arrays load under weights_only; max_trajectories spans files."""
    truth, _pt, root = raw_setup
    data = raw_variant(truth)
    for traj in data:
        for step in traj:
            step["reward"] = torch.tensor(float(step["reward"]))
            step["done"] = torch.tensor(bool(step["done"]))
            step["q_rep_out_list"] = torch.from_numpy(np.stack(step["q_rep_out_list"]))
    pt = tmp_path / "tensors.pt"
    torch.save(data, pt)
    truth_b, pt_b = post_setup
    out, feats = tmp_path / "ds", tmp_path / "feats"
    summary = run(
        Config(
            inputs=(str(pt), str(pt_b)),
            output=str(out),
            image_root=str(root),
            max_trajectories=4,
            features_output=str(feats),
        )
    )
    assert summary.trajectories == 4
    # official traj_ids exist only in the second file: all are numbered by position
    _check_rows(load_dataset(out), truth + truth_b[:1], [0, 1, 2, 3], gamma=0.95)
    _manifest, t = _read_cache(feats)
    expected = np.stack([f for tr in truth + truth_b[:1] for f in tr.feats])
    np.testing.assert_array_equal(t["actions"].numpy(), expected)


@pytest.mark.slow
def test_cli_subprocess_refuses_pickle(raw_setup, tmp_path: Path) -> None:
    """The real command line: a blocked pickle is one error line naming trust_pickle, exit code 1."""
    import subprocess
    import sys

    truth, _pt, root = raw_setup
    data = raw_variant(truth)
    data[2][0]["extra"] = fractions.Fraction(2, 3)
    pt = tmp_path / "evil.pt"
    torch.save(data, pt)
    repo = Path(__file__).resolve().parents[1]
    env = digiq_env()
    cmd = [sys.executable, "-m", "digiq", "import", str(pt), f"output={tmp_path / 'o'}", f"image_root={root}"]
    res = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("digiq import: error:") and "trust_pickle=true" in last and "evil.pt" in last
    ok = subprocess.run(
        cmd + ["trust_pickle=true"], cwd=repo, env=env, capture_output=True, text=True, timeout=120
    )
    assert ok.returncode == 0, ok.stderr
    assert "imported 3 trajectories, 9 steps" in ok.stdout


def test_cli_several_files_as_arguments(raw_setup, post_setup, tmp_path: Path, capsys) -> None:
    """`digiq import a.pt b.pt ...`: every bare word is an input file, concatenated in order."""
    from digiq.cli import main

    truth_a, pt_a, root = raw_setup
    truth_b, pt_b = post_setup
    out = tmp_path / "cli2"
    assert main(["import", str(pt_a), str(pt_b), f"output={out}", f"image_root={root}"]) == 0
    assert "5 trajectories, 16 steps" in capsys.readouterr().out
    _check_rows(load_dataset(out), truth_a + truth_b, [0, 1, 2, 3, 4], gamma=0.95)
    info = json.loads((out / "digiq_dataset.json").read_text())
    assert info["inputs"] == [str(pt_a), str(pt_b)]


class _RunsCode:
    """A pickle payload that would run a shell command when unpickled with full pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_names_global_and_file(raw_setup, tmp_path: Path, capsys) -> None:
    """A pickle calling os.system is refused in one line naming the global (posix.system) and the file."""
    from digiq.cli import main

    truth, _pt, root = raw_setup
    data = raw_variant(truth)
    marker = tmp_path / "pwned"
    data[1][0]["extra"] = _RunsCode(marker)
    data[2][0]["extra2"] = fractions.Fraction(1, 3)
    pt = tmp_path / "evil file.pt"
    torch.save(data, pt)
    assert main(["import", str(pt), f"output={tmp_path / 'o'}", f"image_root={root}"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    import os

    system = f"{os.system.__module__}.system"  # posix.system on Linux
    assert f"{pt}: refused to unpickle fractions.Fraction, {system}:" in err, err
    assert "trust_pickle=true" in err
    assert not marker.exists() and not (tmp_path / "o").exists()


# -- pickle protocols ------------------------------------------------------------------------------


class _Eval:
    def __reduce__(self):
        import builtins

        return (builtins.eval, ("1 + 1",))


class _Popen:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import subprocess

        return (subprocess.Popen, (["touch", str(self.marker)],))


@pytest.mark.parametrize("protocol", [2, 4])
def test_refusal_names_the_globals_in_every_protocol(protocol: int, raw_setup, tmp_path: Path) -> None:
    """Protocol 4 names globals with STACK_GLOBAL (protocol 2 with GLOBAL, and Python 2 module names:
    subprocess is stored as 'commands'): the message names module.global the same way in both."""
    truth, _pt, root = raw_setup
    data = raw_variant(truth)
    marker = tmp_path / "pwned"
    data[0][0]["extra"] = _Eval()
    data[1][1]["extra"] = _Popen(marker)
    pt = tmp_path / f"evil{protocol}.pt"
    torch.save(data, pt, pickle_protocol=protocol)
    with pytest.raises(DataError) as err:
        run(Config(inputs=(str(pt),), output=str(tmp_path / "o"), image_root=str(root)))
    assert f"{pt}: refused to unpickle builtins.eval, subprocess.Popen: " in str(err.value)
    assert "trust_pickle=true" in str(err.value)
    assert not marker.exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_harmless_pickle_loads_in_every_protocol(protocol: int, raw_setup, tmp_path: Path) -> None:
    """Only lists, dicts, strings, numbers, numpy arrays and tensors: loads whatever the protocol."""
    truth, _pt, root = raw_setup
    data = raw_variant(truth)
    data[0][1]["q_rep_out_list"] = torch.from_numpy(np.stack(data[0][1]["q_rep_out_list"]))
    data[0][1]["extra"] = {"set": {1, 2}, "tuple": (1, 2.5), "bytes": b"x", "none": None}
    pt = tmp_path / f"p{protocol}.pt"
    torch.save(data, pt, pickle_protocol=protocol)
    out, feats = tmp_path / "ds", tmp_path / "feats"
    run(Config(inputs=(str(pt),), output=str(out), image_root=str(root), features_output=str(feats)))
    _check_rows(load_dataset(out), truth, [0, 1, 2], gamma=0.95)
    _manifest, t = _read_cache(feats)
    np.testing.assert_array_equal(t["actions"].numpy(), np.stack([f for tr in truth for f in tr.feats]))


# -- feature widths --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, message",
    [
        ("q_rep_out_list", "trajectory 2, step 1, key 'q_rep_out_list': feature width 8, but {pt}, trajectory 0, "
                           "step 0 has width 6"),
        ("image_features", "trajectory 2, step 1, key 'image_features': width 5, but {pt}, trajectory 0, "
                           "step 0 has width 4"),
        ("no image_features", "trajectory 2, step 1, key 'image_features': missing, but {pt}, trajectory 0, "
                              "step 0 has it"),
    ],
)  # fmt: skip
def test_width_errors_name_the_file_trajectory_and_step(
    key: str, message: str, raw_setup, tmp_path: Path
) -> None:
    truth, _pt, root = raw_setup
    data = raw_variant(truth)
    step = data[2][1]
    if key == "q_rep_out_list":
        step[key] = [np.zeros(D_FEAT + 2, np.float32)] * N_CAND
    elif key == "image_features":
        step[key] = np.zeros(D_STATE + 1, np.float32)
    else:
        del step["image_features"]
    pt = tmp_path / "bad_width.pt"
    torch.save(data, pt)
    cfg = Config(inputs=(str(pt),), output=str(tmp_path / "o"), image_root=str(root),
                 features_output=str(tmp_path / "f"))  # fmt: skip
    with pytest.raises(DataError) as err:
        run(cfg)
    msg = str(err.value)
    assert msg.startswith(f"{pt}, {message.format(pt=pt)}"), msg
    assert "['" not in msg
    assert not (tmp_path / "o").exists() and not (tmp_path / "f").exists()


# -- s' from the step's own next_* fields ----------------------------------------------------------


def _next_fields_file(folder: Path, truth: list[TrueTraj]) -> list[list[dict]]:
    """A post-processed file (steps in order) whose trajectory 0, step 0 has next_* fields that disagree
    with step 1's current fields, and whose trajectory 1 is cut short (last step not done)."""
    data = [sorted(traj, key=lambda s: s["step_id"]) for traj in post_variant(truth, "shots")]
    Image.new("RGB", (12, 20), (1, 2, 3)).save(folder / "shots" / "elsewhere.png")
    own = data[0][0]
    own["next_image_path"] = "shots/elsewhere.png"
    own["next_image_features"] = np.full(D_STATE, 7.0, np.float32)
    own["next_observation"] = make_observation(truth[0].task, None) + " (the record's own s')"
    data[0][1]["next_observation"] = data[0][2]["observation"]  # agrees: not a mismatch
    cut = data[1][-1]
    cut["done"] = False
    cut["next_image_features"] = np.full(D_STATE, 9.0, np.float32)
    return data


def test_next_fields_are_s_prime(tmp_path: Path, capsys, caplog) -> None:
    """The official trainer reads each step's own next_observation / next_image_features for V(s')
    (trainer.py:149; [cur, next] frame stacking): the import keeps them as s' (next_screenshot, the cache's
    next_state), falls back to the next step only where they are absent, and says where they disagree."""
    import logging

    truth = _truth(seed=3, lengths=(3, 2), success=(True, False))
    _write_pngs(truth, tmp_path / "shots")
    data = _next_fields_file(tmp_path, truth)
    pt = tmp_path / "next.pt"
    torch.save(data, pt)
    logging.getLogger("digiq").addHandler(caplog.handler)
    try:
        summary = run(
            Config(inputs=(str(pt),), output=str(tmp_path / "ds"), features_output=str(tmp_path / "f"))
        )
    finally:
        logging.getLogger("digiq").removeHandler(caplog.handler)
    ds = load_dataset(tmp_path / "ds")
    # s' of trajectory 0, step 0 is its own next_image_path, not step 1's screenshot
    assert (_pixels(ds[0]["next_screenshot"]) == np.array((1, 2, 3), np.uint8)).all()
    assert (_pixels(ds[1]["screenshot"]) == np.array(truth[0].colors[1], np.uint8)).all()
    manifest, t = _read_cache(tmp_path / "f")
    nxt = t["next_state"].numpy()
    np.testing.assert_array_equal(nxt[0], np.full(D_STATE, 7.0))  # own next_image_features
    np.testing.assert_array_equal(nxt[1], truth[0].state[2])  # absent: the next step's image_features
    np.testing.assert_array_equal(nxt[4], np.full(D_STATE, 9.0))  # the cut trajectory's last step: its own
    np.testing.assert_array_equal(nxt[3], truth[1].state[1])
    # trajectory 0 ends done with no next_image_features: nothing says what s' is (masked by done anyway)
    assert manifest["next_state_unknown_rows"] == [2] and not nxt[2].any()
    assert (
        not ds[4]["done"]
        and (_pixels(ds[4]["next_screenshot"]) == np.array(truth[1].colors[2], np.uint8)).all()
    )
    assert summary.next_mismatches == 1 and summary.truncated == 1
    out = capsys.readouterr().out
    assert "cut short; their last step is terminal in train-critic): 1" in out
    assert "differ from the following step: 1" in out
    logged = caplog.text
    assert f"first: {pt}, trajectory 0, step 0" in logged and f"{pt}, trajectory 1, step 1" in logged

    # the cut step without next_image_features: explicit, listed, and the trajectory named
    del data[1][-1]["next_image_features"]
    torch.save(data, pt)
    caplog.clear()
    logging.getLogger("digiq").addHandler(caplog.handler)
    try:
        run(Config(inputs=(str(pt),), output=str(tmp_path / "ds2"), features_output=str(tmp_path / "f2")))
    finally:
        logging.getLogger("digiq").removeHandler(caplog.handler)
    manifest, t = _read_cache(tmp_path / "f2")
    assert manifest["next_state_unknown_rows"] == [2, 4] and not t["next_state"][4].any()
    assert f"no next_image_features either ({pt}, trajectory 1, step 1)" in caplog.text
