"""Config machinery: YAML + dotted overrides, errors before work, and every YAML in configs/ parses."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import sys
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


@dataclasses.dataclass
class WithFactory:
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=0.5, max_grad_norm=2.0))


def test_partial_override_keeps_parent_factory_defaults(tmp_path: Path) -> None:
    cfg = load_config(WithFactory, None, ["optim.warmup_ratio=0.1"])
    assert cfg.optim.lr == 0.5 and cfg.optim.max_grad_norm == 2.0 and cfg.optim.warmup_ratio == 0.1
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 0.25\n")
    cfg = load_config(WithFactory, p)
    assert cfg.optim.lr == 0.25 and cfg.optim.max_grad_norm == 2.0


@dataclasses.dataclass
class WithTable:
    # a dict-typed field whose keys have hyphens (as MiniWoB++ task names do)
    per_task: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"click-button": 0.1, "enter-text": 0.4}
    )
    max_steps: int = 10
    inner: Inner = dataclasses.field(default_factory=Inner)


def test_hyphens_read_as_underscores_only_in_field_names(tmp_path: Path) -> None:
    # A dotted key into a dict field keeps its hyphens (it once became 'click_button', a new key that
    # nothing read) and sets one entry on top of the defaults; field names still accept '-' for '_'.
    cfg = load_config(WithTable, None, ["per_task.click-button=1.0", "--max-steps=3", "inner.lr=0.5"])
    assert cfg.per_task == {"click-button": 1.0, "enter-text": 0.4}
    assert cfg.max_steps == 3 and cfg.inner.lr == 0.5
    cfg = load_config(WithTable, None, ["per-task.new-task=0.2"])
    assert cfg.per_task == {"click-button": 0.1, "enter-text": 0.4, "new-task": 0.2}


def test_whole_mapping_replaces_a_dict_field(tmp_path: Path) -> None:
    assert load_config(WithTable, None, ["per_task={}"]).per_task == {}
    assert load_config(WithTable, None, ["per_task={focus-text: 0.3}"]).per_task == {"focus-text": 0.3}
    # In YAML too; a dotted override then adds to the file's mapping, not to the defaults.
    p = tmp_path / "c.yaml"
    p.write_text("per_task: {click-tab: 0.5}\ninner:\n  lr: 0.25\n")
    cfg = load_config(WithTable, p, ["per_task.click-link=0.7"])
    assert cfg.per_task == {"click-tab": 0.5, "click-link": 0.7}
    assert cfg.inner.lr == 0.25 and cfg.inner.widths == (8, 8)  # dataclass sections still merge
    out = save_config(cfg, tmp_path / "run")
    assert load_config(WithTable, out) == cfg


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


# configs/<folder> of a recipe script rather than a digiq command: the script whose Config reads it.
SCRIPT_CONFIGS = {"behaviour-model": "scripts/make_behaviour_model.py"}


def _script_module(path: str):
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_yaml_in_configs_parses() -> None:
    """configs/<command>/*.yaml must load against that command's Config (configs/accelerate is accelerate's;
    a recipe script's folder loads against the script's Config)."""
    files = sorted((ROOT / "configs").glob("*/*.yaml"))
    checked = 0
    for f in files:
        if f.parent.name == "accelerate":
            continue
        if f.parent.name in SCRIPT_CONFIGS:
            load_config(_script_module(SCRIPT_CONFIGS[f.parent.name]).Config, f)
            checked += 1
            continue
        command = _command_for(f.parent)
        assert command in COMMANDS, f"{f}: folder name is not a digiq command"
        module = importlib.import_module(COMMANDS[command][0])
        load_config(module.Config, f)
        checked += 1
    assert checked == len([f for f in files if f.parent.name != "accelerate"])
