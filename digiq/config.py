"""Nested dataclass configs, YAML files and dotted CLI overrides.

Every stage owns one top-level dataclass (defined next to its recipe in ``digiq/stages``); the shared
pieces (optimiser, LoRA, wandb, model) live here. A config is resolved in three layers, later wins:

1. the dataclass defaults,
2. the class's recipe file, when it names one (``RECIPE``, repository-relative: ``digiq pipeline`` reads
   ``configs/pipeline/default.yaml``),
3. a YAML file (``--config configs/train-critic/td.yaml``),
4. dotted overrides on the command line (``critic.lr=3e-4 output_dir=runs/x``).

Unknown keys and wrong types fail *before* any work starts, with the file or flag that caused them and a
"did you mean" hint (lerobot validates the same way, ``cfg.validate()`` before distributed init). The
resolved config is written next to every output (:func:`save_config`) so a run can be re-created.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from digiq.models.shipped import REPO_ROOT
from digiq.utils.io import atomic_write_text

T = TypeVar("T")

CONFIG_FILENAME = "config.yaml"


class ConfigError(ValueError):
    """A config that cannot be used: unknown key, wrong type, or a value that fails validation."""


# --------------------------------------------------------------------------------------------------
# Shared sub-configs
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class WandbConfig:
    # 'offline' writes runs under <output_dir>/wandb (sync later with `wandb sync`); 'online' needs a key;
    # 'disabled' skips wandb entirely. Never defaults to online: without an API key wandb.init fails at once.
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "digiq"
    entity: str | None = None
    # Run name; defaults to the output directory's name.
    name: str | None = None


@dataclasses.dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    # Linear warm-up as a fraction of the total optimiser steps (the official LLaVA SFT uses 0.03).
    warmup_ratio: float = 0.03
    scheduler: Literal["cosine", "constant", "linear"] = "cosine"
    max_grad_norm: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)

    def validate(self, where: str = "optim") -> None:
        check(self.lr > 0, f"{where}.lr must be > 0, got {self.lr}")
        check(0 <= self.warmup_ratio < 1, f"{where}.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        check(self.max_grad_norm >= 0, f"{where}.max_grad_norm must be >= 0 (0 disables clipping)")


@dataclasses.dataclass
class LoraConfig:
    # Off: full fine-tuning (the right choice for the tiny random models of the simulated device; the
    # official Stage 1 also fine-tunes LLaVA fully, finetune.sh). On: peft LoRA on the language model.
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # Regex over module names; covers LLaVA/Qwen/PaliGemma (language_model) and Idefics3/SmolVLM (text_model).
    target_modules: str = r".*(language_model|text_model).*\.(q_proj|k_proj|v_proj|o_proj)"

    def validate(self, where: str = "lora") -> None:
        check(self.r > 0, f"{where}.r must be > 0")
        check(0 <= self.dropout < 1, f"{where}.dropout must be in [0, 1)")


@dataclasses.dataclass
class ModelConfig:
    # A hub id (e.g. llava-hf/llava-1.5-7b-hf), a local save_pretrained folder, or 'tiny:<family>' for a
    # random tiny model built from a config object (families: llava, qwen2-vl, qwen2.5-vl, idefics3,
    # smolvlm, paligemma). Nothing is downloaded when HF_HUB_OFFLINE=1 or the path is local.
    name_or_path: str = "tiny:llava"
    # Weights' dtype. 'auto': float32 on the CPU; on a bf16 GPU bfloat16 for the frozen models of inference
    # stages (cache-features, candidates, evaluate) and for trained models whose float32 master weights are
    # kept elsewhere (a LoRA base, FSDP), else float32 (digiq.training.accelerator.train_dtype).
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    gradient_checkpointing: bool = False
    attn_implementation: str | None = "sdpa"
    # Qwen-VL families only: the image processor's pixel budget per screenshot (null = the checkpoint's own,
    # which keeps a phone screen near its full resolution; docs/distributed.md, "Qwen2-VL's image tokens").
    max_pixels: int | None = None
    min_pixels: int | None = None
    # Seed for the random weights of 'tiny:' models.
    tiny_seed: int = 0


# --------------------------------------------------------------------------------------------------
# Machinery
# --------------------------------------------------------------------------------------------------


def check(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)


def suggest(key: str, options: typing.Iterable[str]) -> str:
    """ " (did you mean 'x'?)" for the option closest to ``key``, or ""."""
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise a ConfigError naming ``where``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is typing.Union or origin is types.UnionType:
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: cannot be {value!r}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {list(allowed)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(f"{where}: {value!r} is not one of {[m.value for m in tp]}") from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from a (possibly partial) nested dict; unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        name = f"{where}.{k}" if where else k
        raise ConfigError(
            f"unknown config key '{name}'{suggest(k, fields)}; valid keys here: {sorted(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{where}.{name}" if where else name)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain nested dict (tuples as lists, enums as values) that YAML can write and from_dict can read."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, enum.Enum):
            return v.value
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(cfg)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            node[p] = nxt
        node = nxt
    node[parts[-1]] = value


class _Whole(dict):
    """A mapping given whole for a ``dict``-typed field (``field={...}`` or ``field:`` in YAML): it replaces the
    field's value instead of merging into it, so ``p_optimal_by_task={}`` clears the defaults. A dotted
    ``field.key=value`` still sets one entry on top of them."""


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, _Whole) or not (isinstance(v, dict) and isinstance(out.get(k), dict)):
            out[k] = v
        elif isinstance(out[k], _Whole):
            out[k] = _Whole(_merge(out[k], v))
        else:
            out[k] = _merge(out[k], v)
    return out


def _unwrap(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _unwrap(v) for k, v in tree.items()}
    return tree


def _field_type(cls: Any, name: str) -> Any:
    """The annotated type of dataclass field ``name`` of ``cls`` (Optional unwrapped), or None."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        return None
    tp = typing.get_type_hints(cls).get(name)
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else tp
    return tp


