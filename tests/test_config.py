"""Config machinery: YAML + dotted overrides, errors before work, and every YAML in configs/ parses."""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import pytest

from digiq.cli import COMMANDS, describe_config
from digiq.config import ConfigError, OptimConfig, load_config, save_config, to_dict

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Inner:
    # learning rate
    lr: float = 1e-3
    widths: tuple[int, ...] = (8, 8)


@dataclasses.dataclass
class Outer:
    name: str = "x"
    steps: int = 10
    flag: bool = False
    inner: Inner = dataclasses.field(default_factory=Inner)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)

    def validate(self) -> None:
        if self.steps <= 0:
            raise ConfigError("steps must be > 0")


def test_yaml_then_overrides(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("steps: 5\ninner:\n  lr: 0.5\n")
    cfg = load_config(Outer, p, ["inner.widths=[4, 2, 1]", "--flag=true", "optim.lr=3e-4"])
    assert cfg.steps == 5 and cfg.inner.lr == 0.5 and cfg.inner.widths == (4, 2, 1)
    assert cfg.flag is True and cfg.optim.lr == pytest.approx(3e-4)
    # the resolved config round-trips through YAML
    out = save_config(cfg, tmp_path / "run")
    assert load_config(Outer, out) == cfg
    assert to_dict(cfg)["inner"]["widths"] == [4, 2, 1]


def test_unknown_key_suggests(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="inner.lrr.*did you mean 'lr'"):
        load_config(Outer, None, ["inner.lrr=1"])
    p = tmp_path / "bad.yaml"
    p.write_text("stepz: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*stepz.*did you mean 'steps'"):
        load_config(Outer, p)


@pytest.mark.parametrize(
    "override, message",
    [
        ("steps=abc", "expected an integer"),
        ("flag=maybe", "true/false"),
        ("optim.scheduler=cos", "not one of"),
        ("steps=0", "must be > 0"),
        ("noequals", "key=value"),
    ],
)
def test_bad_values(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, None, [override])


def test_describe_config_has_comments() -> None:
    text = "\n".join(describe_config(Outer))
    assert "inner.lr = 0.001" in text and "learning rate" in text


def _command_for(config_dir: Path) -> str:
    return config_dir.name.replace("_", " ") if config_dir.name.startswith("sim") else config_dir.name


def test_every_yaml_in_configs_parses() -> None:
    """configs/<command>/*.yaml must load against that command's Config (configs/accelerate is accelerate's)."""
    files = sorted((ROOT / "configs").glob("*/*.yaml"))
    checked = 0
    for f in files:
        if f.parent.name == "accelerate":
            continue
        command = _command_for(f.parent)
        assert command in COMMANDS, f"{f}: folder name is not a digiq command"
        module = importlib.import_module(COMMANDS[command][0])
        load_config(module.Config, f)
        checked += 1
    assert checked == len([f for f in files if f.parent.name != "accelerate"])
