"""Precision defaults: ``mixed_precision: auto`` and ``model.dtype: auto`` are bf16 on a bf16 GPU and exactly the
float32 run of before on the CPU; the launcher's precision is followed, and a contradiction is a ConfigError."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from digiq.cli import COMMANDS
from digiq.config import ConfigError, load_config
from digiq.models.vlm import inference_dtype
from digiq.training.accelerator import make_accelerator, resolve_mixed_precision, train_dtype

ROOT = Path(__file__).resolve().parents[1]
# The two critic configs that reproduce the official trainer in float32 on purpose (they say so).
FLOAT32_ON_PURPOSE = {"train-critic/official-aitw.yaml", "train-critic/aitw.yaml"}


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16-capable CUDA device, as far as the resolution functions can tell."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


@pytest.fixture(autouse=True)
def no_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)


def test_auto_is_no_on_the_cpu_and_bf16_on_a_bf16_gpu(fake_cuda: None) -> None:
    assert resolve_mixed_precision("auto", cpu=True) == "no"
    assert resolve_mixed_precision("auto", cpu=False) == "bf16"


def test_auto_without_cuda_is_no(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_mixed_precision("auto", cpu=False) == "no"


def test_auto_on_a_gpu_without_bf16_is_no(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_mixed_precision("auto", cpu=False) == "no"


def test_auto_follows_the_launcher(monkeypatch: pytest.MonkeyPatch, fake_cuda: None) -> None:
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert resolve_mixed_precision("auto", cpu=False) == "bf16"
    assert resolve_mixed_precision("auto", cpu=True) == "bf16"  # the launcher said so
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert resolve_mixed_precision("auto", cpu=False) == "fp16"
    # accelerate writes 'no' when its config has no precision: no opinion, auto still picks bf16 on a GPU
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert resolve_mixed_precision("auto", cpu=False) == "bf16"
    assert resolve_mixed_precision("auto", cpu=True) == "no"


def test_explicit_settings_are_kept_unless_the_launcher_disagrees(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_mixed_precision("no", cpu=False, launcher=None) == "no"
    assert resolve_mixed_precision("bf16", cpu=True, launcher=None) == "bf16"
    assert resolve_mixed_precision("bf16", cpu=False, launcher="no") == "bf16"
    assert resolve_mixed_precision("bf16", cpu=False, launcher="bf16") == "bf16"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(
        ConfigError, match=r"train\.mixed_precision=no .*launcher asks for mixed_precision bf16"
    ):
        resolve_mixed_precision("no", cpu=False, name="train.mixed_precision")
    with pytest.raises(ConfigError, match="mixed_precision=fp16"):
        resolve_mixed_precision("fp16", cpu=False)


def test_the_7b_launcher_with_the_old_default_is_refused_not_silently_fp32(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """fsdp_7b.yaml says bf16; train-bc with an explicit 'no' used to override it without a word."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(ConfigError, match="train.mixed_precision"):
        make_accelerator("no", cpu=True, name="train.mixed_precision")


def test_cpu_accelerator_is_the_float32_run_of_before() -> None:
    acc = make_accelerator(cpu=True)
    assert acc.mixed_precision == "no" and acc.device.type == "cpu"
    assert train_dtype("auto", acc, frozen_base=True) == "float32"
    assert inference_dtype("auto", acc.device) == "float32"


def _acc(distributed: DistributedType = DistributedType.NO, mixed: str = "bf16") -> SimpleNamespace:
    return SimpleNamespace(
        device=torch.device("cuda", 0), mixed_precision=mixed, distributed_type=distributed
    )


def test_train_dtype_on_a_gpu(fake_cuda: None) -> None:
    assert train_dtype("auto", _acc(), frozen_base=True) == "bfloat16"  # LoRA: the frozen base in bf16
    assert train_dtype("auto", _acc(), frozen_base=False) == "float32"  # full fine-tune: fp32 master weights
    # FSDP: accelerate upcasts the sharded parameters to float32 master weights itself
    assert train_dtype("auto", _acc(DistributedType.FSDP), frozen_base=False) == "bfloat16"
    assert train_dtype("auto", _acc(mixed="no"), frozen_base=True) == "float32"  # asked for float32
    assert train_dtype("float16", _acc(), frozen_base=False) == "float16"  # explicit wins


def _stage_configs(folder: str) -> list[Path]:
    return sorted((ROOT / "configs" / folder).glob("*.yaml"))


def _precision(cfg: object) -> str:
    train = getattr(cfg, "train", None)
    return train.mixed_precision if train is not None else cfg.mixed_precision  # type: ignore[attr-defined]


@pytest.mark.parametrize("folder", ["finetune-vlm", "train-bc", "extract-policy", "train-critic"])
def test_shipped_trainer_configs_are_bf16_on_a_gpu(folder: str, fake_cuda: None, monkeypatch) -> None:
    module = importlib.import_module(COMMANDS[folder][0])
    files = _stage_configs(folder)
    for f in [None, *files]:  # the defaults too
        cfg = module.Config() if f is None else load_config(module.Config, f)
        name = "defaults" if f is None else f"{folder}/{f.name}"
        if name in FLOAT32_ON_PURPOSE:
            assert resolve_mixed_precision(_precision(cfg), cpu=False) == "no", name
            continue
        assert resolve_mixed_precision(_precision(cfg), cpu=False) == "bf16", name
        assert resolve_mixed_precision(_precision(cfg), cpu=True) in ("no", "bf16"), name
        # and under fsdp_7b.yaml's bf16 launcher: no contradiction
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
        assert resolve_mixed_precision(_precision(cfg), cpu=False) == "bf16", name
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
        model = getattr(cfg, "model", None)
        if model is not None:
            assert model.dtype in ("auto", "bfloat16"), name
            bf16 = train_dtype(model.dtype, _acc(), frozen_base=True)
            assert bf16 == "bfloat16", name


@pytest.mark.parametrize("folder", ["cache-features", "candidates", "evaluate"])
def test_shipped_inference_configs_are_bf16_on_a_gpu(folder: str, fake_cuda: None) -> None:
    module = importlib.import_module(COMMANDS[folder][0])
    for f in [None, *_stage_configs(folder)]:
        cfg = module.Config() if f is None else load_config(module.Config, f)
        dtype = cfg.model.dtype if folder == "cache-features" else cfg.dtype
        assert inference_dtype(dtype, torch.device("cuda", 0)) == "bfloat16", (folder, f)
        assert inference_dtype(dtype, torch.device("cpu")) in ("float32", dtype), (folder, f)