def _is_dict_type(tp: Any) -> bool:
    return get_origin(tp) is dict or tp is dict


def _mark_whole(cls: Any, tree: dict[str, Any]) -> dict[str, Any]:
    """Wrap the mappings that ``tree`` (a YAML file's contents) gives for dict-typed fields in ``_Whole``."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        tp = _field_type(cls, k)
        if isinstance(v, dict) and _is_dict_type(tp):
            out[k] = _Whole(v)
        elif isinstance(v, dict) and dataclasses.is_dataclass(tp):
            out[k] = _mark_whole(tp, v)
        else:
            out[k] = v
    return out


def _key_parts(cls: Any, key: str) -> tuple[list[str], bool]:
    """Split a dotted override key; ``-`` reads as ``_`` in dataclass field names (``--train.batch-size``), never
    in the keys of a dict-typed field (MiniWoB++ task names have hyphens). Also says whether the key ends on
    a dict-typed field (its value then replaces the field's, see ``_Whole``)."""
    parts = key.split(".")
    out: list[str] = []
    tp: Any = cls
    for i, p in enumerate(parts):
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            names = {f.name for f in dataclasses.fields(tp)}
            name = p.replace("-", "_") if p not in names and p.replace("-", "_") in names else p
            out.append(name)
            tp = _field_type(tp, name)
        else:  # inside a dict-typed (or unknown) field: keys stay as written
            out.extend(parts[i:])
            return out, False
    return out, _is_dict_type(tp)


def parse_overrides(overrides: typing.Sequence[str], cls: Any) -> dict[str, Any]:
    """``["a.b=3", "--c=x"]`` -> ``{"a": {"b": 3}, "c": "x"}``; values are parsed as YAML scalars.

    Keys are read against the config class ``cls``: ``-`` reads as ``_`` only in its dataclass field names, and a
    mapping given whole for a dict-typed field replaces that field's value.
    """
    tree: dict[str, Any] = {}
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. critic.lr=3e-4)")
        key, raw = text.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        parts, whole = _key_parts(cls, key)
        if whole and isinstance(value, dict):
            value = _Whole(value)
        _set_dotted(tree, ".".join(parts), value)
    return tree


def recipe_path(cls: type) -> Path | None:
    """The YAML file a config class reads before any ``--config`` (its ``RECIPE`` class attribute, relative to
    the repository, so it is found from any working directory), or None when the class names none."""
    recipe = getattr(cls, "RECIPE", None)
    if not recipe:
        return None
    path = REPO_ROOT / recipe
    if not path.is_file():
        raise ConfigError(f"the default recipe {path} of {cls.__module__}.{cls.__name__} is missing")
    return path


def _read_yaml(cls: type, path: str | Path) -> dict[str, Any]:
    """A YAML config file's contents, its keys checked against ``cls`` (errors name the file)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
    try:
        from_dict(cls, loaded)  # surface unknown keys against the file, not the merged dict
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return _mark_whole(cls, loaded)


def load_config(
    cls: type[T], config_path: str | Path | None = None, overrides: typing.Sequence[str] = ()
) -> T:
    """Defaults <- recipe file <- YAML file <- dotted overrides, then ``validate()``; errors name the file or
    flag."""
    # Start from the dataclass defaults as a dict, so a partial YAML section or a single dotted override
    # (``optim.lr=1e-3``) keeps the parent's ``default_factory`` values for the other fields of the section.
    defaults = to_dict(cls())
    data: dict[str, Any] = {}
    for path in (recipe_path(cls), config_path):
        if path is not None:
            data = _merge(data, _read_yaml(cls, path))
    if overrides:
        try:
            data = _merge(data, parse_overrides(overrides, cls))
            cfg = from_dict(cls, _unwrap(_merge(defaults, data)))
        except ConfigError as e:
            raise ConfigError(f"command-line override: {e}") from None
    else:
        cfg = from_dict(cls, _unwrap(_merge(defaults, data)))
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg


def save_config(cfg: Any, out_dir: str | Path, filename: str = CONFIG_FILENAME) -> Path:
    """Write the resolved config as YAML next to a stage's outputs (atomically)."""

    path = Path(out_dir) / filename
    text = f"# resolved {type(cfg).__name__}\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False)
    atomic_write_text(path, text)
    return path


def read_config(cls: type[T], path: str | Path) -> T:
    """Load a resolved config written by :func:`save_config` (e.g. to learn a checkpoint's settings)."""
    return load_config(cls, path)
