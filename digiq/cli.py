"""``digiq``: one command line for the whole pipeline.

Every command is a config dataclass plus a ``run(cfg)`` function (one recipe per stage, torchtune style)::

    digiq <command> [--config FILE.yaml] [--resume] [--print-config] [key=value | section.key=value ...]

Values after ``=`` are read as YAML scalars (``3e-4``, ``true``, ``[1, 4, 8]``). ``digiq <command> --help``
lists every config field with its default and explanation. Distributed: ``accelerate launch -m digiq ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import os
import re
import sys
import textwrap
import typing
from collections.abc import Sequence

from digiq import __version__
from digiq.config import ConfigError, load_config, to_dict
from digiq.errors import DigiqError

# name -> (module, one-line help). Modules define ``Config`` (a dataclass) and ``run(cfg)``; a module may set
# ``POSITIONAL = "<field>"`` to accept one bare word (``digiq theory q-learning``), and sets
# ``DISTRIBUTED = True`` when its ``run`` splits its work over the processes of a launcher (``accelerate
# launch``, ``torchrun``). Under a launcher, the other commands run on the main process only: each process
# would otherwise redo the same work and write the same output.
COMMANDS: dict[str, tuple[str, str]] = {
    "import": ("digiq.data.importer", "import official Digi-Q / DigiRL .pt trajectory files into a dataset"),
    "collect": (
        "digiq.stages.collect",
        "collect behaviour-policy trajectories on an environment (env=sim | miniwob)",
    ),
    "sim collect": ("digiq.stages.collect", "the same as `digiq collect` (env=sim is its default)"),
    "sim rollout": ("digiq.stages.evaluate", "the same as `digiq evaluate` (env=sim is its default)"),
    "pretrain-vlm": (
        "digiq.stages.pretrain_vlm",
        "pretrain a tiny VLM on synthetic GUI screens (grounding, reading, parsing goals)",
    ),
    "finetune-vlm": ("digiq.stages.finetune_vlm", "Stage 1: fine-tune a VLM on the screen-change label"),
    "train-bc": ("digiq.stages.train_bc", "behaviour-clone a generative VLM policy (pi_beta)"),
    "candidates": (
        "digiq.stages.candidates",
        "sample N-1 candidate actions per state (index 0 = dataset action)",
    ),
    "cache-features": ("digiq.stages.cache_features", "Stage 2: cache frozen VLM features f(s), f(s, a_i)"),
    "train-critic": (
        "digiq.stages.train_critic",
        "Stage 2: train twin Q/V heads (TD or MC) on cached features",
    ),
    "extract-policy": ("digiq.stages.extract_policy", "Stage 3: Best-of-N policy extraction"),
    "act": ("digiq.stages.act", "load an exported policy and print the action for a screenshot + goal"),
    "evaluate": ("digiq.stages.evaluate", "evaluate a policy (simulated device) or write an offline report"),
    "pipeline": ("digiq.stages.pipeline", "run every stage end to end on the simulated device (resumable)"),
    "report": ("digiq.stages.report", "write a static HTML Q-value viewer for a dataset + critic"),
    "theory": ("digiq.theory.cli", "reproduce the Q-learning theory experiments (plots + CSV)"),
}
GROUPS = {"sim"}


def _field_comments(cls: type) -> dict[str, str]:
    """The ``#`` comment lines right above / beside each field in a dataclass's source (for --help)."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    out: dict[str, str] = {}
    pending: list[str] = []
    for line in lines:
        s = line.strip()
        if s.startswith("#"):
            pending.append(s.lstrip("# ").rstrip())
            continue
        m = re.match(r"(\w+)\s*:\s*[^=]+(?:=.*?)?(?:#\s*(.*))?$", s)
        if m and not s.startswith(("def ", "class ", "@", "return")):
            text = " ".join(pending + ([m.group(2)] if m.group(2) else []))
            if text:
                out[m.group(1)] = text
        pending = []
    return out


def describe_config(cls: type, prefix: str = "", default: typing.Any = None) -> list[str]:
    """Human-readable lines ``key = default  # comment`` for every (nested) field of a config class; the
    defaults are ``default``'s values (an instance of ``cls``; ``cls()`` when None)."""

    lines: list[str] = []
    comments = _field_comments(cls)
    hints = typing.get_type_hints(cls)
    default = cls() if default is None else default
    for f in dataclasses.fields(cls):
        value = getattr(default, f.name)
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            lines.append(f"  [{name}]" + (f"  # {comments[f.name]}" if f.name in comments else ""))
            lines.extend(describe_config(type(value), prefix=f"{name}.", default=value))
            continue
        tp = getattr(hints[f.name], "__name__", None) or str(hints[f.name]).replace("typing.", "")
        shown = to_dict(value) if isinstance(value, (tuple, list)) else value
        lines.append(f"  {name} = {shown!r}  ({tp})")
        if f.name in comments:
            lines.extend("      " + w for w in textwrap.wrap(comments[f.name], 96))
    return lines


