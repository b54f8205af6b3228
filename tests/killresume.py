"""Helpers for the kill/resume and bad-input suites: run the real CLI, SIGKILL it mid-run, hash outputs.

A stage is started as ``[sys.executable, "-m", "digiq", ...]`` in its own process group (so a kill also
takes any worker children with it), polled until a caller-chosen condition holds (a checkpoint or shard
file appeared, a progress line was printed), and then killed with SIGKILL: no ``finally`` blocks, no
atexit handlers, exactly what an OOM killer or a pre-empted cluster job does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def digiq_env(**extra: str) -> dict[str, str]:
    """The subprocess environment: offline, no wandb, one BLAS thread (2 shared cores), repo on the path."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(ROOT),
    }
    env.pop("DIGIQ_DEBUG", None)  # the CLI must print its one-line errors, not re-raise
    env.update(extra)
    return env


def digiq_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "digiq", *map(str, args)]


def run_digiq(
    *args: str, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``digiq <args>`` to the end; returns the CompletedProcess (text stdout/stderr)."""
    return subprocess.run(
        digiq_cmd(*args), cwd=ROOT, env=env or digiq_env(), capture_output=True, text=True, timeout=timeout
    )


@dataclasses.dataclass
class Killed:
    """What happened to a run started by :func:`kill_when`."""

    killed: bool  # True: SIGKILLed by us; False: it exited on its own before the condition held
    returncode: int
    stderr: str
    seconds: float


def kill_when(
    args: Iterable[str],
    ready: Callable[[str], bool],
    timeout: float = 240,
    poll: float = 0.002,
    env: dict[str, str] | None = None,
) -> Killed:
    """Start ``digiq <args>``, SIGKILL its process group as soon as ``ready(stderr_so_far)`` is true.

    ``ready`` gets the stderr text written so far (progress bars, log lines) and may also look at files.
    """
    with tempfile.TemporaryFile(mode="w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            digiq_cmd(*args),
            cwd=ROOT,
            env=env or digiq_env(),
            stdout=subprocess.DEVNULL,
            stderr=err,
            text=True,
            start_new_session=True,  # its own process group: killpg reaches children, never us
        )
        killed = False
        try:
            while proc.poll() is None:
                err.seek(0)
                if ready(err.read()):
                    os.killpg(proc.pid, signal.SIGKILL)
                    killed = True
                    break
                if time.perf_counter() - t0 > timeout:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    raise TimeoutError(f"digiq {' '.join(args)} did not reach the kill point in {timeout}s")
                time.sleep(poll)
            rc = proc.wait()
        except BaseException:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            raise
        err.seek(0)
        return Killed(killed=killed, returncode=rc, stderr=err.read(), seconds=time.perf_counter() - t0)


def file_digests(root: Path, skip: Iterable[str] = ()) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root`` (names in ``skip`` are left out anywhere)."""
    skip = set(skip)
    out = {}
    root = Path(root)
    if not root.exists():
        return out
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name not in skip and not any(part in skip for part in p.relative_to(root).parts):
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def tree_state(root: Path) -> dict[str, tuple[str, float]]:
    """Every file and folder under ``root`` (and next to it: staged temp siblings) with hash and mtime.

    Used to prove a failed command left the user's outputs exactly as they were.
    """
    root = Path(root)
    out: dict[str, tuple[str, float]] = {}
    for p in sorted(root.rglob("*")) if root.exists() else []:
        rel = str(p.relative_to(root))
        if p.is_file():
            out[rel] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime)
        else:
            out[rel + "/"] = ("dir", 0.0)
    return out


def staged_leftovers(final: Path) -> list[str]:
    """Temp siblings a killed writer leaves next to ``final`` (``.<name>.tmp-*``, ``.<name>.import-*``)."""
    final = Path(final)
    if not final.parent.exists():
        return []
    return sorted(p.name for p in final.parent.iterdir() if p.name.startswith(f".{final.name}."))
