"""`digiq pipeline` end to end on tiny sizes: every stage runs, hands off through files, and a re-run skips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from digiq.config import ConfigError, load_config
from digiq.errors import DigiqError
from digiq.models.shipped import GUI_TINY, REBUILD, resolve_model_folder
from digiq.stages import pipeline
from digiq.utils.io import is_complete

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_pipeline_smoke_then_skip(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    out = tmp_path / "p"
    smoke = _smaller_smoke(tmp_path)
    cfg = load_config(pipeline.Config, smoke, [f"output_dir={out}"])
    summary = pipeline.run(cfg)
    for stage, folder in pipeline.FOLDERS.items():
        assert is_complete(out / folder), stage
    ev = summary["stages"]["evaluate"]["metrics"]
    assert set(ev) == {"behaviour", "bc", "extracted"}
    assert all(0.0 <= ev[k]["success_rate"] <= 1.0 for k in ev)
    md = (out / "summary.md").read_text()
    assert md.startswith("# digiq pipeline summary")
    # The evaluation traced every failed episode to the screen of its first non-optimal step (exact Q*).
    for k, m in ev.items():
        failed = m["num_episodes"] - m["num_successes"]
        assert sum(m["first_mistake_screens"].values()) == failed, k
    assert "failed episodes by first-mistake screen |" in md
    acc = summary["stages"]["finetune_vlm"]["metrics"]["heldout_accuracy"]
    assert f"| accuracy | {acc:.4f} |" in md and "| majority baseline |" in md  # Stage 1 in the summary
    # Stage 1 and pi_beta both started from the shipped GUI-pretrained model (stage1_init=pretrained).
    import yaml

    shipped = resolve_model_folder(GUI_TINY)
    s1 = yaml.safe_load((out / "finetune_vlm" / "config.yaml").read_text())
    assert s1["model"]["name_or_path"] == shipped
    bc = yaml.safe_load((out / "bc" / "config.yaml").read_text())
    assert bc["model"]["name_or_path"] == shipped
    # The summary says on what machine the stage times were measured.
    assert summary["machine"]["matmul_gflops"] > 0 and "GFLOP/s" in md
    # The critic was scored against the simulator's exact Q*.
    crit = summary["stages"]["train_critic"]["metrics"]
    assert "val/qstar_top1_agreement" in crit
    # ... and per screen of the simulator (where it ranks badly)
    screens = {k.split("/")[-1]: v for k, v in crit.items() if k.startswith("val/qstar_top1/")}
    assert "home" in screens and all(0.0 <= v <= 1.0 for v in screens.values())
    # The default critic backs up the candidates its probe reads as no-ops (probe fitted on the Stage-1
    # labels of this run's dataset), with a dueling Q head.
    assert 0.0 < crit["noop/candidates_masked"] < 1.0 and crit["noop/probe_val_accuracy"] > 0.5
    critic_cfg = yaml.safe_load((out / "critic" / "config.yaml").read_text())
    assert critic_cfg["noop"]["enabled"] is True and critic_cfg["critic"]["q_param"] == "dueling"
    assert critic_cfg["critic"]["q_input"] == "state_action"

    # A second run finds every stage complete and recomputes nothing (same summary times).
    before = json.loads((out / "summary.json").read_text())
    pipeline.run(cfg)
    after = json.loads((out / "summary.json").read_text())
    assert after["stages"] == before["stages"]
    assert after["machine"] == before["machine"]  # nothing ran: the times keep the machine they ran on

    # Forcing a stage re-runs it and every later stage.
    cfg2 = load_config(pipeline.Config, smoke, [f"output_dir={out}", "force=[evaluate]"])
    pipeline.run(cfg2)
    again = json.loads((out / "summary.json").read_text())
    assert again["stages"]["train_critic"] == before["stages"]["train_critic"]

    # scripts/ablate.py on the finished run: every arm, one seed.
    _run_ablation(out, smoke, tmp_path / "ablation", monkeypatch)


def _smaller_smoke(tmp_path: Path) -> Path:
    """configs/pipeline/smoke.yaml with the recipe's 1024-wide critic heads cut to 64 and 20 trajectories
    instead of 30: the pipeline and scripts/ablate.py train six critics and cache features twice here, and
    no assertion depends on those sizes."""
    smoke = yaml.safe_load((ROOT / "configs/pipeline/smoke.yaml").read_text())
    smoke["train_critic"]["critic"] = {"q_hidden": [64, 64], "v_hidden": [64, 64]}
    smoke["collect"]["num_trajectories"] = 20
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(smoke))
    return path


def _load_ablate():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ablate", ROOT / "scripts/ablate.py")
    ablate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablate)
    return ablate


def _run_ablation(pipe: Path, config: Path, out: Path, monkeypatch) -> None:
    import torch

    from digiq.data.features import FeatureCache

    ablate = _load_ablate()
    argv = ["--pipeline", str(pipe), "--config", str(config)]
    # benchmark v1 has no validation goals: its tables need the explicit --split test
    argv += ["--out", str(out), "--seeds", "0", "--ns", "1", "2", "--episodes", "4", "--split", "test"]
    argv += ["--pre-stage1"]
    ablate.main(argv)
    rows = json.loads((out / "ablation.json").read_text())
    assert {(r["arm"], r["n"]) for r in rows} == {
        ("pi_beta", 0),
        ("filtered_bc", 0),
        ("td", 1),
        ("td", 2),
        ("mc", 2),
        ("td_paper", 2),
        ("mc_paper", 2),
        ("q_star", 2),
        ("td_pre", 2),
    }
    assert all(r["split"] == "test" for r in rows)
    # Like for like: each critic arm differs from the pipeline's critic in exactly the fields its name says.
    base = yaml.safe_load((pipe / "critic" / "config.yaml").read_text())
    for arm in ("td", "mc", "td_paper", "mc_paper", "td_pre"):
        got = yaml.safe_load((out / f"s0/critic_{arm}/config.yaml").read_text())
        diff = {k for k in base if got[k] != base[k]} - {"output_dir", "features", "overwrite"}
        want = {"critic_loss"} if arm.startswith("mc") else set()
        if arm.endswith("_paper"):
            want |= {"noop", "critic"}
            assert got["noop"]["enabled"] is False and got["critic"]["q_param"] == "direct", arm
            assert got["conservative"]["weight"] == 0, arm
            want |= {"conservative"} if base["conservative"]["weight"] else set()
            other = {k for k in base["critic"] if got["critic"][k] != base["critic"][k]}
            assert other == {"q_param"}, arm
        assert diff == want, (arm, diff)
    # Filtered BC imitated the successful trajectories only, from the actor start of the extraction arms
    # (actor_from=pi_beta: pi_beta itself), with pi_beta's other model settings.
    fbc = yaml.safe_load((out / "s0/filtered_bc/config.yaml").read_text())
    bc = yaml.safe_load((pipe / "bc" / "config.yaml").read_text())
    ex = yaml.safe_load((out / "s0/extract_td_n2/config.yaml").read_text())
    assert fbc["trajectories"] == "successful" and fbc["model"]["name_or_path"] == ex["init_policy"]
    assert ex["init_policy"] == str(pipe / "bc" / "policy")
    assert {k: v for k, v in fbc["model"].items() if k != "name_or_path"} == {
        k: v for k, v in bc["model"].items() if k != "name_or_path"
    }
    # The oracle row is labelled as one.
    md = (out / "ablation.md").read_text()
    assert "[oracle] exact Q* over the same candidates" in md and "Split: **test**" in md
    assert "| Digi-Q TD, pre-Stage-1 features | 1 |" in md  # the critic table
    assert (out / "ablation.png").stat().st_size > 0
    # The pre-Stage-1 arm really read other features: the base VLM's, not the fine-tuned one's.
    pre = FeatureCache.open(out / "features_pre_stage1")
    post = FeatureCache.open(pipe / "features")
    assert pre.actions.shape == post.actions.shape
    assert not torch.allclose(pre.actions.float(), post.actions.float())


def test_ablation_defaults_to_validation_goals(tmp_path: Path) -> None:
    """Tuning runs on validation goals unless --split test is asked for; benchmark v1 has none, so the
    default refuses before training anything."""
    ablate = _load_ablate()
    with pytest.raises(SystemExit, match="--split val: .*--split test"):
        ablate.main(["--pipeline", str(tmp_path / "p"), "--out", str(tmp_path / "a")])
    assert not (tmp_path / "a").exists()


def test_stage1_init_bc_refuses_a_model_it_would_ignore(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="stage1_init=model"):
        load_config(
            pipeline.Config, None, [f"output_dir={tmp_path}", "finetune_vlm.model.name_or_path=tiny:llava"]
        )
    load_config(pipeline.Config, None, ["finetune_vlm.model.name_or_path=tiny:llava", "stage1_init=model"])


def test_stage1_init_pretrained_refuses_a_bc_model_it_would_ignore(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train_bc.model .* is ignored with stage1_init=pretrained"):
        load_config(pipeline.Config, None, ["train_bc.model.name_or_path=tiny:llava"])
    load_config(pipeline.Config, None, ["train_bc.model.name_or_path=tiny:llava", "stage1_init=bc"])


def test_missing_pretrained_model_says_how_to_rebuild_it(tmp_path: Path) -> None:
    with pytest.raises(DigiqError, match="not found"):
        pipeline.wire(pipeline.Config(output_dir=str(tmp_path), pretrained=str(tmp_path / "nope")))
    assert "digiq pretrain-vlm --config configs/pretrain-vlm/gui-tiny.yaml" in REBUILD[GUI_TINY]


def test_stage1_init_bc_needs_the_bc_stage(tmp_path: Path) -> None:
    cfg = load_config(
        pipeline.Config, None, [f"output_dir={tmp_path}", "stages=[collect,finetune_vlm]", "stage1_init=bc"]
    )
    with pytest.raises(ConfigError, match="train_bc is not in `stages`"):
        pipeline.run(cfg)
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_wire_paths_chain_the_stages(tmp_path: Path) -> None:
    cfg = pipeline.Config(output_dir=str(tmp_path), seed=7)
    c = pipeline.wire(cfg)
    assert c["finetune_vlm"].dataset == c["collect"].output_dir
    assert c["cache_features"].dataset == c["candidates"].output_dir
    assert c["cache_features"].model.name_or_path == c["finetune_vlm"].output_dir
    assert c["cache_features"].rendering == c["finetune_vlm"].rendering
    assert c["train_critic"].features == c["cache_features"].output_dir
    assert c["extract_policy"].critic_dir.startswith(c["train_critic"].output_dir)
    assert c["extract_policy"].init_policy.startswith(c["train_bc"].output_dir)
    assert all(getattr(s, "seed", 7) == 7 for s in c.values())
    # Stage 1 and pi_beta start from the shipped pretrained model (stage1_init=pretrained, the default) ...
    shipped = resolve_model_folder(GUI_TINY)
    assert Path(shipped).is_dir()
    assert c["finetune_vlm"].model.name_or_path == shipped == c["train_bc"].model.name_or_path
    policy = c["extract_policy"].init_policy
    assert c["candidates"].policy == policy != shipped
    # ... and the off-the-shelf arm reads features from the model Stage 1 started from
    base = pipeline.wire(pipeline.Config(output_dir=str(tmp_path), features_from="base"))
    assert base["cache_features"].model.name_or_path == shipped
    # stage1_init=bc: Stage 1 starts from pi_beta's VLM, pi_beta from train_bc.model as configured
    bc = pipeline.wire(pipeline.Config(output_dir=str(tmp_path), stage1_init="bc", features_from="base"))
    assert bc["finetune_vlm"].model.name_or_path == policy == bc["cache_features"].model.name_or_path
    assert bc["train_bc"].model.name_or_path == pipeline.Config().train_bc.model.name_or_path
    # stage1_init=model fine-tunes finetune_vlm.model as configured
    own = pipeline.Config(output_dir=str(tmp_path), stage1_init="model", features_from="base")
    w = pipeline.wire(own)
    assert w["finetune_vlm"].model.name_or_path == own.finetune_vlm.model.name_or_path
    assert w["cache_features"].model.name_or_path == own.finetune_vlm.model.name_or_path
    assert w["cache_features"].model.tiny_seed == own.finetune_vlm.model.tiny_seed
    # wiring does not mutate the user's config
    assert cfg.collect.output_dir != c["collect"].output_dir


def test_stage1_trajectories_refuses_a_count_it_cannot_use(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="more than collect.num_trajectories"):
        load_config(pipeline.Config, None, [f"output_dir={tmp_path}", "stage1_trajectories=500"])
    with pytest.raises(ConfigError, match="env=sim"):
        load_config(pipeline.Config, None, ["stage1_trajectories=1500", "env=miniwob"])
    load_config(pipeline.Config, None, ["stage1_trajectories=1500"])


def test_stage1_collection_holds_out_the_datasets_validation_trajectories(tmp_path: Path) -> None:
    """stage1_trajectories: Stage 1 trains on the dataset's training trajectories plus new ones, and holds
    out exactly the trajectories it holds out without the option (the ones the critic validates on)."""
    import numpy as np

    from digiq.data.schema import load_dataset, split_by_trajectory
    from digiq.stages.collect import run as run_collect

    over = [f"output_dir={tmp_path}", "collect.num_trajectories=10", "stage1_trajectories=25"]
    cfg = load_config(pipeline.Config, None, over)
    wired = pipeline.wire(cfg)
    assert wired["finetune_vlm"].dataset == str(tmp_path / pipeline.STAGE1_DATA)
    run_collect(wired["collect"])
    pipeline._collect_stage1_data(cfg)
    data, big = load_dataset(wired["collect"].output_dir), load_dataset(wired["finetune_vlm"].dataset)
    assert len(set(big["traj_id"])) == 25 and not (tmp_path / "data_stage1.raw").exists()

    def rows(ds, idx):
        sub = ds.select(idx.tolist())
        return list(zip(sub["traj_id"], sub["step_id"], sub["state_key"], sub["action"], strict=True))

    d_train, d_val = split_by_trajectory(data, cfg.finetune_vlm.val_fraction)  # what Stage 1 uses without it
    b_train, b_val = split_by_trajectory(big, wired["finetune_vlm"].val_fraction)
    assert rows(big, b_val) == rows(data, d_val) and len(d_val) > 0
    train_rows = rows(big, b_train)
    assert train_rows[: len(d_train)] == rows(data, d_train)
    new = {r[0] for r in train_rows[len(d_train) :]}
    assert len(new) == 15 and not new & set(np.asarray(data["traj_id"]).tolist())
    # a second call finds the finished collection and leaves it alone
    stamp = (tmp_path / pipeline.STAGE1_DATA / "_COMPLETE").stat().st_mtime_ns
    pipeline._collect_stage1_data(cfg)
    assert (tmp_path / pipeline.STAGE1_DATA / "_COMPLETE").stat().st_mtime_ns == stamp


def test_candidates_from_the_behaviour_model_or_pi_beta(tmp_path: Path) -> None:
    """The paper's protocol: a model collects the data (collect.policy) and the candidates come from a model,
    that one or its behaviour clone; never from the scripted sampler unless asked (an oracle reference)."""
    model = resolve_model_folder(GUI_TINY)
    base = [f"output_dir={tmp_path}", f"collect.policy={model}", "candidates.source=policy"]
    wired = pipeline.wire(load_config(pipeline.Config, None, [*base, "candidates_from=behaviour"]))
    assert wired["candidates"].policy == model and wired["collect"].policy == model
    wired = pipeline.wire(load_config(pipeline.Config, None, base))
    assert wired["candidates"].policy == str(tmp_path / "bc" / "policy")
    with pytest.raises(ConfigError, match="set collect.policy to a policy folder"):
        load_config(pipeline.Config, None, ["candidates_from=behaviour", "candidates.source=policy"])
    with pytest.raises(ConfigError, match="needs candidates.source=policy"):
        load_config(pipeline.Config, None, [f"collect.policy={model}", "candidates_from=behaviour"])


def test_actor_from_the_behaviour_model_or_pi_beta(tmp_path: Path) -> None:
    """The paper fine-tunes the model that collected the data (AutoUI): actor_from=behaviour starts Stage 3
    there. pi_beta is still trained and evaluated (a baseline row); the default starts from it."""
    model = resolve_model_folder(GUI_TINY)
    base = [f"output_dir={tmp_path}", f"collect.policy={model}", "candidates.source=policy"]
    cfg = load_config(pipeline.Config, None, [*base, "actor_from=behaviour"])
    wired = pipeline.wire(cfg)
    pi_beta = str(tmp_path / "bc" / "policy")
    assert wired["extract_policy"].init_policy == model == wired["collect"].policy
    assert wired["candidates"].policy == pi_beta  # candidates_from is its own switch
    assert "train_bc" in cfg.stages and pipeline._policies_to_evaluate(cfg)["bc"] == (pi_beta, None)
    assert pipeline.wire(load_config(pipeline.Config, None, base))["extract_policy"].init_policy == pi_beta
    with pytest.raises(ConfigError, match="actor_from=behaviour .*set collect.policy to a policy folder"):
        load_config(pipeline.Config, None, ["actor_from=behaviour"])


def test_benchmark_v2_and_a_model_behaviour_policy_are_wired(tmp_path: Path) -> None:
    """benchmark=v2 reaches every stage that steps the device; a model that collected the data is evaluated as
    it collected (sampled at collect.temperature) and greedy."""
    model = resolve_model_folder(GUI_TINY)
    cfg = load_config(
        pipeline.Config,
        None,
        [f"output_dir={tmp_path}", "benchmark=v2", f"collect.policy={model}", "collect.temperature=0.7"],
    )
    wired = pipeline.wire(cfg)
    assert {wired[s].sim.benchmark for s in ("collect", "candidates", "evaluate")} == {"v2"}
    assert (
        pipeline.wire(load_config(pipeline.Config, None, [f"output_dir={tmp_path}"]))[
            "evaluate"
        ].sim.benchmark
        == "v1"
    )
    policies = pipeline._policies_to_evaluate(cfg)
    assert policies["behaviour"] == (model, 0.7) and policies["behaviour_greedy"] == (model, 0.0)
    assert policies["bc"][0].endswith("bc/policy") and set(policies) == {
        "behaviour",
        "behaviour_greedy",
        "bc",
        "extracted",
    }


def test_summary_intervals_are_over_goals() -> None:
    """A goal's repeated greedy episodes are one outcome: 32 goals x 3 identical episodes give the 32-goal
    interval, not the 96-episode one."""
    from digiq.utils.stats import wilson_interval

    per_task = {f"g{i}": [3, 3] if i < 20 else [0, 3] for i in range(32)}
    m = {"success_rate": 60 / 96, "ci_low": 0.0, "ci_high": 1.0, "num_episodes": 96, "per_task": per_task}
    m["split"] = "val"
    # as the pipeline stores it: the stage's metrics through _short, then rendered
    stored = pipeline._short({"bc": m, "paths": ["a", "b", "c"]})
    assert "paths" not in stored
    md = pipeline.render_summary({"stages": {"evaluate": {"metrics": stored}}})
    lo, hi = wilson_interval(20, 32)
    assert f"| bc | 0.625 | [{lo:.3f}, {hi:.3f}] | 32 | 96 |" in md
    assert "| policy | val success (mean over goals) |" in md


def test_summary_intervals_on_fresh_pages_are_wilson_over_episodes(tmp_path: Path) -> None:
    """MiniWoB++ gives every episode its own page (EnvSpec.fresh_episodes): 31 successes in 120 episodes over
    12 tasks is Wilson's interval on 31 / 120, not one clustered over the 12 tasks; summary.md's columns and
    summary.json's success table say so. The simulator's results keep the goal clustering and headers."""
    import math

    wins = [10, 10, 5, 3, 2, 1, 0, 0, 0, 0, 0, 0]  # 31 of 120, uneven over the tasks
    per_task = {f"t{i}": [w, 10] for i, w in enumerate(wins)}
    m = {"success_rate": 31 / 120, "ci_low": 0.0, "ci_high": 1.0, "num_episodes": 120, "per_task": per_task}
    m.update(split="val", env="miniwob")
    summary = {"stages": {"evaluate": {"metrics": pipeline._short({"extracted": m})}}}
    z, n, p = 1.959963984540054, 120, 31 / 120  # Wilson by hand
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    lo, hi = centre - half, centre + half
    assert (lo, hi) == pytest.approx((0.1884, 0.3433), abs=5e-5)
    # as the pipeline writes them: a re-run with nothing left to do rewrites summary.json and summary.md
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    pipeline.run(load_config(pipeline.Config, None, [f"output_dir={tmp_path}", "stages=[]", "env=miniwob"]))
    md = (tmp_path / "summary.md").read_text()
    assert "| policy | val success (over episodes) | 95% Wilson over pages | pages | episodes |" in md
    assert f"| extracted | 0.258 | [{lo:.3f}, {hi:.3f}] | 120 | 120 |" in md
    row = json.loads((tmp_path / "summary.json").read_text())["success"]["extracted"]
    assert row["unit"] == "page" and row["units"] == 120
    assert (row["success_rate"], row["ci_low"], row["ci_high"]) == pytest.approx((p, lo, hi))
    # The same results on the simulator: 12 goals, each its own success fraction (much wider).
    sim = {"stages": {"evaluate": {"metrics": {"extracted": {**m, "env": "sim"}}}}}
    md_sim = pipeline.render_summary(sim)
    assert "| policy | val success (mean over goals) | 95% CI over goals | goals | episodes |" in md_sim
    goal = pipeline.success_table(sim)["extracted"]
    assert goal["unit"] == "goal" and goal["units"] == 12 and goal["ci_high"] - goal["ci_low"] > 2 * (hi - lo)
