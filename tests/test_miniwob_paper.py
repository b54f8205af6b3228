"""MiniWoB++ in the paper's protocol (Digi-Q paper, Sec. 5.1): page splits for validation and demonstrations,
a pixel model that collects by sampling, and the pipeline's candidates from a model."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image
from script_helpers import load_script

from digiq.config import ConfigError, load_config
from digiq.envs import miniwob as mw
from digiq.errors import DigiqError
from digiq.stages import pipeline

ROOT = Path(__file__).resolve().parents[1]
HAS_BROWSER = Path("/usr/bin/chromium").exists() and Path("/usr/bin/chromedriver").exists()
TASKS = list(mw.DEFAULT_TASKS)


def _seeds(split: str, num: int, seed: int) -> list[tuple[str, int]]:
    return [(t.task_id, t.seed) for t in mw.task_instances(TASKS, split, num, seed)]


def test_train_and_test_pages_are_frozen() -> None:
    # Computed with the formula of earlier releases (train: seed * 10^6 + i; test: the same plus 10^9) before
    # val and demo were added: datasets and reported numbers keep their pages.
    assert _seeds("train", 4, 0) == [
        ("enter-password", 0),
        ("click-tab", 1),
        ("login-user", 2),
        ("click-checkboxes", 3),
    ]
    assert _seeds("test", 3, 0) == [
        ("enter-password", 1_000_000_000),
        ("click-tab", 1_000_000_001),
        ("login-user", 1_000_000_002),
    ]
    assert _seeds("train", 2, 7) == [("click-checkboxes", 7_000_000), ("enter-text", 7_000_001)]
    assert _seeds("test", 2, 3) == [("navigate-tree", 1_003_000_000), ("login-user", 1_003_000_001)]


def test_the_four_page_ranges_are_disjoint() -> None:
    # Each split's pages over every allowed seed and instance count: [lowest at seed 0, highest at the last
    # seed with the most instances]. The four intervals must not meet.
    spans = {}
    for split in ("train", "test", "val", "demo"):
        low = mw.task_instances(TASKS, split, 1, 0)[0].seed
        top = mw.task_instances(TASKS, split, 2, mw.MAX_SEED - 1)
        step = top[1].seed - top[0].seed  # seeds run base + i
        spans[split] = (low, top[0].seed + step * (mw.SEED_BLOCK - 1))
    ordered = sorted(spans.values())
    assert all(a[1] < b[0] for a, b in zip(ordered, ordered[1:])), spans
    # The same episodes (task order) on every split, on pages of its own.
    for split in ("val", "demo"):
        pages = _seeds(split, 24, 5)
        assert [t for t, _ in pages] == [t for t, _ in _seeds("test", 24, 5)]
        assert not {s for _, s in pages} & {s for sp in ("train", "test") for _, s in _seeds(sp, 24, 5)}


def test_bad_splits_and_seeds_are_named() -> None:
    with pytest.raises(ConfigError, match="'holdout'"):
        mw.task_instances(TASKS, "holdout", 2, 0)
    with pytest.raises(ConfigError, match=f"got {mw.MAX_SEED}"):
        mw.task_instances(TASKS, "train", 2, mw.MAX_SEED)
    with pytest.raises(ConfigError, match="got -1"):
        mw.task_instances(TASKS, "val", 2, -1)


def _tiny_policy(tmp_path: Path) -> Path:
    from digiq.models.tiny import parse_tiny_name
    from digiq.models.vlm import build_tiny_vlm, save_vlm

    family, spec = parse_tiny_name("tiny:idefics3@image_size=64,patch=16,hidden=32,layers=1")
    return save_vlm(*build_tiny_vlm(family, spec, seed=0), tmp_path / "policy")


def test_pipeline_runs_the_candidates_stage_when_a_model_collects_on_miniwob(tmp_path: Path) -> None:
    policy = str(_tiny_policy(tmp_path))
    base = [f"output_dir={tmp_path / 'p'}", "env=miniwob", f"collect.policy={policy}"]
    for source, frm in (("policy", "behaviour"), ("policy", "pi_beta")):
        cfg = load_config(
            pipeline.Config, None, [*base, f"candidates.source={source}", f"candidates_from={frm}"]
        )
        assert not pipeline.candidates_in_collection(cfg)
        wired = pipeline.wire(cfg)
        assert wired["collect"].num_candidates == 0 and wired["collect"].policy == policy
        want = policy if frm == "behaviour" else str(tmp_path / "p" / "bc" / "policy")
        assert wired["candidates"].policy == want
        # Every later stage reads the candidates stage's dataset, not the collection.
        data = str(tmp_path / "p" / pipeline.FOLDERS["candidates"])
        for stage in ("cache_features", "train_critic", "extract_policy"):
            assert wired[stage].dataset == data, stage
    # The scripted collection still draws the candidates itself (the DOM sampler needs the live page).
    scripted = load_config(pipeline.Config, ROOT / "configs/pipeline/miniwob.yaml", [])
    assert pipeline.candidates_in_collection(scripted)
    assert pipeline.wire(scripted)["train_critic"].dataset.endswith("/data")
    # A model collecting on MiniWoB++ with the scripted (simulator's) sampler has nowhere to get candidates.
    with pytest.raises(ConfigError, match="set candidates.source=policy"):
        load_config(pipeline.Config, None, [*base, "candidates.source=sim"])


def test_the_paper_recipe_collects_with_the_model_samples_it_and_evaluates_on_val(tmp_path: Path) -> None:
    model = str(_tiny_policy(tmp_path))  # stands in for data/pretrained/gui-tiny-web-agent
    cfg = load_config(
        pipeline.Config,
        ROOT / "configs/pipeline/miniwob-paper.yaml",
        [f"output_dir={tmp_path / 'p'}", f"collect.policy={model}"],
    )
    assert cfg.env == "miniwob" and not pipeline.candidates_in_collection(cfg)
    wired = pipeline.wire(cfg)
    assert wired["collect"].policy == model and wired["collect"].num_candidates == 0
    assert wired["candidates"].source == "policy" and wired["candidates"].policy == model
    assert wired["candidates"].temperature == 1.2 and wired["candidates"].num_candidates == 16
    assert wired["evaluate"].split == "val" and wired["evaluate"].env == "miniwob"
    assert wired["evaluate"].miniwob.tasks == list(mw.DEFAULT_TASKS)
    policies = pipeline._policies_to_evaluate(cfg)
    assert policies["behaviour"] == (model, 1.0) and policies["behaviour_greedy"] == (model, 0.0)
    assert set(policies) == {"behaviour", "behaviour_greedy", "bc", "extracted"}
    # The scripted recipe evaluates on test pages, as its numbers in docs/miniwob.md were measured.
    assert load_config(pipeline.Config, ROOT / "configs/pipeline/miniwob.yaml").evaluate.split == "test"


def test_the_pipeline_skips_the_candidates_stage_only_when_collection_drew_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stage loop itself: stages are replaced by recorders, nothing runs a browser or a model."""
    policy = str(_tiny_policy(tmp_path))
    ran: list[str] = []

    def fake(name, stage_cfg, cfg):
        ran.append(name)
        Path(stage_cfg.output_dir).mkdir(parents=True, exist_ok=True)
        return {}

    monkeypatch.setattr(pipeline, "_run_stage", fake)
    monkeypatch.setattr(pipeline, "describe", lambda: {})
    monkeypatch.setattr(pipeline, "matmul_gflops", lambda: 0.0)
    stages = "stages=[collect,candidates,cache_features]"
    paper = [f"collect.policy={policy}", "candidates.source=policy", stages]
    pipeline.run(load_config(pipeline.Config, None, [f"output_dir={tmp_path / 'a'}", "env=miniwob", *paper]))
    assert ran == ["collect", "candidates", "cache_features"]
    ran.clear()
    pipeline.run(load_config(pipeline.Config, None, [f"output_dir={tmp_path / 'b'}", "env=miniwob", stages]))
    assert ran == ["collect", "cache_features"]


