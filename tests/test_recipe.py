"""The pipeline's recipe lives in one file, configs/pipeline/default.yaml, and the stage-by-stage commands of
docs/usage.md resolve to the same stage settings as the pipeline's stage sections."""

from __future__ import annotations

import dataclasses
import importlib
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from digiq import cli
from digiq.config import load_config, to_dict
from digiq.stages import pipeline

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/pipeline/default.yaml"


def _merged(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` laid over ``base`` key by key (mappings merge, everything else replaces)."""
    out = dict(base)
    for k, v in update.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _first_difference(a: Any, b: Any, where: str = "") -> str | None:
    """The dotted name of the first field where ``a`` and ``b`` differ, with both values; None when equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            diff = _first_difference(a.get(k), b.get(k), f"{where}.{k}" if where else k)
            if diff:
                return diff
        return None
    return None if a == b else f"{where}: {a!r} != {b!r}"


def _tree(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def test_print_config_is_the_default_yaml_over_the_stage_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # the recipe is found from any working directory
    assert cli.main(["pipeline", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = _merged(to_dict(pipeline.Config()), _tree(RECIPE))
    assert printed == expected, _first_difference(printed, expected)
    assert not any(tmp_path.iterdir())  # printed, nothing run


def test_default_yaml_keys_are_all_real_fields() -> None:
    def walk(tree: dict[str, Any], cfg: Any, where: str) -> None:
        names = {f.name for f in dataclasses.fields(cfg)}
        for key, value in tree.items():
            assert key in names, f"{RECIPE}: {where}{key} is not a field of {type(cfg).__name__}"
            field = getattr(cfg, key)
            if dataclasses.is_dataclass(field):
                assert isinstance(value, dict), f"{where}{key} must be a mapping"
                walk(value, field, f"{where}{key}.")

    walk(_tree(RECIPE), pipeline.Config(), "")


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs/pipeline").glob("*.yaml")))
def test_pipeline_yamls_are_read_over_the_recipe(name: str) -> None:
    """smoke.yaml and the others change the recipe key by key: what they leave out is the recipe's."""
    got = to_dict(load_config(pipeline.Config, ROOT / "configs/pipeline" / name))
    expected = _merged(
        _merged(to_dict(pipeline.Config()), _tree(RECIPE)), _tree(ROOT / "configs/pipeline" / name)
    )
    assert got == expected, _first_difference(got, expected)


def test_a_missing_recipe_is_one_clear_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(pipeline.Config, "RECIPE", "configs/pipeline/missing.yaml")
    assert cli.main(["pipeline", "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "configs/pipeline/missing.yaml" in err and "missing" in err


# --------------------------------------------------------------------------------------------------
# docs/usage.md's stage-by-stage commands against the pipeline's stage sections
# --------------------------------------------------------------------------------------------------

STAGE_OF = {
    "sim collect": "collect",
    "collect": "collect",
    "train-bc": "train_bc",
    "finetune-vlm": "finetune_vlm",
    "candidates": "candidates",
    "cache-features": "cache_features",
    "train-critic": "train_critic",
    "extract-policy": "extract_policy",
    "evaluate": "evaluate",
}
# Inputs and outputs, which the pipeline wires under its output_dir (model: the Stage-1 output it reads).
PATHS = {
    "collect": {"output_dir"},
    "train_bc": {"dataset", "output_dir"},
    "finetune_vlm": {"dataset", "output_dir"},
    "candidates": {"dataset", "output_dir", "policy"},
    "cache_features": {"dataset", "output_dir", "model.name_or_path"},
    "train_critic": {"dataset", "output_dir", "features"},
    "extract_policy": {"dataset", "output_dir", "features", "critic_dir", "init_policy"},
    "evaluate": {"output_dir", "policy"},
}
# A documented ablation: the pipeline with the same switch.
ABLATIONS = {"configs/train-critic/mc.yaml": ["train_critic.critic_loss=mc"]}


def _usage_commands() -> list[tuple[str, str | None, list[str]]]:
    """(command, --config, key=value overrides) of each digiq command in docs/usage.md's stage-by-stage block
    that runs on the simulated data (the real-data ones, e.g. LLaVA on data/webshop, are other recipes)."""
    text = (ROOT / "docs/usage.md").read_text()
    block = text.split("## Stage by stage", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        tokens = shlex.split(line, comments=True)
        if "digiq" not in tokens:
            continue
        rest = tokens[tokens.index("digiq") + 1 :]
        command = " ".join(rest[:2]) if rest[0] == "sim" else rest[0]
        rest = rest[2:] if rest[0] == "sim" else rest[1:]
        config = rest[rest.index("--config") + 1] if "--config" in rest else None
        overrides = [t for t in rest if "=" in t]
        dataset = dict(o.split("=", 1) for o in overrides).get("dataset", "data/sim")
        if command in STAGE_OF and dataset.startswith("data/sim"):
            out.append((command, config, overrides))
    return out


def _drop(tree: dict[str, Any], dotted: set[str]) -> dict[str, Any]:
    tree = {k: dict(v) if isinstance(v, dict) else v for k, v in tree.items()}
    for key in dotted:
        head, _, tail = key.partition(".")
        if tail:
            tree[head].pop(tail)
        else:
            tree.pop(head)
    return tree


def _model_path(tree: dict[str, Any]) -> None:
    """A model folder named relative to the repository or the working directory, as one absolute path."""
    model = tree.get("model")
    if isinstance(model, dict) and "name_or_path" in model and (ROOT / model["name_or_path"]).exists():
        model["name_or_path"] = str((ROOT / model["name_or_path"]).resolve())


def test_usage_commands_cover_every_stage() -> None:
    covered = {STAGE_OF[c] for c, _, _ in _usage_commands()}
    assert covered == set(pipeline.STAGES), (
        f"not in docs/usage.md's stage-by-stage block: {set(pipeline.STAGES) - covered}"
    )


@pytest.mark.parametrize("command,config,overrides", _usage_commands(), ids=lambda v: str(v))
def test_stage_by_stage_commands_resolve_to_the_pipelines_settings(
    command: str, config: str | None, overrides: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)  # the commands are run from the repository root
    stage = STAGE_OF[command]
    cls = importlib.import_module(cli.COMMANDS[command][0]).Config
    own = to_dict(load_config(cls, ROOT / config if config else None, overrides))
    wired = pipeline.wire(load_config(pipeline.Config, None, ABLATIONS.get(config or "", [])))[stage]
    theirs = to_dict(wired)
    own, theirs = _drop(own, PATHS[stage]), _drop(theirs, PATHS[stage])
    _model_path(own), _model_path(theirs)
    diff = _first_difference(own, theirs)
    assert diff is None, f"`digiq {command} --config {config}` differs from the pipeline's {stage}: {diff}"
