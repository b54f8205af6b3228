"""Crash-safe file output: atomic writes, staged output directories, completion markers and the one
output-folder guard every writer goes through.

A stage never leaves a half-written artefact where the next stage would take it for a finished one:
files are written to a temporary sibling and ``os.replace``d into place, and directories count as
finished only once they hold a ``_COMPLETE`` marker, written last.

The guard (:func:`plan_output`, then :func:`begin_output` / :func:`staged_output`, then
:func:`finish_output`): an empty or missing output folder starts a new run; a used one is refused,
untouched, with one line naming the folder and the flag to pass, unless the user says what to do:

* ``resume`` continues the run whose record (``digiq_run.json``: the stage and the run's config
  fingerprint) matches this run's; a different fingerprint is refused, naming the differing fields;
* ``overwrite`` replaces it, staged: an in-place writer (trainers, cache-features, MiniWoB++ collection)
  moves the old output aside to a hidden sibling ``.<name>.replaced-*``, deleted only once the new run has
  finished; a staged writer (:func:`staged_output`) swaps the new folder in at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from digiq.errors import DataError, DigiqError

log = logging.getLogger(__name__)
COMPLETE_MARKER = "_COMPLETE"
# The record of the run that writes an output folder: {"stage", "fingerprint", "replaces"}.
RUN_RECORD = "digiq_run.json"


class OutputExistsError(DigiqError, FileExistsError):
    """The output folder is in use and the user did not say what to do with it."""


class OutputMismatchError(OutputExistsError, DataError):
    """``resume`` was asked, but the folder holds a run of another configuration."""


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temp file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_save_safetensors(
    tensors: dict[str, Any], path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    """``safetensors.torch.save_file`` through a temp file and a rename."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def mark_complete(directory: str | Path, info: dict[str, Any] | None = None) -> None:
    """Write the completion marker of ``directory`` (last, after everything else is in place)."""
    payload = {"completed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    payload.update(info or {})
    atomic_write_json(Path(directory) / COMPLETE_MARKER, payload)


def is_complete(directory: str | Path) -> bool:
    """True if ``directory`` holds a completion marker, i.e. a stage finished writing it."""
    return (Path(directory) / COMPLETE_MARKER).is_file()


def clear_complete(directory: str | Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (Path(directory) / COMPLETE_MARKER).unlink()


@contextlib.contextmanager
def staged_dir(final: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``final`` and is marked complete.

    On an exception (or a kill) the temporary directory is removed or left as ``.<name>.tmp-*`` garbage,
    never at ``final``; an existing finished ``final`` is untouched unless ``overwrite``.
    """
    final = Path(final)
    if final.exists() and not overwrite and is_complete(final):
        raise OutputExistsError(f"{final} already holds a finished output; pass overwrite=true to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if not is_complete(tmp):
            mark_complete(tmp)
        if final.exists():
            trash = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def require_complete(
    directory: str | Path,
    what: str,
    error: type[Exception] = FileNotFoundError,
    rerun: str = "the stage that writes it was interrupted; re-run it (with --resume where supported)",
) -> Path:
    """Return ``directory`` if it is a finished output folder, else raise ``error`` with a message that says what
    is missing and, for an unfinished one, ``rerun`` (what to do about it)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise error(f"{what} not found: {directory}")
    if not is_complete(directory):
        raise error(f"{what} at {directory} is incomplete (no {COMPLETE_MARKER} marker): {rerun}")
    return directory


# --------------------------------------------------------------------------------------------------
# The output guard
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OutputPlan:
    """What a run does with its output folder, decided by :func:`plan_output` before any work."""

    path: Path
    # The stage writing it (the record's ``stage``: another stage's folder is not resumed).
    stage: str
    # 'fresh': missing or empty folder; 'resume': continue the recorded run; 'overwrite': replace it.
    action: Literal["fresh", "resume", "overwrite"]
    # The folder already holds this run, finished: a resumed trainer trains it further, a data stage
    # has nothing left to do.
    finished: bool = False
    fingerprint: dict[str, Any] | None = None
    # Trainers: the checkpoint a resumed run continues from (set by digiq.training.output).
    resume_from: Path | None = None


def _used(out: Path) -> bool:
    """A folder counts as used when it holds anything but hidden scratch (``.<name>`` files)."""
    return out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir())


def _normal(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists), so a stored fingerprint compares equal."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def fingerprint_diff(old: dict[str, Any] | None, new: dict[str, Any] | None) -> list[str]:
    """The dotted names of the fields in which two fingerprints differ (sorted)."""
    a, b = _flat(_normal(old or {})), _flat(_normal(new or {}))
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def config_fingerprint(cfg: Any, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """A stage config as a fingerprint: every field but where it writes and what to do with a used folder
    (``output_dir``, ``output``, ``overwrite``, ``resume``) and ``exclude``."""
    from digiq.config import to_dict

    drop = {"output_dir", "output", "overwrite", "resume", *exclude}
    return {k: v for k, v in to_dict(cfg).items() if k not in drop}


def read_run_record(directory: str | Path) -> dict[str, Any] | None:
    """The run record of ``directory``, or None if it has none (or an unreadable one)."""
    try:
        rec = json.loads((Path(directory) / RUN_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def write_run_record(directory: str | Path, plan: OutputPlan, replaces: str | None = None) -> None:
    rec = {"stage": plan.stage, "fingerprint": _normal(plan.fingerprint), "replaces": replaces}
    atomic_write_json(Path(directory) / RUN_RECORD, rec)


def plan_output(
    out: str | Path,
    stage: str,
    *,
    resume: bool = False,
    overwrite: bool = False,
    fingerprint: dict[str, Any] | None = None,
    resumable: bool = True,
) -> OutputPlan:
    """Decide what to do with ``out`` and change nothing (call it first: a refused run fails fast).
    ``resumable=False``: the stage writes in one go (its refusals do not suggest ``--resume``).

    Raises :class:`OutputExistsError` for a used folder without a flag, or one that holds other work, and
    :class:`OutputMismatchError` when ``resume`` meets a run of another fingerprint."""
    out = Path(out)
    fingerprint = None if fingerprint is None else _normal(fingerprint)
    if resume and overwrite:
        raise DigiqError(f"{stage}: resume and overwrite cannot both be set")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(
            f"output folder {out} exists and is not a folder; choose another output folder"
        )
    if not _used(out):
        return OutputPlan(out, stage, "fresh", fingerprint=fingerprint)
    if overwrite:
        return OutputPlan(out, stage, "overwrite", fingerprint=fingerprint)
    finished = is_complete(out)
    rec = read_run_record(out)
    ours = rec is not None and rec.get("stage") == stage
    if not ours:
        held = f"a {rec.get('stage')} run" if rec is not None else "other files"
        if finished and rec is None:
            held = "a finished output"
        raise OutputExistsError(
            f"{out} already holds {held}, not a {stage} run; choose another output folder or pass "
            "overwrite=true to replace it"
        )
    if not resume:
        if finished:
            hint = " (or --resume to continue it)" if resumable else ""
            raise OutputExistsError(
                f"{out} already holds a finished {stage} run; pass overwrite=true to replace it{hint}"
            )
        raise OutputExistsError(
            f"{out} holds an unfinished {stage} run; pass --resume (resume=true) to continue it or overwrite=true "
            "to start over"
        )
    diff = fingerprint_diff(rec.get("fingerprint"), fingerprint) if fingerprint is not None else []
    if diff:
        shown = ", ".join(diff[:8]) + (f" and {len(diff) - 8} more" if len(diff) > 8 else "")
        raise OutputMismatchError(
            f"{out} holds a {stage} run of a different configuration (differs in: {shown}); resume it with "
            "the same settings or pass overwrite=true to start over"
        )
    return OutputPlan(out, stage, "resume", finished=finished, fingerprint=fingerprint)


def begin_output(plan: OutputPlan) -> None:
    """Make ``plan.path`` ready for an in-place writer, once the inputs are checked (main process only).

    ``overwrite`` moves the old output aside to ``.<name>.replaced-*`` (deleted by :func:`finish_output`);
    overwriting the partial output of an earlier, unfinished overwrite deletes that partial output and keeps
    the finished one already aside. A resumed run drops the completion marker first, so a kill during it
    never leaves a folder that looks finished."""
    out = plan.path
    old = read_run_record(out) if out.is_dir() else None
    replaces = (old or {}).get("replaces") if plan.action == "resume" else None
    if plan.action == "overwrite" and out.exists():
        kept = (old or {}).get("replaces")  # the finished output an unfinished overwrite run kept aside
        if kept is not None and not is_complete(out):
            shutil.rmtree(out)  # that run's partial output; the finished one stays aside
            replaces = kept
        else:
            aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.replaced-", dir=out.parent))
            os.replace(out, aside / out.name)
            replaces = str(aside)
            log.info("overwrite: the previous %s is kept at %s until this run finishes", out, aside)
    out.mkdir(parents=True, exist_ok=True)
    clear_complete(out)
    write_run_record(out, plan, replaces)


def finish_output(out: str | Path, info: dict[str, Any] | None = None) -> None:
    """Mark ``out`` finished (last, after every output is written), then delete the output it replaced."""
    mark_complete(out, info)
    rec = read_run_record(out)
    if rec and rec.get("replaces"):
        shutil.rmtree(rec["replaces"], ignore_errors=True)
        rec["replaces"] = None
        atomic_write_json(Path(out) / RUN_RECORD, rec)


@contextlib.contextmanager
def staged_output(plan: OutputPlan) -> Iterator[Path]:
    """:func:`staged_dir` for a planned output: the run record goes in with the rest, and the old folder
    is swapped out only when the new one is complete. When it replaces an in-place run's folder (a sharded
    collection turned into its dataset), the output that run kept aside goes once the swap is done."""
    prior = read_run_record(plan.path)
    with staged_dir(plan.path, overwrite=plan.action != "fresh") as tmp:
        yield tmp
        write_run_record(tmp, plan)
    if prior and prior.get("replaces"):
        shutil.rmtree(prior["replaces"], ignore_errors=True)
