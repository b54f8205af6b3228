"""Broken inputs through the real CLI: a clear one-line error naming what and where, a non-zero exit code,
and the user's existing outputs untouched (hashed before and after). Table-driven; docs/reliability.md
lists the same cases.

Most cases call ``digiq.cli.main([...])`` in-process (an escaping exception fails the test: that is the
raw-traceback case); the exit-code/traceback contract of the real process is checked in a subprocess for
config errors and the offline unknown-model case.
"""

from __future__ import annotations

import dataclasses
import io
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from datasets import Image as HFImage
from killresume import run_digiq, tree_state
from PIL import Image

from digiq.cli import main
from digiq.data.features import write_cache
from digiq.data.schema import FEATURES, load_dataset, save_dataset
from digiq.utils.io import COMPLETE_MARKER, is_complete

D = 8
N = 3
CRITIC = ["gamma=0.9", "batch_size=8", "steps_per_epoch=2", "epochs=1", "critic.q_hidden=[8]",
          "critic.v_hidden=[8]", "q_star=skip", "wandb.mode=disabled", "device=cpu"]  # fmt: skip
CACHE = ["shard_rows=64", "device=cpu", "batch_size=8"]
BC = ["train.batch_size=2", "train.max_steps=1", "trajectories=all", "wandb.mode=disabled"]
VLM = ["epochs=1", "batch_size=4", "wandb.mode=disabled"]


@dataclasses.dataclass
class World:
    root: Path
    good: Path  # a finished simulated dataset (N=3 candidates)
    feats: Path  # a finished feature cache for it (random features, width D)
    critic_run: Path  # a finished train-critic run on them
    rows: dict  # the good dataset's columns, images undecoded ({"bytes", "path"})
    _policy: Path | None = None

    def policy(self) -> Path:
        """A tiny BC policy (1 step of train-bc), trained on first use: the policy stages need one."""
        if self._policy is None:
            out = self.root / "bc"
            argv = ["train-bc", f"dataset={self.good}", f"output_dir={out}", "max_rows=4", *BC]
            assert main(argv) == 0
            self._policy = out / "policy"
        return self._policy


def _raw_rows(path: Path) -> dict:
    ds = load_dataset(path)
    for c in ("screenshot", "next_screenshot"):
        ds = ds.cast_column(c, HFImage(decode=False))
    return ds.to_dict()


def _features_for(ds_path: Path, out: Path, dim: int = D, n: int = N, poison: float | None = None) -> Path:
    ds = load_dataset(ds_path)
    g = torch.Generator().manual_seed(0)
    state, actions = torch.randn(len(ds), dim, generator=g), torch.randn(len(ds), n, dim, generator=g)
    if poison is not None:
        actions[5, 1, 2] = poison
    meta = {"dataset": str(ds_path), "dataset_fingerprint": ds._fingerprint, "model": "random", "layer": 0,
            "rendering": "text"}  # fmt: skip
    write_cache(out, state, actions, meta=meta, shard_rows=16)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("world")
    good = root / "good"
    args = ["sim", "collect", f"output_dir={good}", "num_trajectories=4", f"num_candidates={N}", "seed=3",
            "sim.width=90", "sim.height=160"]  # fmt: skip
    assert main(args) == 0
    feats = _features_for(good, root / "feats")
    run = root / "critic_run"
    assert main(["train-critic", f"dataset={good}", f"features={feats}", f"output_dir={run}", *CRITIC]) == 0
    return World(root, good, feats, run, _raw_rows(good))


def variant(w: World, out: Path, edit: Callable[[dict], dict], features=FEATURES) -> Path:
    """Write a copy of the good dataset with ``edit`` applied to its columns (a finished dataset)."""
    rows = edit({k: list(v) for k, v in w.rows.items()})
    feats = features.copy()
    for c in ("screenshot", "next_screenshot"):
        if c in feats:
            feats[c] = HFImage(decode=False)
    feats = {k: v for k, v in feats.items() if k in rows}
    from datasets import Features

    ds = Dataset.from_dict(rows, features=Features(feats))
    for c in ("screenshot", "next_screenshot"):
        if c in rows:
            ds = ds.cast_column(c, HFImage())
    save_dataset(ds, out)
    return out


