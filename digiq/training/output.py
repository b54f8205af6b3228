"""The output-folder rule every trainer follows, and its completion marker.

* an empty or missing ``output_dir`` starts a new run;
* a used one (a finished run, or an interrupted one) is refused, untouched, unless the user says what to do:
  ``--resume`` continues from its newest finished checkpoint (a finished run trains further when its
  config asks for more steps), ``overwrite=true`` deletes it and starts over;
* ``_COMPLETE`` is written last, by :func:`finish_output`, once every output is in place; a resumed run
  removes it first, so a kill during the resumed run never leaves an output that looks finished.

:func:`check_output` decides and changes nothing; :func:`begin_output`, called once the inputs are checked,
makes the changes, so a run that fails on bad input leaves the user's old output as it was. File
operations run on the main process; the other processes wait at a barrier.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from digiq.errors import DigiqError
from digiq.training.checkpoint import latest_checkpoint
from digiq.utils.io import clear_complete, is_complete, mark_complete
from digiq.utils.logging import get_logger

log = get_logger(__name__)


def _used(out: Path) -> bool:
    """A folder counts as used when it holds anything but hidden scratch (``.<name>.tmp-*`` siblings)."""
    return out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir())


def check_output(out: str | Path, resume: bool, overwrite: bool, what: str) -> Path | None:
    """Apply the rule above to ``out`` without touching it; returns the checkpoint to resume from (None =
    from scratch). Call it before reading inputs, so a refused run fails fast."""
    out = Path(out)
    if resume and overwrite:
        raise DigiqError(f"{what}: resume and overwrite cannot both be set")
    used = _used(out)
    if used and not resume and not overwrite:
        if is_complete(out):
            raise FileExistsError(
                f"{out} already holds a finished {what} run; pass overwrite=true to replace it "
                "(or --resume to train it further)"
            )
        raise FileExistsError(
            f"{out} holds an unfinished {what} run; pass --resume to continue it or overwrite=true to start over"
        )
    resume_from = latest_checkpoint(out) if resume and used else None
    if resume and resume_from is None:
        log.warning("resume requested but %s has no finished checkpoint: starting from scratch", out)
    return resume_from


def begin_output(out: str | Path, overwrite: bool, accelerator: Accelerator | None = None) -> None:
    """Make ``out`` ready for writing, once the inputs are checked: delete the old run when ``overwrite``,
    and drop the completion marker of a run being resumed (it is written again at the end)."""
    out = Path(out)
    if accelerator is None or accelerator.is_main_process:
        if overwrite and _used(out):
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        clear_complete(out)
    if accelerator is not None:
        accelerator.wait_for_everyone()


def finish_output(out: str | Path, info: dict[str, Any] | None = None) -> None:
    """Mark ``out`` finished (main process; call last, after every output is written)."""
    mark_complete(out, info)
