"""`digiq pipeline env=miniwob` end to end in a real headless Chromium (tiny sizes; marked miniwob + slow)."""

from __future__ import annotations

from pathlib import Path

import pytest

from digiq.config import load_config
from digiq.data.schema import dataset_info, load_dataset
from digiq.stages import pipeline
from digiq.utils.io import is_complete

pytest.importorskip("miniwob")
ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.miniwob,
    pytest.mark.slow,
    pytest.mark.skipif(
        not (Path("/usr/bin/chromium").exists() and Path("/usr/bin/chromedriver").exists()),
        reason="needs Debian's chromium and chromium-driver",
    ),
]


def test_pipeline_on_miniwob_from_collection_to_fresh_seed_evaluation(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    out = tmp_path_factory.mktemp("mw") / "p"
    cfg = load_config(
        pipeline.Config,
        ROOT / "configs/pipeline/miniwob-smoke.yaml",
        [
            f"output_dir={out}",
            f"collect.miniwob.scratch_dir={out.parent / 'b'}",
            f"evaluate.miniwob.scratch_dir={out.parent / 'b'}",
        ],
    )
    summary = pipeline.run(cfg)
    for stage, folder in pipeline.FOLDERS.items():
        if stage != "candidates":  # drawn during collection on MiniWoB++
            assert is_complete(out / folder), stage
    assert not (out / pipeline.FOLDERS["candidates"]).exists()
    ds = load_dataset(out / "data")
    info = dataset_info(out / "data")
    assert info["source"] == "miniwob" and info["num_trajectories"] == 12
    assert all(len(c) == 4 and c[0] == a for c, a in zip(ds["candidates"], ds["action"]))
    assert set(ds["state_key"]) == {""}  # no simulator state: the critic is not scored against Q*
    tasks = {"click-button", "enter-text", "click-checkboxes"}
    assert set(info["per_task_success"]) == tasks
    ev = summary["stages"]["evaluate"]["metrics"]
    assert set(ev) == {"behaviour", "bc", "extracted"}
    import json

    for label in ev:
        m = json.loads((out / "eval" / label / "metrics.json").read_text())
        assert m["env"] == "miniwob" and m["num_episodes"] == 6 and set(m["per_task"]) <= tasks
    assert "val/q_mc_pearson" in summary["stages"]["train_critic"]["metrics"]
