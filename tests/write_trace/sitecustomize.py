"""Loaded by every Python process started with this folder on PYTHONPATH (tests/test_distributed.py):
records which process (RANK) creates, replaces or deletes which path, in $DIGIQ_WRITE_TRACE/<rank>.txt.

Everything digiq writes goes through one of these calls (files through open or a temp file + os.replace,
safetensors and save_pretrained inside a staged folder that os.replace moves into place)."""

import builtins
import io
import os
import shutil

_trace_dir = os.environ.get("DIGIQ_WRITE_TRACE")
if _trace_dir:
    _rank = os.environ.get("RANK", "0")
    _log = os.path.join(_trace_dir, f"{_rank}.txt")
    _open, _replace, _rename, _rmtree, _unlink, _mkdir = (
        builtins.open,
        os.replace,
        os.rename,
        shutil.rmtree,
        os.unlink,
        os.mkdir,
    )

    def _note(path):
        with _open(_log, "a") as f:
            f.write(os.path.abspath(os.fspath(path)) + "\n")

    def _traced_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
            _note(file)
        return _open(file, mode, *args, **kwargs)

    def _traced_replace(src, dst, *args, **kwargs):
        _note(dst)
        return _replace(src, dst, *args, **kwargs)

    def _traced_rename(src, dst, *args, **kwargs):
        _note(dst)
        return _rename(src, dst, *args, **kwargs)

    def _traced_rmtree(path, *args, **kwargs):
        _note(path)
        return _rmtree(path, *args, **kwargs)

    def _traced_unlink(path, *args, **kwargs):
        _note(path)
        return _unlink(path, *args, **kwargs)

    def _traced_mkdir(path, *args, **kwargs):
        if not os.path.exists(path):  # mkdir(exist_ok=True) of an existing folder creates nothing
            _note(path)
        return _mkdir(path, *args, **kwargs)

    builtins.open = io.open = _traced_open
    os.replace, os.rename, shutil.rmtree = _traced_replace, _traced_rename, _traced_rmtree
    os.unlink = os.remove = _traced_unlink
    os.mkdir = _traced_mkdir
