"""The trainers' side of the output guard (:func:`digiq.utils.io.plan_output`).

A trainer's folder is written in place: ``--resume`` continues from its newest finished checkpoint (a
finished run trains further when its config asks for more steps), ``overwrite=true`` starts over with the
old run kept aside until the new one finishes. :func:`check_output` decides and changes nothing;
:func:`begin_output`, called once the inputs are checked, makes the changes, so a run that fails on bad
input leaves the user's old output as it was. File operations run on the main process; the other
processes wait at a barrier. ``_COMPLETE`` is written last, by :func:`finish_output`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from digiq.config import to_dict
from digiq.training.checkpoint import latest_checkpoint
from digiq.utils import io
from digiq.utils.io import OutputPlan, plan_output
from digiq.utils.logging import get_logger

log = get_logger(__name__)

# The settings that make a run the same run: a resume with another dataset, model, seed or rendering is
# another experiment. Run lengths, logging and checkpoint cadence may change on resume; so may the feature
# cache's path (train-critic checks the cache's widths against its checkpoint, naming both).
IDENTITY_FIELDS = ("dataset", "critic_dir", "init_policy", "model", "lora", "seed", "rendering")


def run_fingerprint(cfg: Any, fields: tuple[str, ...] = IDENTITY_FIELDS) -> dict[str, Any]:
    """The config fields of ``fields`` that ``cfg`` has (nested configs as dicts)."""
    d = to_dict(cfg)
    if isinstance(d.get("model"), dict):  # its dtype or memory settings may change on resume; not the weights
        d["model"] = {k: d["model"].get(k) for k in ("name_or_path", "tiny_seed")}
    return {k: d[k] for k in fields if k in d}


def check_output(out: str | Path, resume: bool, overwrite: bool, what: str, cfg: Any = None) -> OutputPlan:
    """Apply the guard to ``out`` without touching it; the plan's ``resume_from`` is the checkpoint to
    continue from (None = from scratch). Call it before reading inputs, so a refused run fails fast."""
    fingerprint = run_fingerprint(cfg) if cfg is not None else None
    plan = plan_output(out, what, resume=resume, overwrite=overwrite, fingerprint=fingerprint)
    if plan.action == "resume":
        resume_from = latest_checkpoint(plan.path)
        if resume_from is None:
            log.warning("resume requested but %s has no finished checkpoint: starting from scratch", out)
        plan = dataclasses.replace(plan, resume_from=resume_from)
    elif resume:
        log.warning("resume requested but %s holds no run: starting from scratch", out)
    return plan


def begin_output(plan: OutputPlan, accelerator: Accelerator | None = None) -> None:
    """Make the run folder ready for writing, once the inputs are checked (see :func:`io.begin_output`)."""
    if accelerator is not None:
        # every process has looked at the folder (check_output) before the main one writes its run record
        accelerator.wait_for_everyone()
    if accelerator is None or accelerator.is_main_process:
        io.begin_output(plan)
    if accelerator is not None:
        accelerator.wait_for_everyone()


def finish_output(out: str | Path, info: dict[str, Any] | None = None) -> None:
    """Mark ``out`` finished (main process; call last, after every output is written)."""
    io.finish_output(out, info)
