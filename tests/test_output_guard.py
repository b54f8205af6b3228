"""The one output guard (digiq.utils.io.plan_output) through the writers that use it: a used folder is
refused naming the folder and the flag, --resume continues a run of the same fingerprint, a different
fingerprint is refused naming the field, overwrite replaces (staged: the old output survives a crash)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from critic_mdp import make_run_inputs
from test_cache_features_stage import make_dataset
from test_importer import _truth, _write_pngs, raw_variant

from digiq.config import ConfigError, load_config
from digiq.data.features import FeatureCache
from digiq.data.importer import Config as ImportConfig
from digiq.data.importer import run as run_import
from digiq.data.schema import dataset_info, load_dataset
from digiq.errors import DigiqError
from digiq.models.critic import load_critic
from digiq.stages import cache_features as cf
from digiq.stages import collect
from digiq.stages import train_critic as tc
from digiq.utils.io import (
    RUN_RECORD,
    OutputExistsError,
    OutputMismatchError,
    begin_output,
    finish_output,
    is_complete,
    plan_output,
    read_run_record,
    staged_output,
)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _hidden_siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


# -- the guard itself --------------------------------------------------------------------------------


def test_guard_decisions_change_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert plan_output(out, "s").action == "fresh"
    out.mkdir()
    (out / ".scratch").write_text("x")  # hidden scratch does not make a folder used
    assert plan_output(out, "s").action == "fresh"
    (out / "notes.txt").write_text("mine")
    with pytest.raises(
        OutputExistsError, match=f"{out} already holds other files, not a s run; .*overwrite=true"
    ):
        plan_output(out, "s", resume=True)
    with pytest.raises(DigiqError, match="cannot both"):
        plan_output(out, "s", resume=True, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExistsError, match="not a folder"):
        plan_output(tmp_path / "file", "s")
    assert sorted(p.name for p in out.iterdir()) == [".scratch", "notes.txt"]


def test_in_place_overwrite_keeps_the_old_output_until_the_new_run_finishes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    plan = plan_output(out, "s", fingerprint={"a": 1})
    begin_output(plan)
    (out / "result").write_text("old")
    finish_output(out)
    old = _files(out)
    with pytest.raises(OutputExistsError, match=f"{out} already holds a finished s run; pass overwrite=true"):
        plan_output(out, "s", fingerprint={"a": 2})
    with pytest.raises(OutputExistsError, match="already holds a s run, not a t run"):
        plan_output(out, "t", resume=True)
    # overwrite, then a "crash" before the end: the old finished output is intact in a hidden sibling
    begin_output(plan_output(out, "s", overwrite=True, fingerprint={"a": 2}))
    (out / "result").write_text("new, half-written")
    assert not is_complete(out)
    (aside,) = _hidden_siblings(out)
    assert _files(tmp_path / aside / "run") == old
    # a second overwrite of the unfinished run keeps that same finished output aside (not the partial one)
    begin_output(plan_output(out, "s", overwrite=True, fingerprint={"a": 2}))
    assert _hidden_siblings(out) == [aside] and [p.name for p in out.iterdir()] == [RUN_RECORD]
    # --resume of a different configuration names the field; the same one continues and, finished, the old
    # output is gone
    with pytest.raises(OutputMismatchError, match=r"different configuration \(differs in: a\)"):
        plan_output(out, "s", resume=True, fingerprint={"a": 3})
    plan = plan_output(out, "s", resume=True, fingerprint={"a": 2})
    assert plan.action == "resume" and not plan.finished
    begin_output(plan)
    (out / "result").write_text("new")
    finish_output(out)
    assert _hidden_siblings(out) == [] and (out / "result").read_text() == "new"
    assert read_run_record(out) == {"stage": "s", "fingerprint": {"a": 2}, "replaces": None}


def test_staged_overwrite_swaps_only_a_finished_folder_in(tmp_path: Path) -> None:
    out = tmp_path / "data"
    with staged_output(plan_output(out, "d", fingerprint={"n": 1})) as tmp:
        (tmp / "rows").write_text("1")
    old = _files(out)
    with pytest.raises(RuntimeError), staged_output(plan_output(out, "d", overwrite=True)) as tmp:
        (tmp / "rows").write_text("2")
        raise RuntimeError("killed mid-write")
    assert _files(out) == old and _hidden_siblings(out) == []
    with staged_output(plan_output(out, "d", overwrite=True, fingerprint={"n": 2})) as tmp:
        (tmp / "rows").write_text("2")
    assert (out / "rows").read_text() == "2" and read_run_record(out)["fingerprint"] == {"n": 2}


# -- a trainer: train-critic ---------------------------------------------------------------------------


def _critic_cfg(ds: Path, feats: Path, out: Path, *extra: str) -> tc.Config:
    base = [f"dataset={ds}", f"features={feats}", f"output_dir={out}", "gamma=0.9", "batch_size=32",
            "steps_per_epoch=4", "epochs=1", "critic.q_hidden=[16]", "critic.v_hidden=[16]",
            "wandb.mode=disabled", "log_every=2", "device=cpu", "q_star=skip"]  # fmt: skip
    return load_config(tc.Config, None, [*base, *extra])


def test_trainer_modes(tmp_path: Path) -> None:
    ds, feats, _, _ = make_run_inputs(tmp_path / "in", num_traj=20, horizon=4, gamma=0.9)
    out = tmp_path / "critic"
    tc.run(_critic_cfg(ds, feats, out))
    first = _files(out / "critic")
    with pytest.raises(
        FileExistsError, match=f"{out} already holds a finished train-critic run; pass overwrite"
    ):
        tc.run(_critic_cfg(ds, feats, out))
    # a different seed is another run: refused on resume, naming the field
    with pytest.raises(OutputMismatchError, match=r"differs in: seed\)"):
        tc.run(_critic_cfg(ds, feats, out, "seed=1", "resume=true"))
    assert _files(out / "critic") == first
    # resume continues: one more epoch on top of the finished one
    tc.run(_critic_cfg(ds, feats, out, "epochs=2", "resume=true"))
    assert json.loads((out / "metrics.json").read_text())["step"] == 8
    assert is_complete(out)
    # overwrite replaces it with a fresh run of another seed, and leaves nothing aside once finished
    tc.run(_critic_cfg(ds, feats, out, "seed=1", "overwrite=true"))
    assert json.loads((out / "metrics.json").read_text())["step"] == 4
    assert read_run_record(out)["fingerprint"]["seed"] == 1 and _hidden_siblings(out) == []
    assert _files(out / "critic") != first
    load_critic(out / "critic")


# -- cache-features -------------------------------------------------------------------------------------


def _cf_cfg(ds: Path, out: Path, *extra: str) -> cf.Config:
    return load_config(
        cf.Config, None, [f"dataset={ds}", f"output_dir={out}", "shard_rows=2", "device=cpu", *extra]
    )


def test_cache_features_modes(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path / "ds")
    out = tmp_path / "feats"
    assert cf.run(_cf_cfg(ds, out, "max_shards=1"))["status"] == "incomplete"
    with pytest.raises(FileExistsError, match=f"{out} holds an unfinished cache-features run; pass --resume"):
        cf.run(_cf_cfg(ds, out))
    with pytest.raises(OutputMismatchError, match=r"differs in: layer\)"):
        cf.run(_cf_cfg(ds, out, "layer=1", "resume=true"))
    done = cf.run(_cf_cfg(ds, out, "resume=true"))
    assert done["status"] == "complete" and done["skipped_shards"] == [0]
    assert cf.run(_cf_cfg(ds, out, "resume=true"))["status"] == "already complete"
    with pytest.raises(FileExistsError, match=f"{out} already holds a finished cache-features run"):
        cf.run(_cf_cfg(ds, out, "layer=1"))
    old = FeatureCache.open(out)
    cf.run(_cf_cfg(ds, out, "layer=1", "overwrite=true"))
    new = FeatureCache.open(out)
    assert new.manifest["layer"] == 1 and old.manifest["layer"] != 1
    assert not torch.equal(new.state, old.state) and _hidden_siblings(out) == []


# -- import ---------------------------------------------------------------------------------------------


def test_import_modes(tmp_path: Path) -> None:
    truth = _truth()
    _write_pngs(truth, tmp_path / "released" / "images" / "test3")
    pt = tmp_path / "raw.pt"
    torch.save(raw_variant(truth), pt)
    out = tmp_path / "ds"

    def cfg(**kw) -> ImportConfig:
        return ImportConfig(inputs=(str(pt),), output=str(out), image_root=str(tmp_path / "released"), **kw)

    first = run_import(cfg(gamma=0.9))
    before = _files(out)
    with pytest.raises(
        FileExistsError, match=f"{out} already holds a finished import run; pass overwrite=true"
    ):
        run_import(cfg(gamma=0.9))
    # resume of the same import: nothing to redo, the same summary, the folder untouched
    assert run_import(cfg(gamma=0.9, resume=True)) == first
    assert _files(out) == before
    with pytest.raises(OutputMismatchError, match=r"differs in: gamma\)"):
        run_import(cfg(gamma=0.8, resume=True))
    run_import(cfg(gamma=0.8, overwrite=True))
    assert dataset_info(out)["gamma"] == 0.8 and len(load_dataset(out)) == first.steps
    assert _hidden_siblings(out) == []


# -- collect -------------------------------------------------------------------------------------------


def _collect_cfg(out: Path, *extra: str) -> collect.Config:
    base = [f"output_dir={out}", "num_trajectories=3", "num_candidates=2", "sim.width=90", "sim.height=160"]
    return load_config(collect.Config, None, [*base, *extra])


def test_sim_collect_modes(tmp_path: Path) -> None:
    out = tmp_path / "data"
    collect.run(_collect_cfg(out))
    before = _files(out)
    with pytest.raises(
        FileExistsError, match=f"{out} already holds a finished collect run; pass overwrite=true"
    ):
        collect.run(_collect_cfg(out, "seed=1"))
    with pytest.raises(ConfigError, match="resume is for environments collected in shards"):
        _collect_cfg(out, "resume=true")  # the simulator collects in one go: nothing to resume
    assert _files(out) == before
    collect.run(_collect_cfg(out, "seed=1", "overwrite=true"))
    assert dataset_info(out)["seed"] == 1 and _files(out) != before and _hidden_siblings(out) == []


MINIWOB = pytest.mark.skipif(
    importlib.util.find_spec("miniwob") is None
    or not (Path("/usr/bin/chromium").exists() and Path("/usr/bin/chromedriver").exists()),
    reason="needs the miniwob package, Debian's chromium and chromium-driver",
)


@pytest.mark.miniwob
@MINIWOB
def test_sharded_collect_modes(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp = tmp_path_factory.mktemp("g")  # short: Chromium's socket path limit
    out = tmp / "mw"

    def cfg(*extra: str) -> collect.Config:
        return load_config(collect.Config, None, [
            "env=miniwob", "miniwob.tasks=[click-button]", "num_trajectories=2", "num_candidates=2",
            "shard_size=1", "num_workers=1", f"miniwob.scratch_dir={tmp / 'b'}", f"output_dir={out}", *extra,
        ])  # fmt: skip

    # a "kill" while the second shard is written: one finished shard, no dataset
    real, calls = collect.episode_columns, []

    def dies_on_the_second_shard(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(collect, "episode_columns", dies_on_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        collect.run(cfg())
    monkeypatch.setattr(collect, "episode_columns", real)
    assert not is_complete(out) and len(list((out / "shards").glob("shard-*"))) == 1
    with pytest.raises(
        FileExistsError, match=rf"{out} holds an unfinished collect run; pass --resume \(resume=true\)"
    ):
        collect.run(cfg())
    with pytest.raises(OutputMismatchError, match=r"differs in: seed\)"):
        collect.run(cfg("seed=1", "resume=true"))
    stats = collect.run(cfg("resume=true"))
    assert stats["collected_this_run"] == 1 and len(set(load_dataset(out)["traj_id"])) == 2
    assert collect.run(cfg("resume=true")) == {}  # finished: nothing to resume
    collect.run(cfg("seed=1", "overwrite=true"))
    assert dataset_info(out)["seed"] == 1 and _hidden_siblings(out) == []
