"""train-critic's data: the dataset and feature cache, checked against each other, staged as tensors on the
training device, and the seeded per-epoch batch sampler.

All features sit in (accelerator) memory as one tensor; a batch is a gather by sampled row indices, so a
step never touches the disk or a DataLoader worker.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from digiq.data.features import FeatureCache
from digiq.data.schema import split_by_trajectory
from digiq.data.transitions import Transitions, check_candidate_counts, load_transitions
from digiq.errors import DataError
from digiq.models.critic_text import CriticInputs
from digiq.utils.logging import get_logger

log = get_logger(__name__)


@dataclasses.dataclass
class CriticData:
    """What train-critic reads, opened and checked: transitions, the dataset, its features and the split."""

    transitions: Transitions
    dataset: Any  # the HF dataset (row texts, Stage-1 labels, fingerprint)
    features: FeatureCache
    train_rows: np.ndarray
    val_rows: np.ndarray

    def require_candidates(self, setting: str) -> None:
        """Refuse ``setting`` (one that scores stored candidates) on a cache without candidates."""
        if self.features.num_candidates < 2:
            raise DataError(f"{setting} needs candidates in the feature cache, {self.features.path} has N=1")


def open_critic_data(
    dataset: str, features: str, gamma: float, val_fraction: float, warn: bool = True
) -> CriticData:
    """Open ``dataset`` and the feature cache ``features`` made from it, refusing a cache of another dataset.

    The fingerprint catches a cache made for another dataset of the same length, and the candidate count
    one made before `digiq candidates` changed the rows: both would otherwise train a critic on the wrong
    features without any error.
    """
    tr, ds = load_transitions(dataset, gamma)
    feats = FeatureCache.open(features)
    feats.check_against(len(tr.reward), dataset_path=dataset, fingerprint=ds._fingerprint)
    check_candidate_counts(tr.candidates, feats.num_candidates, dataset, features, ds)
    if tr.num_truncated and warn:
        log.warning(
            "%d trajectorie(s) end without done=1 (truncated); their last step is treated as terminal",
            tr.num_truncated,
        )
    train_rows, val_rows = split_by_trajectory(ds, val_fraction)
    if len(train_rows) == 0:
        raise DataError(f"{dataset}: no training trajectories left after val_fraction={val_fraction}")
    return CriticData(tr, ds, feats, train_rows, val_rows)


@dataclasses.dataclass
class StagedTensors:
    """Everything a training step gathers from, on the training device (the torch device)."""

    state: torch.Tensor  # (R, Ds) cache dtype
    actions: torch.Tensor  # (R, N, Da) cache dtype
    valid: torch.Tensor | None  # (R, N) bool
    reward: torch.Tensor  # (R,) float32
    done: torch.Tensor  # (R,) float32
    mc_return: torch.Tensor  # (R,) float32
    next_idx: torch.Tensor  # (R,) int64
    # (R, N) float32: 1 where candidate j of row r is a no-op to back up with gamma V(s) (noop.enabled).
    noop: torch.Tensor | None = None
    # What the critic reads (state/actions above, plus frame stacking and text ids/tables); None = the
    # plain features (built from state/actions on first use).
    inputs: CriticInputs | None = None

    @classmethod
    def stage(cls, feats: FeatureCache, tr: Transitions, device: torch.device | str) -> StagedTensors:
        """Move the cache's features (in their cache dtype) and the transitions' scalars to ``device``."""
        return cls(
            state=feats.state.to(device),
            actions=feats.actions.to(device),
            valid=None if feats.valid is None else feats.valid.to(device),
            reward=torch.as_tensor(tr.reward, device=device),
            done=torch.as_tensor(tr.done, device=device),
            mc_return=torch.as_tensor(tr.mc_return, device=device),
            next_idx=torch.as_tensor(tr.next_idx, device=device),
        )

    @property
    def num_candidates(self) -> int:
        return int(self.actions.shape[1])

    def critic_inputs(self) -> CriticInputs:
        if self.inputs is None:
            self.inputs = CriticInputs(self.state, self.actions)
        return self.inputs


@torch.no_grad()
def feature_stats(
    x: torch.Tensor, rows: torch.Tensor, max_elements: int = 1 << 22
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean/std over ``x[rows]`` (flattening any candidate dim), accumulated in float64 chunk by chunk.

    A chunk holds at most ``max_elements`` feature values (32 MiB in float64): chunks of a fixed row count
    would, for (R, 16, 4096) action features, gather and upcast GBs at once (scripts/bench_memory.py).
    """
    dim = x.shape[-1]
    per_row = max(1, x[0].numel()) if len(x) else 1
    chunk = max(1, max_elements // per_row)
    s = torch.zeros(dim, dtype=torch.float64, device=x.device)
    sq = torch.zeros(dim, dtype=torch.float64, device=x.device)
    n = 0
    for i in range(0, len(rows), chunk):
        part = x[rows[i : i + chunk]].reshape(-1, dim).double()
        s += part.sum(0)
        sq += (part * part).sum(0)
        n += part.shape[0]
    mean = s / max(n, 1)
    var = (sq / max(n, 1) - mean * mean).clamp_min(0)
    return mean.float(), var.sqrt().float()


@dataclasses.dataclass
class SampledBatch:
    """One process's batch: training rows, and per row the backup candidate and the no-op candidate."""

    idx: torch.Tensor  # (B,) rows
    backup_col: torch.Tensor | None = None  # (B,) backup_action=candidate: the a' of V's target
    noop_col: torch.Tensor | None = None  # (B,) noop.enabled: one candidate backed up as a no-op
    # (B, K) conservative.num_candidates: the columns the conservative term scores, the dataset action (0)
    # first; None = every stored candidate.
    conservative_cols: torch.Tensor | None = None


class RowSampler:
    """Uniform rows with replacement, drawn on the CPU from a generator seeded by (seed, rank, epoch) alone,
    so a run resumed at an epoch boundary replays the same batches."""

    def __init__(
        self,
        train_rows: np.ndarray,
        batch_size: int,
        data: StagedTensors,
        backup_candidate: bool,
        seed: int,
        rank: int,
        conservative_candidates: int = 0,
    ) -> None:
        self.rows = torch.as_tensor(train_rows)
        self.batch_size, self.seed, self.rank = batch_size, seed, rank
        self.num_candidates = data.num_candidates
        self.backup_candidate = backup_candidate
        self.valid = None if data.valid is None else data.valid.cpu().float()
        self.noop = None if data.noop is None else data.noop.cpu()
        # Draw the dataset action plus this many - 1 others per row for the conservative term (0 = all N).
        self.conservative_candidates = (
            conservative_candidates if conservative_candidates < self.num_candidates else 0
        )
        self.gen = torch.Generator(device="cpu")

    def start_epoch(self, epoch: int) -> None:
        self.gen.manual_seed(self.seed * 1_000_003 + self.rank * 7_919 + epoch)

    def draw(self, device: torch.device | str) -> SampledBatch:
        """The next batch; the draws happen in a fixed order (rows, backup column, no-op column, the
        conservative term's columns)."""
        gen, B = self.gen, self.batch_size
        idx = self.rows[torch.randint(len(self.rows), (B,), generator=gen)]
        col = None
        if self.backup_candidate:
            if self.valid is None:
                col = torch.randint(self.num_candidates, (B,), generator=gen)
            else:
                col = torch.multinomial(self.valid[idx], 1, generator=gen).squeeze(1)
            col = col.to(device, non_blocking=True)
        ncol = None
        if self.noop is not None:
            w = self.noop[idx]  # advanced indexing copies: the mask itself is not written
            w[w.sum(1) == 0, 0] = 1.0  # a row without no-ops draws column 0, whose weight is 0
            ncol = torch.multinomial(w, 1, generator=gen).squeeze(1).to(device, non_blocking=True)
        ccols = None
        if self.conservative_candidates:
            # Uniform over the other valid candidates; an invalid column (weight 1e-6) is drawn almost only when
            # a row has too few valid ones, and the term masks it.
            w = torch.ones(B, self.num_candidates - 1) if self.valid is None else self.valid[idx, 1:] + 1e-6
            others = 1 + torch.multinomial(
                w, self.conservative_candidates - 1, replacement=False, generator=gen
            )
            ccols = torch.cat([torch.zeros(B, 1, dtype=torch.long), others], 1).to(device, non_blocking=True)
        return SampledBatch(idx.to(device, non_blocking=True), col, ncol, ccols)