@pytest.mark.miniwob
@pytest.mark.slow
@pytest.mark.skipif(not HAS_BROWSER, reason="needs Debian's chromium and chromium-driver")
def test_a_model_collects_miniwob_by_sampling_with_per_step_seeds(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    pytest.importorskip("miniwob")
    tmp_path = tmp_path_factory.mktemp("c")  # short: Chromium's socket path limit
    from digiq.data.schema import dataset_info, load_dataset
    from digiq.models.policy import generate_actions, load_policy
    from digiq.stages import collect

    policy = str(_tiny_policy(tmp_path))
    cfg = collect.Config(
        env="miniwob",
        output_dir=str(tmp_path / "data"),
        num_trajectories=3,
        split="val",
        policy=policy,
        temperature=1.0,
        seed=2,
        shard_size=2,
        num_workers=2,  # batches of two screens: each item still samples at its own step's seed
        miniwob=mw.MiniWoBConfig(
            tasks=["click-button", "focus-text"], max_steps=3, scratch_dir=str(tmp_path / "b")
        ),
    )
    stats = collect.run(cfg)
    ds = load_dataset(tmp_path / "data")
    info = dataset_info(tmp_path / "data")
    assert info["config"]["policy"] == policy and info["split"] == "val"
    assert stats["num_trajectories"] == 3 and sorted(set(ds["traj_id"])) == [0, 1, 2]
    assert all(c == [] for c in ds["candidates"])  # candidates come later, from a model, offline
    # Each stored action is the model's sample at that step's own seed on the stored screen and prompt.
    model, processor, spec = load_policy(policy, device="cpu")
    for row in ds:
        shot = row["screenshot"]
        shot = shot if isinstance(shot, Image.Image) else Image.open(io.BytesIO(shot["bytes"]))
        want = generate_actions(
            model,
            processor,
            [shot.convert("RGB")],
            [row["observation"]],
            temperature=1.0,
            seed=collect.step_seed(2, row["traj_id"], row["step_id"]),
            spec=spec,
        )[0][0]
        assert row["action"] == want, (row["traj_id"], row["step_id"])
    # The episodes ran on the validation pages of seed 2.
    goals = {t.task_id for t in mw.task_instances(cfg.miniwob.tasks, "val", 3, 2)}
    assert set(info["per_task_success"]) == goals
    assert len({a for a in ds["action"]}) > 1  # sampled, not one repeated output


def _behaviour_script():
    return load_script("make_behaviour_model")


def test_the_web_behaviour_model_recipe_demonstrates_on_demo_pages_and_evaluates_on_val() -> None:
    mod = _behaviour_script()
    cfg = load_config(mod.Config, ROOT / "configs/behaviour-model/miniwob.yaml")
    assert cfg.demonstrations.env == "miniwob" and cfg.demonstrations.split == "demo"
    assert mod._splits(cfg) == ["val"] and cfg.start == "data/pretrained/gui-tiny-web"
    # The expert on every step of every task: the tuned per-task table (noise) is cleared.
    assert cfg.demonstrations.miniwob_behaviour.p_optimal == 1.0
    assert cfg.demonstrations.miniwob_behaviour.p_optimal_by_task == {}
    with pytest.raises(DigiqError, match="train .* or demo"):
        load_config(mod.Config, ROOT / "configs/behaviour-model/miniwob.yaml", ["demonstrations.split=val"])


@pytest.mark.miniwob
@pytest.mark.slow
@pytest.mark.skipif(not HAS_BROWSER, reason="needs Debian's chromium and chromium-driver")
def test_make_behaviour_model_on_miniwob_end_to_end(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("miniwob")
    import json

    from digiq.data.schema import dataset_info, load_dataset

    monkeypatch.setenv("WANDB_MODE", "disabled")
    tmp = tmp_path_factory.mktemp("w")  # short: Chromium's socket path limit
    mod = _behaviour_script()
    start = _tiny_policy(tmp)
    cfg = load_config(
        mod.Config,
        ROOT / "configs/behaviour-model/miniwob.yaml",
        [
            f"output={tmp / 'out'}",
            f"work_dir={tmp / 'work'}",
            f"start={start}",
            "eval_episodes=2",
            "demonstrations.num_trajectories=3",
            "demonstrations.miniwob.tasks=[click-button]",
            f"demonstrations.miniwob.scratch_dir={tmp / 'b'}",
            "train_bc.train.max_steps=2",
            "train_bc.train.batch_size=4",
        ],
    )
    record = mod.run(cfg, "the command")
    demos = tmp / "work" / "demonstrations"
    info = dataset_info(demos)
    assert info["split"] == "demo" and info["success_rate"] == 1.0  # the expert solves click-button
    ds = load_dataset(demos)
    assert len(set(ds["traj_id"])) == 3
    assert set(record["success"]) == {"val/greedy", "val/sampled"}
    for name in ("greedy", "sampled"):
        m = json.loads((tmp / "work" / f"eval_val_{name}" / "metrics.json").read_text())
        assert m["env"] == "miniwob" and m["split"] == "val" and m["num_episodes"] == 2
    assert json.loads((tmp / "out" / mod.RECORD).read_text())["success"] == record["success"]
    card = (tmp / "out" / "README.md").read_text()
    assert "MiniWoB++ behaviour model" in card and "the command" in card
    for v in record["success"].values():
        assert f"{v['success_rate']:.3f} [{v['ci_low']:.3f}, {v['ci_high']:.3f}] | 2 |" in card
