"""Run one ``digiq`` command in this process and report its wall time and peak GPU memory (for gpu_check.sh).

    python scripts/gpu_run.py <label> <digiq command and arguments ...>
    accelerate launch --config_file configs/accelerate/fsdp_7b.yaml scripts/gpu_run.py <label> finetune-vlm ...

Appends one JSON line ``{"label", "command", "rank", "processes", "seconds", "peak_gib", "exit"}`` per process
to ``$DIGIQ_GPU_REPORT`` (default ``gpu_check.jsonl``); the peak is ``torch.cuda.max_memory_allocated`` of the
process's own GPU (0 without one).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from digiq.cli import main


def run(label: str, argv: list[str]) -> int:
    t0 = time.perf_counter()
    code = main(argv)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 1024**3 if torch.cuda.is_available() else 0.0
    row = {
        "label": label,
        "command": " ".join(argv),
        "rank": int(os.environ.get("RANK", "0")),
        "processes": int(os.environ.get("WORLD_SIZE", "1")),
        "seconds": round(seconds, 2),
        "peak_gib": round(peak, 2),
        "exit": code,
    }
    with Path(os.environ.get("DIGIQ_GPU_REPORT", "gpu_check.jsonl")).open("a") as f:
        f.write(json.dumps(row) + "\n")
    return code


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    raise SystemExit(run(sys.argv[1], sys.argv[2:]))