def _set(col: str, row: int, value) -> Callable[[dict], dict]:
    def edit(rows: dict) -> dict:
        rows[col][row] = value
        return rows

    return edit


def _png(color=(10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (90, 160), color).save(buf, format="PNG")
    return buf.getvalue()


# ---- the cases ------------------------------------------------------------------------------------
# Each builder returns (argv, protected folder or None). Row 9 of the good dataset is trajectory 1/2 ...;
# the expected messages name the trajectory/step computed from the dataset itself.


def _loc(w: World, row: int) -> str:
    return f"trajectory {w.rows['traj_id'][row]}, step {w.rows['step_id'][row]}"


def corrupt_screenshot(w: World, t: Path):
    ds = variant(w, t / "ds", _set("screenshot", 9, {"bytes": b"\x89PNG garbage", "path": None}))
    return (
        ["cache-features", f"dataset={ds}", f"output_dir={t / 'out'}", *CACHE],
        None,
        [_loc(w, 9), "screenshot"],
    )


def truncated_screenshot(w: World, t: Path):
    cut = _png()[:200]  # a real PNG header, the pixel data cut off (as after a killed copy)
    ds = variant(w, t / "ds", _set("screenshot", 9, {"bytes": cut, "path": None}))
    return (
        ["cache-features", f"dataset={ds}", f"output_dir={t / 'out'}", *CACHE],
        None,
        [_loc(w, 9), "decode"],
    )


def truncated_screenshot_report(w: World, t: Path):
    ds = variant(w, t / "ds", _set("screenshot", 2, {"bytes": _png()[:200], "path": None}))
    return ["report", f"dataset={ds}", f"output_dir={t / 'out'}"], None, [_loc(w, 2), "screenshot"]


def missing_image(w: World, t: Path):
    ds = variant(w, t / "ds", _set("screenshot", 9, None))
    return (
        ["cache-features", f"dataset={ds}", f"output_dir={t / 'out'}", *CACHE],
        None,
        [_loc(w, 9), "missing"],
    )


def missing_column(w: World, t: Path):
    ds = variant(w, t / "ds", lambda r: {k: v for k, v in r.items() if k != "reward"})
    return (
        ["train-critic", f"dataset={ds}", f"features={w.feats}", f"output_dir={t / 'out'}", *CRITIC],
        None,
        [
            "missing column",
            "reward",
        ],
    )


def wrong_dtype(w: World, t: Path):
    def edit(rows):
        rows["reward"] = [str(x) for x in rows["reward"]]
        return rows

    from datasets import Value

    feats = FEATURES.copy()
    feats["reward"] = Value("string")
    ds = variant(w, t / "ds", edit, feats)
    return (
        ["train-critic", f"dataset={ds}", f"features={w.feats}", f"output_dir={t / 'out'}", *CRITIC],
        None,
        ["reward is string, expected float"],
    )


def nan_reward(w: World, t: Path):
    ds = variant(w, t / "ds", _set("reward", 9, float("nan")))
    return (
        ["train-critic", f"dataset={ds}", f"features={w.feats}", f"output_dir={t / 'out'}", *CRITIC],
        None,
        [
            _loc(w, 9),
            "reward is nan",
        ],
    )


def inf_reward(w: World, t: Path):
    ds = variant(w, t / "ds", _set("reward", 9, float("inf")))
    return ["report", f"dataset={ds}", f"output_dir={t / 'out'}"], None, [_loc(w, 9), "reward is inf"]


def nan_features(w: World, t: Path):
    f = _features_for(w.good, t / "f", poison=float("nan"))
    return (
        ["train-critic", f"dataset={w.good}", f"features={f}", f"output_dir={t / 'out'}", *CRITIC],
        None,
        [
            "shard-00000",
            "row 5",
        ],
    )


def inf_features(w: World, t: Path):
    f = _features_for(w.good, t / "f", poison=float("inf"))
    return (
        ["train-critic", f"dataset={w.good}", f"features={f}", f"output_dir={t / 'out'}", *CRITIC],
        None,
        [
            "shard-00000",
            "row 5",
        ],
    )


def corrupt_feature_shard(w: World, t: Path):
    f = t / "f"
    shutil.copytree(w.feats, f)
    (f / "shard-00001.safetensors").write_bytes(b"\x00" * 100)
    return (
        ["train-critic", f"dataset={w.good}", f"features={f}", f"output_dir={t / 'out'}", *CRITIC],
        None,
        [
            "shard-00001",
            "not a readable safetensors",
        ],
    )


def incomplete_feature_cache(w: World, t: Path):
    f = t / "f"
    shutil.copytree(w.feats, f)
    (f / COMPLETE_MARKER).unlink()
    return (
        ["train-critic", f"dataset={w.good}", f"features={f}", f"output_dir={t / 'out'}", *CRITIC],
        None,
        [
            str(f),
            "incomplete",
        ],
    )


def dim_mismatch_resume(w: World, t: Path):
    run = t / "run"
    shutil.copytree(w.critic_run, run)
    f = _features_for(w.good, t / "f", dim=D + 4)
    argv = ["train-critic", f"dataset={w.good}", f"features={f}", f"output_dir={run}", *CRITIC, "epochs=2"]
    return [*argv, "--resume"], run, ["state 12", "state 8", "checkpoint"]


def dim_mismatch_report(w: World, t: Path):
    f = _features_for(w.good, t / "f", dim=D + 4)
    argv = [
        "report",
        f"dataset={w.good}",
        f"features={f}",
        f"critic_dir={w.critic_run}",
        f"output_dir={t / 'o'}",
    ]
    return argv, None, ["do not match the critic", "state 12"]


def n_mismatch_critic(w: World, t: Path):
    f = _features_for(w.good, t / "f", n=N - 1)
    return (
        ["train-critic", f"dataset={w.good}", f"features={f}", f"output_dir={t / 'out'}", *CRITIC],
        None,
        [
            _loc(w, 0),
            "N=2",
        ],
    )


def n_mismatch_report(w: World, t: Path):
    f = _features_for(w.good, t / "f", n=N + 1)
    argv = [
        "report",
        f"dataset={w.good}",
        f"features={f}",
        f"critic_dir={w.critic_run}",
        f"output_dir={t / 'o'}",
    ]
    return argv, None, ["N=4"]


def other_dataset_features(w: World, t: Path):
    """Same length, other rows: only the fingerprint tells them apart."""
    ds = variant(w, t / "ds", _set("task", 0, "a different goal"))
    return (
        ["train-critic", f"dataset={ds}", f"features={w.feats}", f"output_dir={t / 'out'}", *CRITIC],
        None,
        ["fingerprint"],
    )


def empty_dataset(w: World, t: Path):
    ds = variant(w, t / "ds", lambda r: {k: [] for k in r})
    return (
        ["train-critic", f"dataset={ds}", f"features={w.feats}", f"output_dir={t / 'out'}", *CRITIC],
        None,
        ["empty"],
    )


def not_a_dataset(w: World, t: Path):
    (t / "ds").mkdir()
    (t / "ds" / "notes.txt").write_text("hello")
    return (
        ["cache-features", f"dataset={t / 'ds'}", f"output_dir={t / 'out'}", *CACHE],
        t / "ds",
        [
            str(t / "ds"),
            "incomplete",
        ],
    )


def exists_sim_collect(w: World, t: Path):
    out = t / "ds"
    shutil.copytree(w.good, out)
    return (
        ["sim", "collect", f"output_dir={out}", "num_trajectories=2", "overwrite=false"],
        out,
        [
            str(out),
            "already holds a finished collect run",
        ],
    )


def exists_cache_features(w: World, t: Path):
    out = t / "f"
    shutil.copytree(w.feats, out)
    return (
        ["cache-features", f"dataset={w.good}", f"output_dir={out}", *CACHE],
        out,
        [
            str(out),
            "already holds a finished output",
        ],
    )


def exists_train_critic(w: World, t: Path):
    run = t / "run"
    shutil.copytree(w.critic_run, run)
    argv = ["train-critic", f"dataset={w.good}", f"features={w.feats}", f"output_dir={run}", *CRITIC]
    return argv, run, [str(run), "--resume"]


def exists_train_bc(w: World, t: Path):
    run = t / "run"
    shutil.copytree(w.policy().parent, run)
    argv = ["train-bc", f"dataset={w.good}", f"output_dir={run}", "max_rows=4", *BC]
    return argv, run, [str(run), "finished train-bc run", "overwrite=true"]


def exists_extract_policy(w: World, t: Path):
    run = t / "run"
    argv = ["extract-policy", f"dataset={w.good}", f"init_policy={w.policy()}", f"output_dir={run}",
            "scorer=q_star", "threshold=-1", *EXTRACT]  # fmt: skip
    assert main(argv) == 0
    return argv, run, [str(run), "finished extract-policy run", "overwrite=true"]


def other_dataset_features_evaluate(w: World, t: Path):
    """evaluate checks the cache against the dataset as train-critic does: same length is not enough."""
    ds = variant(w, t / "ds", _set("task", 0, "a different goal"))
    argv = ["evaluate", "mode=offline", f"dataset={ds}", f"policy={w.policy()}", f"output_dir={t / 'out'}",
            f"features={w.feats}", f"critic_dir={w.critic_run}"]  # fmt: skip
    return argv, None, ["fingerprint"]


def exists_report(w: World, t: Path):
    out = t / "rep"
    assert main(["report", f"dataset={w.good}", f"output_dir={out}", "max_trajectories=1"]) == 0
    return (
        ["report", f"dataset={w.good}", f"output_dir={out}", "max_trajectories=1", "overwrite=false"],
        out,
        [
            str(out),
            "already holds a finished report run",
        ],
    )


# ---- screenshots through the VLM stages (finetune-vlm, train-bc, candidates, evaluate, extract-policy) --


def _all_corrupt(w: World, t: Path) -> Path:
    """Every screenshot is garbage: whichever row a stage decodes first must be named."""

    def edit(rows):
        rows["screenshot"] = [{"bytes": b"\x89PNG garbage", "path": None} for _ in rows["screenshot"]]
        return rows

    return variant(w, t / "ds", edit)


def corrupt_screenshot_finetune_vlm(w: World, t: Path):
    ds = variant(w, t / "ds", _set("next_screenshot", 9, {"bytes": _png()[:200], "path": None}))
    argv = ["finetune-vlm", f"dataset={ds}", f"output_dir={t / 'out'}", *VLM]
    return argv, None, [str(ds), _loc(w, 9), "next_screenshot", "does not decode"]


def corrupt_screenshot_train_bc(w: World, t: Path):
    ds = _all_corrupt(w, t)
    argv = ["train-bc", f"dataset={ds}", f"output_dir={t / 'out'}", "max_rows=4", *BC]
    return argv, None, [str(ds), "trajectory", "screenshot", "does not decode"]


def corrupt_screenshot_candidates(w: World, t: Path):
    ds = variant(w, t / "ds", _set("screenshot", 2, {"bytes": b"\x89PNG garbage", "path": None}))
    argv = ["candidates", f"dataset={ds}", f"output_dir={t / 'out'}", "source=policy", f"policy={w.policy()}",
            "num_candidates=2", "batch_size=64"]  # fmt: skip
    return argv, None, [str(ds), _loc(w, 2), "screenshot"]


def corrupt_screenshot_evaluate(w: World, t: Path):
    from digiq.data.transitions import successful_rows

    ok = successful_rows(load_dataset(w.good).select_columns(["traj_id", "reward"]))
    assert len(ok), "the fixture dataset needs a successful trajectory"
    r = int(ok[0])
    ds = variant(w, t / "ds", _set("screenshot", r, {"bytes": _png()[:200], "path": None}))
    argv = ["evaluate", "mode=offline", f"dataset={ds}", f"policy={w.policy()}", f"output_dir={t / 'out'}",
            "batch_size=64"]  # fmt: skip
    return argv, None, [str(ds), _loc(w, r), "screenshot"]


def corrupt_screenshot_extract_policy(w: World, t: Path):
    ds = _all_corrupt(w, t)
    argv = ["extract-policy", f"dataset={ds}", f"init_policy={w.policy()}", f"output_dir={t / 'out'}",
            "scorer=q_star", "threshold=-1", *EXTRACT]  # fmt: skip
    return argv, None, [str(ds), "trajectory", "screenshot", "does not decode"]


EXTRACT = ["train.batch_size=2", "train.max_steps=1", "wandb.mode=disabled", "log_kl=false"]


def dim_mismatch_extract_policy(w: World, t: Path):
    f = _features_for(w.good, t / "f", dim=D + 4)
    argv = ["extract-policy", f"dataset={w.good}", f"init_policy={w.policy()}", f"output_dir={t / 'out'}",
            "scorer=critic", f"features={f}", f"critic_dir={w.critic_run / 'critic'}", *EXTRACT]  # fmt: skip
    return argv, None, ["do not match the critic", "state 12", "state 8"]


def n_mismatch_extract_policy(w: World, t: Path):
    f = _features_for(w.good, t / "f", n=N - 1)
    argv = ["extract-policy", f"dataset={w.good}", f"init_policy={w.policy()}", f"output_dir={t / 'out'}",
            "scorer=critic", f"features={f}", f"critic_dir={w.critic_run / 'critic'}", "num_candidates=2",
            *EXTRACT]  # fmt: skip
    return argv, None, [_loc(w, 0), "N=2"]


@dataclasses.dataclass
class Case:
    build: Callable
    rc: int = 1


CASES = {
    f.__name__: Case(f)
    for f in [
        corrupt_screenshot,
        truncated_screenshot,
        truncated_screenshot_report,
        missing_image,
        missing_column,
        wrong_dtype,
        nan_reward,
        inf_reward,
        nan_features,
        inf_features,
        corrupt_feature_shard,
        incomplete_feature_cache,
        dim_mismatch_resume,
        dim_mismatch_report,
        n_mismatch_critic,
        n_mismatch_report,
        other_dataset_features,
        other_dataset_features_evaluate,
        empty_dataset,
        not_a_dataset,
        exists_sim_collect,
        exists_cache_features,
        exists_train_critic,
        exists_train_bc,
        exists_extract_policy,
        exists_report,
        corrupt_screenshot_finetune_vlm,
        corrupt_screenshot_train_bc,
        corrupt_screenshot_candidates,
        corrupt_screenshot_evaluate,
        corrupt_screenshot_extract_policy,
        dim_mismatch_extract_policy,
        n_mismatch_extract_policy,
    ]
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name: str, world: World, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    case = CASES[name]
    argv, protected, patterns = case.build(world, tmp_path)
    before = tree_state(protected) if protected else None
    world_before = tree_state(world.root)
    capsys.readouterr()
    rc = main(argv)  # an exception escaping here is a raw traceback for the user: the test fails
    err = capsys.readouterr().err
    assert rc == case.rc, err[-2000:]
    msg = [ln for ln in err.splitlines() if f"digiq {argv[0]}" in ln or ln.startswith("digiq ")]
    assert msg, err[-2000:]
    line = msg[-1]
    for p in patterns:
        assert p in line, f"{p!r} not in {line!r}"
    if protected:
        assert tree_state(protected) == before, "a failed command changed the user's existing output"
    assert tree_state(world.root) == world_before
    # nothing finished-looking was left where the failed stage would have written
    for out in tmp_path.glob("o*"):
        assert not is_complete(out), out


# ---- cases that must NOT fail ---------------------------------------------------------------------


def test_unparsable_actions_are_invalid_actions_not_crashes(world: World, tmp_path: Path) -> None:
    """Garbage action strings are INVALID actions: every stage that reads actions runs through."""

    def edit(rows):
        rows["action"][3] = "click the (((red thing"
        rows["candidates"][3] = ["click the (((red thing", "", '{"action_type": 99']
        rows["candidates"][4][2] = "\x00\x01 not an action"
        return rows

    ds = variant(world, tmp_path / "ds", edit)
    f = tmp_path / "f"
    assert (
        main(
            ["cache-features", f"dataset={ds}", f"output_dir={f}", *CACHE, "model.name_or_path=tiny:qwen2-vl"]
        )
        == 0
    )
    assert (
        main(["train-critic", f"dataset={ds}", f"features={f}", f"output_dir={tmp_path / 'c'}", *CRITIC]) == 0
    )
    rep = tmp_path / "r"
    assert (
        main(
            ["report", f"dataset={ds}", f"features={f}", f"critic_dir={tmp_path / 'c'}", f"output_dir={rep}"]
        )
        == 0
    )
    assert is_complete(rep)


def test_extra_columns_are_accepted(world: World, tmp_path: Path) -> None:
    """An extra column (user metadata) is ignored, not an error: stages select the columns they read."""

    def edit(rows):
        rows["annotator"] = ["me"] * len(rows["traj_id"])
        return rows

    from datasets import Value

    feats = FEATURES.copy()
    feats["annotator"] = Value("string")
    ds = variant(world, tmp_path / "ds", edit, feats)
    out, f = tmp_path / "c", _features_for(ds, tmp_path / "f")
    assert main(["train-critic", f"dataset={ds}", f"features={f}", f"output_dir={out}", *CRITIC]) == 0
    assert (out / "critic").is_dir()


# ---- real processes: exit codes and no tracebacks ----------------------------------------------


@pytest.mark.slow
def test_subprocess_config_typos_and_unknown_model(world: World, tmp_path: Path) -> None:
    r = run_digiq("train-critic", f"dataset={world.good}", f"features={world.feats}", "epochz=3")
    assert r.returncode == 2 and "did you mean 'epochs'" in r.stderr and "Traceback" not in r.stderr
    r = run_digiq("train-critic", f"dataset={world.good}", f"features={world.feats}", "optim.lrr=1e-3")
    assert r.returncode == 2 and "did you mean 'lr'" in r.stderr and "Traceback" not in r.stderr
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("dataset: x\nfeatures: y\ncritic:\n  q_hiden: [8]\n")
    r = run_digiq("train-critic", "--config", str(bad_yaml))
    assert r.returncode == 2 and str(bad_yaml) in r.stderr and "did you mean 'q_hidden'" in r.stderr
    out = tmp_path / "f"
    r = run_digiq("cache-features", f"dataset={world.good}", f"output_dir={out}", "model.name_or_path=nobody/nothing",
                  "device=cpu")  # fmt: skip
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "nobody/nothing" in r.stderr
    err_lines = [ln for ln in r.stderr.splitlines() if ln.startswith("digiq cache-features: error")]
    assert len(err_lines) == 1 and len(err_lines[0]) < 600, r.stderr[-3000:]
    assert not out.exists() or not any(out.iterdir())


def test_models_unavailable_offline_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The official AitW critic config names roberta-base; offline and not cached, train-critic (and a stage
    loading it as its VLM) says so in one line naming the setting and the id, not a transformers traceback."""
    from aitw_helpers import import_file, two_task_file
    from huggingface_hub import try_to_load_from_cache

    from digiq.models.tiny_text import save_tiny_text_encoder

    if isinstance(try_to_load_from_cache("roberta-base", "config.json"), str):
        pytest.skip("roberta-base is in this machine's Hugging Face cache")
    ds, feats = import_file(two_task_file(tmp_path, per_goal=1), tmp_path)
    official = Path(__file__).resolve().parents[1] / "configs" / "train-critic" / "official-aitw.yaml"
    enc = save_tiny_text_encoder(str(tmp_path / "tiny-roberta"))
    cases = [
        (["train-critic", "--config", str(official), f"dataset={ds}", f"features={feats}",
          f"output_dir={tmp_path / 'c'}", "wandb.mode=disabled"],
         "critic.text.encoder='roberta-base': cannot load the text encoder", "not available offline (HF_HUB_OFFLINE=1)"),
        (["cache-features", f"dataset={ds}", f"output_dir={tmp_path / 'f'}", "model.name_or_path=roberta-base",
          "device=cpu"],
         "model.name_or_path='roberta-base': cannot load the VLM", "not available offline (HF_HUB_OFFLINE=1)"),
        (["cache-features", f"dataset={ds}", f"output_dir={tmp_path / 'f'}", f"model.name_or_path={enc}",
          "device=cpu"],
         f"model.name_or_path='{enc}': cannot load the VLM", "not a VLM digiq supports"),
    ]  # fmt: skip
    for argv, what, why in cases:
        capsys.readouterr()
        rc = main(argv)  # an escaping exception is the traceback the user would see
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.startswith(f"digiq {argv[0]}: error:")]
        assert rc == 1 and len(lines) == 1, err[-2000:]
        assert what in lines[0] and why in lines[0], lines[0]
        assert not is_complete(tmp_path / "c") and not is_complete(tmp_path / "f")


def test_bad_input_table_is_documented() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "reliability.md").read_text()
    missing = [name for name in CASES if f"`{name}`" not in doc]
    assert not missing, f"docs/reliability.md lacks rows for {missing}"
