"""scripts/gpu_check.sh, the prepared GPU check, on this CPU machine: its dry run prints every stage's command
and loads every stage's config; the real-size random model it builds loads and runs (shrunk here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from killresume import digiq_env
from PIL import Image

from digiq.actions import Action
from digiq.models import prompts as P
from digiq.models.vlm import answer_logits, load_vlm

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["sim collect", "finetune-vlm", "train-bc", "candidates", "cache-features", "train-critic",
          "extract-policy", "evaluate"]  # fmt: skip


def test_dry_run_covers_every_stage_and_loads_their_configs(tmp_path: Path) -> None:
    env = digiq_env(PYTHON=sys.executable, PATH=f"{Path(sys.executable).parent}:/usr/bin:/bin")
    r = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--out", str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "19 stage configs load" in out and not any(tmp_path.iterdir())  # nothing ran
    for stage in STAGES:
        assert f"gpu_run.py {stage.split()[-1]}" in out or f" {stage} " in out, stage
    assert "ddp_multi_gpu.yaml" in out and "fsdp_7b.yaml" in out and "--resume" in out
    assert "AutoModelForImageTextToText" in out  # the FSDP export is loaded with plain transformers


@pytest.mark.slow
def test_random_real_size_model_builds_and_runs(tmp_path: Path) -> None:
    """The LLaVA-1.5-7B architecture of gpu_check.sh, shrunk to one layer: the processor is the real one
    (336 px CLIP), load_vlm reads the folder and a forward runs on a phone-shaped screenshot."""
    out = tmp_path / "llava"
    r = subprocess.run([sys.executable, "scripts/make_random_vlm.py", "llava-1.5-7b", str(out), "--layers", "1",
                        "--hidden", "64", "--dtype", "float32"], cwd=ROOT, env=digiq_env(), capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    model, processor = load_vlm(str(out))
    screen = Image.new("RGB", (1080, 2400), (200, 200, 210))
    inputs = P.make_inputs(processor, [screen], ["Turn on wifi"], [None], [Action.tap(0.5, 0.5)], "overlay")
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 336, 336)
    with torch.no_grad():
        assert torch.isfinite(answer_logits(model, inputs)).all()