def _recipe_defaults(cls: type) -> typing.Any:
    """``cls`` resolved from its recipe file alone, or None when that fails (the run then says why)."""
    try:
        return load_config(cls)
    except ConfigError:
        return None


def _is_sequence_field(cls: type, name: str) -> bool:
    """Whether dataclass field ``name`` of ``cls`` is a list/tuple (takes several bare words)."""
    tp = typing.get_type_hints(cls).get(name)
    return typing.get_origin(tp) in (list, tuple)


def _usage() -> str:
    width = max(len(k) for k in COMMANDS)
    rows = "\n".join(f"  {k.ljust(width)}  {v[1]}" for k, v in COMMANDS.items())
    return (
        "usage: digiq <command> [--config FILE.yaml] [--resume] [--print-config] [key=value ...]\n\n"
        f"commands:\n{rows}\n\n"
        "Run `digiq <command> --help` for the command's config fields. Overrides use dotted keys, e.g.\n"
        "  digiq train-critic --config configs/train-critic/td.yaml critic_loss=mc output_dir=runs/mc\n"
    )


def _resolve(argv: list[str]) -> tuple[str | None, list[str]]:
    if not argv:
        return None, argv
    if argv[0] in GROUPS and len(argv) > 1 and f"{argv[0]} {argv[1]}" in COMMANDS:
        return f"{argv[0]} {argv[1]}", argv[2:]
    if argv[0] in COMMANDS:
        return argv[0], argv[1:]
    return None, argv


def main(argv: Sequence[str] | None = None) -> int:

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("--version", "-V"):
        print(f"digiq {__version__}")
        return 0
    name, rest = _resolve(argv)
    if name is None:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"digiq: unknown command {' '.join(argv[:2])!r}\n", file=sys.stderr)
            print(_usage(), file=sys.stderr)
            return 2
        print(_usage())
        return 0

    module_name, help_line = COMMANDS[name]
    module = importlib.import_module(module_name)
    config_cls = module.Config
    positional = getattr(module, "POSITIONAL", None)

    fields_help = "config fields (override with key=value):\n"
    defaults = None
    if getattr(config_cls, "RECIPE", None):
        # --help shows the recipe's values, the ones a run without --config uses
        fields_help = f"config fields (defaults: {config_cls.RECIPE}; override with key=value):\n"
        defaults = _recipe_defaults(config_cls)
    parser = argparse.ArgumentParser(
        prog=f"digiq {name}",
        description=(module.__doc__ or help_line).strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=fields_help + "\n".join(describe_config(config_cls, default=defaults)),
    )
    parser.add_argument(
        "--config", "-c", help="YAML config file (see configs/); overrides still apply on top"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue an interrupted run from its last checkpoint"
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted for nested fields")
    args, unknown = parser.parse_known_args(rest)
    overrides = [*args.overrides]
    for u in unknown:  # allow --key=value as well as key=value
        if u.startswith("--") and "=" in u:
            overrides.append(u[2:])
        else:
            parser.error(f"unrecognised argument {u!r} (overrides look like key=value)")
    bare = [o for o in overrides if "=" not in o]
    if bare:
        many = bool(positional) and _is_sequence_field(config_cls, positional)
        if positional and (len(bare) == 1 or many):
            # A list field (`digiq import a.pt b.pt`) takes every bare word; JSON quoting keeps each path a
            # single YAML string whatever characters it holds.
            value = json.dumps(bare) if many else bare[0]
            overrides = [o for o in overrides if "=" in o] + [f"{positional}={value}"]
        else:
            parser.error(f"unrecognised argument {bare[0]!r} (overrides look like key=value)")
    if args.resume:
        if not any(f.name == "resume" for f in dataclasses.fields(config_cls)):
            parser.error(f"'digiq {name}' has nothing to resume")
        overrides.append("resume=true")

    debug = os.environ.get("DIGIQ_DEBUG", "") not in ("", "0")
    try:
        cfg = load_config(config_cls, args.config, overrides)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            return 0
        if int(os.environ.get("RANK", "0")) > 0 and not getattr(module, "DISTRIBUTED", False):
            return 0
        result = module.run(cfg)
    except ConfigError as e:
        if debug:
            raise
        print(f"digiq {name}: config error: {e}", file=sys.stderr)
        return 2
    except (DigiqError, FileNotFoundError, FileExistsError, NotADirectoryError) as e:
        if debug:
            raise
        print(f"digiq {name}: error: {e}", file=sys.stderr)
        return 1
    finally:
        _close_process_group()
    return int(result) if isinstance(result, int) and not isinstance(result, bool) else 0


def _close_process_group() -> None:
    """Tear down a launcher's process group before the interpreter does.

    Left to interpreter shutdown, gloo's worker threads can abort a process after its work is done
    ("terminate called without an active exception", exit -6; seen once in
    tests/test_critic_train.py::test_two_process_ddp on a loaded machine), and torch warns that the group leaks.
    """
    dist = sys.modules.get("torch.distributed")  # never import torch just for this
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
