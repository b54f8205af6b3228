"""Crash-safe file output: atomic writes, staged output directories and completion markers.

A stage never leaves a half-written artefact where the next stage would take it for a finished one:
files are written to a temporary sibling and ``os.replace``d into place, and directories count as
finished only once they hold a ``_COMPLETE`` marker, written last.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

COMPLETE_MARKER = "_COMPLETE"


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


def refuse_finished(final: str | Path, overwrite: bool) -> None:
    """Raise unless ``final`` is free to be written: a finished output is replaced only with ``overwrite``.

    Stages call it before their work starts, so a refusal costs nothing; :func:`staged_dir` calls it again
    before the swap."""
    final = Path(final)
    if final.exists() and not overwrite and is_complete(final):
        raise FileExistsError(f"{final} already holds a finished output; pass overwrite=true to replace it")


@contextlib.contextmanager
def staged_dir(final: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``final`` and is marked complete.

    On an exception (or a kill) the temporary directory is removed or left as ``.<name>.tmp-*`` garbage,
    never at ``final``; an existing finished ``final`` is untouched unless ``overwrite``.
    """
    final = Path(final)
    refuse_finished(final, overwrite)
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


def require_complete(directory: str | Path, what: str) -> Path:
    """Return ``directory`` if it is a finished output, else raise a message that says what is missing."""
    directory = Path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"{what} not found: {directory}")
    if not is_complete(directory):
        raise FileNotFoundError(
            f"{what} at {directory} is incomplete (no {COMPLETE_MARKER} marker): the stage that writes it was "
            "interrupted; re-run it (with --resume where supported)"
        )
    return directory
