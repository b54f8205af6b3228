"""MetricsLogger and wandb: ``WANDB_MODE`` in the environment overrides the config's mode, and wandb is imported
only when it is enabled (a machine without wandb runs with it disabled)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from digiq.config import WandbConfig
from digiq.errors import DigiqError
from digiq.utils.logging import MetricsLogger, read_metrics, wandb_mode


@pytest.fixture
def no_wandb(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError


@pytest.fixture
def fake_wandb(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    calls: list[dict] = []

    def init(**kwargs: object) -> types.SimpleNamespace:
        calls.append(kwargs)
        return types.SimpleNamespace(id="run1", log=lambda *a, **k: None, finish=lambda: None)

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    return calls


def test_env_disabled_overrides_the_default_offline_and_never_imports_wandb(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_wandb: None
) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    log = MetricsLogger(tmp_path, WandbConfig(), config={"a": 1})  # the config's default: offline
    log.log({"loss": 0.5}, step=1)
    log.finish()
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 0.5}]
    assert not (tmp_path / "wandb_run_id.txt").exists()


def test_env_mode_wins_over_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_wandb) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    MetricsLogger(tmp_path, WandbConfig(mode="online"))
    assert fake_wandb[-1]["mode"] == "offline"
    monkeypatch.setenv("WANDB_MODE", "dryrun")  # wandb's older name for offline
    assert wandb_mode(WandbConfig(mode="online")) == "offline"
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_mode(WandbConfig(mode="online")) == "online"
    assert wandb_mode(None) == "disabled"


def test_missing_wandb_when_enabled_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_wandb: None
) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with pytest.raises(
        DigiqError, match="wandb.mode=offline but wandb is not installed.*WANDB_MODE=disabled"
    ):
        MetricsLogger(tmp_path, WandbConfig(mode="offline"))
    MetricsLogger(tmp_path, WandbConfig(mode="disabled")).log({"x": 1}, step=0)  # fine without wandb


def test_a_bad_env_mode_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "of")
    with pytest.raises(DigiqError, match="WANDB_MODE='of'"):
        wandb_mode(WandbConfig())
