"""scripts/gpu_check.sh, the prepared GPU check, on this CPU machine: its dry run runs from outside the repository
with a Python that has torch but not digiq installed, prints every stage's command and loads every stage's config;
its report is one JSON file; the real-size random model it builds loads and runs (shrunk here)."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
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


def _bare_python(where: Path, with_packages: bool) -> Path:
    """A throwaway venv of this interpreter that sees the test environment's packages (torch, transformers,
    ...) but not its editable install of digiq (a bare GPU machine's Python); or sees nothing at all."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True, timeout=120)
    python = where / "bin" / "python"
    if with_packages:
        purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
        # a plain path line: the directory joins sys.path, its own .pth files (the editable install) do not run
        (Path(purelib) / "test_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def _outside_env(python: Path) -> dict[str, str]:
    env = digiq_env(PYTHON=str(python), PATH=f"{Path(sys.executable).parent}:/usr/bin:/bin")
    env.pop("PYTHONPATH")  # nothing puts the repository on the path
    return env


def test_dry_run_from_outside_the_repository_without_digiq_installed(tmp_path: Path) -> None:
    python = _bare_python(tmp_path / "venv", with_packages=True)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = _outside_env(python)
    probe = subprocess.run(
        [str(python), "-c", "import digiq"], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert probe.returncode != 0 and "No module named 'digiq'" in probe.stderr  # the premise of the test

    out = tmp_path / "out"
    r = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), "--dry-run", "--out", str(out)], cwd=cwd,
                       env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    text = r.stdout
    assert f"[gpu_check] python: {python}" in text
    assert f"would install: {python} -m pip install --no-deps -e {ROOT}" in text  # reported, not run
    assert "21 stage configs load" in text and f"digiq from {ROOT / 'digiq'}" in text
    assert not out.exists() and not any(
        p.name != "venv" and p.name != "elsewhere" for p in tmp_path.iterdir()
    )
    for stage in STAGES:
        assert f"gpu_run.py {stage.split()[-1]}" in text or f" {stage} " in text, stage
    assert "ddp_multi_gpu.yaml" in text and "fsdp_7b.yaml" in text and "--resume" in text
    assert "AutoModelForImageTextToText" in text  # the FSDP export is loaded with plain transformers
    assert "make_random_vlm.py llava-1.5-7b" in text  # --full is the default


def test_quick_dry_run_keeps_fsdp_resume_and_export_on_one_gpu(tmp_path: Path) -> None:
    r = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), "--dry-run", "--quick", "--out", str(tmp_path)],
                       cwd=tmp_path, env=_outside_env(Path(sys.executable)), capture_output=True, text=True,
                       timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    labels = [line.split(":")[0].removeprefix("[gpu_check] ") for line in r.stdout.splitlines()]
    # FSDP (one process per visible GPU: one on one GPU), a kill, --resume and the export: not behind NGPU > 1
    fsdp = ["fsdp-finetune-vlm", "fsdp-kill", "fsdp-finetune-vlm-resume", "fsdp-export-loads"]
    assert all(label in labels for label in fsdp), labels
    assert not any("7b" in label for label in labels)  # --quick: the tiny model only
    assert "15 stage configs load" in r.stdout  # 8 stages, 2 FSDP runs, 5 DDP (a dry run prints them)


def test_a_python_without_torch_is_refused_clearly(tmp_path: Path) -> None:
    python = _bare_python(tmp_path / "venv", with_packages=False)
    r = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), "--dry-run", "--out", str(tmp_path / "o")],
                       cwd=tmp_path, env=_outside_env(python), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 1
    assert f"[gpu_check] python: {python}" in r.stdout
    assert f"gpu_check.sh: {python} has no torch" in r.stderr and "never installs torch" in r.stderr


def test_report_is_one_json_per_run(tmp_path: Path) -> None:
    """gpu_run.py --report: per step label, command, rc, wall seconds and peak GPU MiB (max over processes),
    with the versions and the GPU name."""
    steps = [
        {"label": "collect", "command": "gpu_run.py collect sim collect", "rc": 0, "wall_s": 3.5},
        {
            "label": "fsdp-finetune-vlm",
            "command": "accelerate launch ... finetune-vlm",
            "rc": 1,
            "wall_s": 20.0,
        },
        {"label": "fsdp-kill", "command": "rm -rf x", "rc": 0, "wall_s": 0.01},
    ]
    procs = [
        {"label": "collect", "rank": 0, "processes": 1, "peak_mib": 0, "exit": 0},
        {
            "label": "fsdp-finetune-vlm",
            "rank": 0,
            "processes": 2,
            "peak_mib": 900,
            "distributed": "FSDP",
            "exit": 1,
        },
        {
            "label": "fsdp-finetune-vlm",
            "rank": 1,
            "processes": 2,
            "peak_mib": 1200,
            "distributed": "FSDP",
            "exit": 1,
        },
    ]
    (tmp_path / "steps.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    (tmp_path / "gpu_check.jsonl").write_text("".join(json.dumps(p) + "\n" for p in procs))
    env = _outside_env(Path(sys.executable))
    r = subprocess.run([sys.executable, str(ROOT / "scripts/gpu_run.py"), "--report", str(tmp_path)], cwd=tmp_path,
                       env={**env, "DIGIQ_GPU_MODE": "quick"}, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    import transformers

    assert doc["torch"] == torch.__version__ and doc["transformers"] == transformers.__version__
    assert doc["mode"] == "quick" and doc["ok"] is False and doc["gpus"] == torch.cuda.device_count()
    assert [s["label"] for s in doc["steps"]] == ["collect", "fsdp-finetune-vlm", "fsdp-kill"]
    fsdp = doc["steps"][1]
    assert (
        fsdp["rc"] == 1 and fsdp["wall_s"] == 20.0 and fsdp["peak_gpu_mib"] == 1200 and fsdp["processes"] == 2
    )
    assert doc["steps"][2]["peak_gpu_mib"] is None  # a shell step: no GPU process of its own
    assert doc["total_wall_s"] == 23.5 and "| fsdp-finetune-vlm | 1 | 2 | FSDP | 20.0 | 1200 |" in r.stdout
    assert fsdp["distributed"] == "FSDP" and doc["steps"][0]["distributed"] is None  # what accelerate ran


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
