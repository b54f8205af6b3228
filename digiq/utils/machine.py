"""What machine a run ran on, in numbers a reader can compare: cores, torch threads, measured matmul rate.

Machines of one kind differ in speed by 3x or more, so stage times are printed next to this machine's own
float32 matmul rate (a 512 x 512 GEMM, the size class of the tiny VLMs' layers) rather than as bare seconds.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Any

import torch


def matmul_gflops(n: int = 512, seconds: float = 0.5) -> float:
    """Measured float32 ``n x n`` matmul rate of this process's torch threads, in GFLOP/s."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):  # warm-up: thread pool and caches
        a @ b
    reps, t0 = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return 2 * n**3 * reps / elapsed / 1e9


def describe() -> dict[str, Any]:
    """cpu, cores, torch threads, the measured matmul rate (and the GPU, when one is visible)."""
    out: dict[str, Any] = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "matmul_gflops": round(matmul_gflops(), 1),
    }
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out
