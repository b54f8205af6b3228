"""Metrics logging: a JSONL file always, wandb when asked (offline by default), main process only."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from digiq.config import WandbConfig
from digiq.errors import DigiqError
from digiq.utils.io import atomic_write_text

_FMT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def get_logger(name: str) -> logging.Logger:
    """A logger that prints to stderr once per process (only rank 0 logs INFO in distributed runs)."""
    root = logging.getLogger("digiq")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FMT, "%H:%M:%S"))
        root.addHandler(handler)
        rank = int(os.environ.get("RANK", "0"))
        root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
        root.propagate = False
    return logging.getLogger(name if name.startswith("digiq") else f"digiq.{name}")


# WANDB_MODE values wandb itself accepts, as our modes.
_ENV_MODES = {
    "disabled": "disabled",
    "offline": "offline",
    "dryrun": "offline",
    "online": "online",
    "run": "online",
}


def wandb_mode(cfg: WandbConfig | None) -> str:
    """The wandb mode of a run: ``WANDB_MODE`` from the environment when set (wandb's own convention, and
    what a batch script such as scripts/gpu_check.sh sets for every stage), else ``cfg.mode``."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env:
        if env not in _ENV_MODES:
            raise DigiqError(f"WANDB_MODE={env!r} in the environment: use one of disabled, offline, online")
        return _ENV_MODES[env]
    return "disabled" if cfg is None else cfg.mode


class MetricsLogger:
    """Appends ``{"step": .., **metrics}`` lines to ``<run_dir>/metrics.jsonl`` and mirrors them to wandb.

    Construct it on every process; only the main process writes (``enabled=False`` elsewhere).
    ``resume_step=None`` starts a new file; a resumed run passes the step of its checkpoint, and the lines
    logged after it (by the run that was killed) are dropped, since they will be logged again.
    """

    def __init__(
        self,
        run_dir: str | Path,
        wandb_cfg: WandbConfig | None = None,
        config: dict[str, Any] | None = None,
        enabled: bool = True,
        resume_step: int | None = None,
    ) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        resume = resume_step is not None
        if not resume and self.path.exists():
            self.path.unlink()
        if resume:
            _truncate(self.path, resume_step)
        mode = wandb_mode(wandb_cfg)
        if wandb_cfg is not None and mode != "disabled":
            try:
                import wandb  # only when enabled: a machine without wandb runs with it disabled
            except ImportError as e:
                raise DigiqError(
                    f"wandb.mode={mode} but wandb is not installed ({e}): pip install wandb, "
                    "or set wandb.mode=disabled (or WANDB_MODE=disabled in the environment)"
                ) from None

            run_id_file = Path(run_dir) / "wandb_run_id.txt"
            run_id = run_id_file.read_text().strip() if resume and run_id_file.exists() else None
            self._wandb = wandb.init(
                project=wandb_cfg.project,
                entity=wandb_cfg.entity,
                name=wandb_cfg.name or Path(run_dir).name,
                mode=mode,
                dir=str(run_dir),
                config=config,
                id=run_id,
                resume="allow" if run_id else None,
            )
            # Stored so that --resume continues the same wandb run (lerobot #1033).
            run_id_file.write_text(self._wandb.id)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        row.update(
            {
                k: (float(v) if hasattr(v, "__float__") and not isinstance(v, (str, bool)) else v)
                for k, v in metrics.items()
            }
        )
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def finish(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _truncate(path: Path, last_step: int) -> None:
    """Drop the lines logged after ``last_step`` (and a line torn by a kill in the middle of an append)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("step", 0) <= last_step:
            keep.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
