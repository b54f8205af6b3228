"""One learning-rate schedule for every trainer: linear warm-up, then constant, linear or cosine decay to 0.

The shapes are those of ``transformers.get_scheduler`` ("constant_with_warmup", "linear", "cosine"), with
one deliberate difference: the warm-up factor of step ``t`` is ``(t + 1) / warmup``, not ``t / warmup``.
transformers' first step runs at learning rate 0, so it changes no weight at all (with AdamW's decoupled
weight decay scaled by the rate, not even that): a 1-step run, or each first step of our short CPU
recipes, would be wasted. The warm-up length rounds ``warmup_ratio * total`` to the nearest step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

SCHEDULES = ("constant", "linear", "cosine")


def warmup_steps(warmup_ratio: float, total: int) -> int:
    return int(round(warmup_ratio * total))


def lr_factor(kind: str, total: int, warmup: int) -> Callable[[int], float]:
    """The multiplier of the base learning rate at optimiser step ``t`` (0-based)."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; choose one of {SCHEDULES}")

    def factor(t: int) -> float:
        if warmup > 0 and t < warmup:
            return (t + 1) / warmup
        if kind == "constant" or total <= warmup:
            return 1.0
        progress = min(1.0, (t - warmup) / max(1, total - warmup))
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def make_scheduler(
    optimizer: torch.optim.Optimizer, kind: str, total: int, warmup_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` (each parameter group scaled from its own base rate); step it after every update."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(kind, total, warmup_steps(warmup_ratio, total))
    )
