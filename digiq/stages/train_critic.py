"""Stage 2: train twin Q/V heads on cached VLM features (TD, as Digi-Q, or the MC-regression ablation).

    digiq train-critic --config configs/train-critic/td.yaml dataset=data/sim features=runs/feats \\
        output_dir=runs/critic
    digiq train-critic --config configs/train-critic/mc.yaml ...          # MC ablation
    digiq train-critic ... --resume                                       # continue from the last epoch
    accelerate launch --multi_gpu --num_processes 2 -m digiq train-critic ...   # multi-GPU (DDP)

TD (DigiRL-agent/digiq @ 8181379, ``trainer.py:133-176``)::

    J_Q = (Q_i(s,a) - r - gamma (1-d) V_targ(s'))^2        J_V = (V_i(s) - Q_targ(s,a'))^2

with a' the dataset action (``backup_action: dataset``, the official default) or one random stored
candidate per sample (``candidate``; the official draws one index for the whole batch). Which target head
backs up which online head is ``critic.target_pairing``: ``aggregate`` (default) backs up both heads from
the twin-aggregated target (min by default: clipped double-Q); ``per_head`` backs up head i from target
head i only, as the official code (``trainer.py:148-152,173-175``). ``critic.aggregate: max`` alone does
not reproduce the official backup: it only sets the aggregation used for scoring (and for ``aggregate``
pairing). MC: both heads regress on the discounted return, recomputed here from the
rewards with ``gamma`` (the official loader also recomputes it, ``offpolicy_train_loop.py:110``).

``noop.enabled`` (beyond the paper; the pipeline's default) adds a Bellman target for the candidates the
dataset never executed but that leave the screen unchanged: a linear probe on the dataset actions' Stage-1
labels marks them, and J_Q gains ``noop.weight * (Q(s, a) - gamma V_targ(s))^2`` (:class:`NoopBackupConfig`).

Inputs: the cached features alone by default; ``critic.frame_stack``, ``critic.q_input`` and
``critic.text`` give the official critic's inputs (goal and action text through a Hugging Face encoder,
``[prev, cur]`` state frames, Q reading the V input: :mod:`digiq.models.critic_text`,
``configs/train-critic/official-aitw.yaml``).

All features sit in (device) memory as one tensor; a batch is a tensor gather by sampled row indices.
Outputs in ``output_dir``: ``config.yaml``, ``metrics.jsonl``, ``metrics.json`` (final validation
metrics), ``checkpoints/step-N/`` (one per epoch, the layout of :mod:`digiq.training.checkpoint`: critic,
EMA target, optimiser, scheduler, RNG) and the final ``critic/`` (load with
:func:`digiq.models.critic.load_critic`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from digiq.config import OptimConfig, WandbConfig, check, save_config, to_dict
from digiq.data.features import FeatureCache
from digiq.data.labels import dataset_labels
from digiq.data.schema import split_by_trajectory
from digiq.data.transitions import Transitions, check_candidate_counts, load_transitions
from digiq.errors import DataError
from digiq.losses import mc_loss, noop_q_loss, td_q_loss, td_target, td_v_loss
from digiq.models.change_probe import fit_change_probe
from digiq.models.critic import Critic, CriticArch, aggregate_twins, make_target, save_critic, soft_update
from digiq.models.critic_text import CriticInputs, TextEncoders, build_inputs, gather, score
from digiq.sim.layout import state_from_key
from digiq.sim.phone import SimPhone
from digiq.training.accelerator import make_accelerator, resolve_mixed_precision
from digiq.training.checkpoint import load_checkpoint, save_checkpoint
from digiq.training.output import begin_output, check_output, finish_output
from digiq.training.schedule import make_scheduler
from digiq.utils.io import atomic_write_json
from digiq.utils.logging import MetricsLogger, get_logger
from digiq.utils.seed import set_seed
from digiq.utils.stats import pearson, spearman

log = get_logger(__name__)
# Splits its work over the processes of a launcher (digiq.cli).
DISTRIBUTED = True

# q_star_fn(state_key, candidate_action_strings, gamma) -> exact Q* per candidate (np.ndarray (N,)).
QStarFn = Callable[[str, list[str], float], np.ndarray]
CRITIC_DIR = "critic"


@dataclasses.dataclass
class CriticTextConfig:
    # Hugging Face text encoder (AutoModel name or folder; official: roberta-base, default.yaml:19) that
    # embeds the goal, the previous action's type and typed text, and each candidate's type and typed text
    # (official critic.py:16-26,156-157). Empty: no text inputs.
    encoder: str = ""
    # One encoder per role (goal, action type, typed text) as the official three roberta-base; false = one
    # encoder shared by all roles (a third of the parameters, one pass per batch).
    separate: bool = True
    # Train the encoders with the heads (official: the critic's optimiser covers them, trainer.py:54-55).
    # false = frozen: each unique string is embedded once and cached next to the features.
    finetune: bool = False
    # Tokens per string (goals and typed texts are short).
    max_length: int = 128
    # Strings per encoder pass when embedding the frozen tables.
    batch_size: int = 256


@dataclasses.dataclass
class CriticNetConfig:
    # Hidden widths of each twin Q head on f(s, a) (official: 10752-3840x3, with RoBERTa inputs).
    q_hidden: tuple[int, ...] = (1024, 1024)
    # Hidden widths of each twin V head on f(s) (official: 2304x3).
    v_hidden: tuple[int, ...] = (1024, 1024)
    # LayerNorm after every hidden layer (the official MLPs have none); stabilises TD on raw VLM features.
    layer_norm: bool = True
    # Twin aggregation when scoring (Q, V, advantages) and, with target_pairing=aggregate, in the TD
    # targets: min = clipped double-Q; 'max' is the official scoring rule (trainer.py:264-265).
    aggregate: Literal["min", "max", "mean"] = "min"
    # TD targets: 'aggregate' backs up both heads from the twin-aggregated target heads; 'per_head' backs
    # up head i from target head i only (q_i <- r + gamma (1-d) V_targ_i(s'), v_i <- Q_targ_i(s, a')), the
    # official backup (trainer.py:148-152,173-175).
    target_pairing: Literal["aggregate", "per_head"] = "aggregate"
    # State features as frames [prev, cur] (step 0: [cur, cur]), as official offpolicy_train_loop.py:15-25.
    frame_stack: bool = False
    # Q's input: the action feature alone, or the V input first (official critic.py:157: state_action).
    q_input: Literal["action", "state_action"] = "action"
    # 'dueling': Q(s, a) = sg[V(s)] + A(f(s, a)), so the Q head fits advantages, not the between-state
    # spread of the TD targets (beyond the paper; docs/results.md measures it); 'direct' = the official Q.
    q_param: Literal["direct", "dueling"] = "direct"
    text: CriticTextConfig = dataclasses.field(default_factory=CriticTextConfig)
    # Standardise inputs with the feature mean/std of the training split (stored inside the critic).
    normalize_inputs: bool = True


@dataclasses.dataclass
class NoopBackupConfig:
    # Beyond the paper: a Bellman target for candidates the dataset never executed but that would leave the
    # screen as it was (a tap on nothing, Go on an empty field). Such an action leads back to the same state
    # with no reward, so Q(s, a) = gamma V(s); without it the critic sees returns for the dataset action
    # only and ranks unexecuted no-ops at random (on the simulator they are 47% of the candidates and the
    # argmax of the default critic on 27% of the validation states; docs/results.md). Which candidates
    # leave the screen unchanged is read off the cached features by a linear probe fitted on the dataset
    # actions' Stage-1 labels (s_t vs s_{t+1}, as Stage 1): no simulator knowledge.
    enabled: bool = False
    # A candidate counts as a no-op when the probe's P(screen changed) is below this (precision over recall:
    # a real state change wrongly backed up by gamma V(s) would teach a wrong value).
    threshold: float = 0.1
    # Weight of the no-op term against J_Q (one no-op candidate drawn per sampled row, of ~7 per state on
    # the simulator; 10 ranked better than 3 there, docs/results.md).
    weight: float = 10.0
    # The Stage-1 label's threshold and scale (mean squared pixel difference at 0.25x; finetune_vlm's).
    eps: float = 30.0
    scale: float = 0.25

    def validate(self, where: str = "noop") -> None:
        check(0.0 < self.threshold < 1.0, f"{where}.threshold must be in (0, 1), got {self.threshold}")
        check(self.weight > 0, f"{where}.weight must be > 0, got {self.weight}")
        check(self.eps >= 0 and 0 < self.scale <= 1, f"{where}.eps must be >= 0 and {where}.scale in (0, 1]")


@dataclasses.dataclass
class CriticOptimConfig(OptimConfig):
    """Adam for the heads. A subclass (not a default_factory) so partial overrides keep these defaults."""

    # Official critic_lr is 1e-5 for a 0.8B critic incl. RoBERTa; small MLP heads on features train faster.
    lr: float = 3e-4
    # No warm-up and a constant rate, as the official critic optimiser (Adam, no scheduler).
    warmup_ratio: float = 0.0
    scheduler: Literal["cosine", "constant", "linear"] = "constant"
    # Official: 0.01 over actor + critic together (trainer.py:343); 1.0 on the heads alone here.
    max_grad_norm: float = 1.0


@dataclasses.dataclass
class Config:
    # Dataset folder (digiq schema; only reward/done/traj_id/step_id/candidates/state_key are read).
    dataset: str = ""
    # Feature cache folder written by `digiq cache-features` or `digiq import` (one row per dataset row).
    features: str = ""
    output_dir: str = "runs/critic"
    # td = Digi-Q's Bellman backup; mc = regress Q and V on the discounted return (the paper's ablation).
    critic_loss: Literal["td", "mc"] = "td"
    # Discount (official default.yaml:26).
    gamma: float = 0.95
    # Action a' in V's target Q_targ(s, a'): the dataset action (official default) or a random stored candidate.
    backup_action: Literal["dataset", "candidate"] = "dataset"
    # EMA rate of the target heads, applied after every optimiser step (official tau = 0.10 per step).
    tau: float = 0.1
    # Fraction of trajectories held out for validation (the last ones, as the official 80/20 split).
    val_fraction: float = 0.2
    # Global batch (split evenly across processes). Official: 32 x 4 accumulation = 128.
    batch_size: int = 256
    # Optimiser steps per epoch; validation and a checkpoint follow every epoch (official: 40 x 20 epochs).
    steps_per_epoch: int = 100
    epochs: int = 20
    critic: CriticNetConfig = dataclasses.field(default_factory=CriticNetConfig)
    noop: NoopBackupConfig = dataclasses.field(default_factory=NoopBackupConfig)
    optim: CriticOptimConfig = dataclasses.field(default_factory=CriticOptimConfig)
    # Mixed precision for the heads ('auto': bf16 on a bf16 GPU, 'no' on the CPU); features keep the cache
    # dtype in memory.
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"
    # 'auto' = CUDA when visible, else CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Exact-Q* validation metrics for simulated data: auto = when rows have state_key and candidates.
    q_star: Literal["auto", "skip"] = "auto"
    # Rows per forward pass during validation.
    eval_batch_size: int = 4096
    # Log training losses every this many steps.
    log_every: int = 20
    # Keep the newest this many epoch checkpoints (older ones are deleted).
    keep_checkpoints: int = 2
    seed: int = 0
    # Continue from the newest checkpoint in output_dir (set by --resume).
    resume: bool = False
    # Replace a finished (or interrupted) run in output_dir instead of refusing it.
    overwrite: bool = False
    wandb: WandbConfig = dataclasses.field(default_factory=WandbConfig)

    def validate(self) -> None:
        check(bool(self.dataset), "dataset must be set (a dataset folder)")
        check(bool(self.features), "features must be set (a feature cache folder)")
        check(0.0 <= self.gamma < 1.0, f"gamma must be in [0, 1), got {self.gamma}")
        check(0.0 < self.tau <= 1.0, f"tau must be in (0, 1], got {self.tau}")
        check(0.0 <= self.val_fraction < 1.0, f"val_fraction must be in [0, 1), got {self.val_fraction}")
        check(self.batch_size > 0 and self.steps_per_epoch > 0 and self.epochs > 0, "batch/steps/epochs > 0")
        check(self.eval_batch_size > 0 and self.log_every > 0, "eval_batch_size and log_every must be > 0")
        check(self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1")
        check(all(w > 0 for w in (*self.critic.q_hidden, *self.critic.v_hidden)), "hidden widths must be > 0")
        check(self.critic.text.max_length > 0, "critic.text.max_length must be > 0")
        check(self.critic.text.batch_size > 0, "critic.text.batch_size must be > 0")
        check(
            bool(self.critic.text.encoder) or not self.critic.text.finetune,
            "critic.text.finetune needs critic.text.encoder",
        )
        check(
            self.critic.q_param != "dueling" or self.backup_action == "dataset",
            "critic.q_param=dueling backs V up from r + gamma V(s') of the dataset action; "
            "backup_action=candidate has no meaning there",
        )
        if self.noop.enabled:
            self.noop.validate("noop")
            check(
                not self.critic.text.encoder,
                "noop.enabled reads the cached features alone; it does not support critic.text.encoder",
            )
        self.optim.validate("optim")


# --------------------------------------------------------------------------------------------------
# Exact-Q* validation data
# --------------------------------------------------------------------------------------------------


def q_star_table(
    tr: Transitions, rows: np.ndarray, num_candidates: int, gamma: float, q_star_fn: QStarFn
) -> tuple[np.ndarray, np.ndarray]:
    """Exact Q* for every candidate of the simulated rows among ``rows``: (row ids (M,), Q* (M, N))."""
    keep, table = [], []
    for r in rows.tolist():
        cands = tr.candidates[r]
        if not tr.state_key[r] or len(cands) != num_candidates or num_candidates < 2:
            continue
        table.append(np.asarray(q_star_fn(tr.state_key[r], list(cands), gamma), dtype=np.float64))
        keep.append(r)
    if not keep:
        return np.zeros(0, np.int64), np.zeros((0, num_candidates))
    return np.asarray(keep, dtype=np.int64), np.stack(table)


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


# --------------------------------------------------------------------------------------------------
# Losses on a batch and validation
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DeviceData:
    """Everything a training step gathers from, on the training device."""

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

    def critic_inputs(self) -> CriticInputs:
        if self.inputs is None:
            self.inputs = CriticInputs(self.state, self.actions)
        return self.inputs


def backup_targets(
    v_next_all: torch.Tensor, q_back_all: torch.Tensor, pairing: str, how: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-twin TD targets (B, T) for the online heads from the target heads' (B, T) outputs.

    ``per_head``: twin i gets target twin i's value, unchanged (official ``trainer.py:148-152``);
    ``aggregate``: every twin gets the twin-aggregate (``how``) of the target heads.
    """
    if pairing == "per_head":
        return v_next_all, q_back_all
    if pairing != "aggregate":
        raise ValueError(f"unknown target_pairing {pairing!r}; use per_head or aggregate")
    T = v_next_all.shape[-1]
    v = aggregate_twins(v_next_all, how).unsqueeze(-1).expand(-1, T)
    q = aggregate_twins(q_back_all, how).unsqueeze(-1).expand(-1, T)
    return v, q


def batch_loss(
    model: torch.nn.Module,
    target: Critic | None,
    data: DeviceData,
    idx: torch.Tensor,
    cfg: Config,
    backup_col: torch.Tensor | None = None,
    noop_col: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss for rows ``idx``; ``model`` is the (possibly DDP-wrapped) critic, called once via forward().

    ``noop_col`` (B,): one candidate per row to back up as a no-op (its weight is ``data.noop``; rows with
    none carry weight 0), scored in the same forward as the dataset action.
    """
    inputs = data.critic_inputs()
    online = getattr(model, "module", model)
    b = gather(inputs, idx, 0, online.text)  # a fine-tuned encoder: one pass per encoder, with gradients
    if noop_col is None:
        q, v = model(b.state, b.action, b.state_text, b.action_text)  # (B, T) each
    else:
        pair = torch.stack([b.action, inputs.actions[idx, noop_col]], dim=1)  # (B, 2, Da)
        q2, v = model(b.state, pair, b.state_text, None)  # (B, 2, T), (B, T); text is refused by validate
        q, q_noop = q2[:, 0], q2[:, 1]
    T = q.shape[-1]
    if cfg.critic_loss == "mc":
        g = data.mc_return[idx].unsqueeze(-1).expand(-1, T)
        lq, lv = mc_loss(q, g), mc_loss(v, g)
    else:
        assert target is not None
        expand = lambda t: t.unsqueeze(-1).expand(-1, T)  # noqa: E731 - explicit (B,)->(B,T), no broadcasting
        with torch.no_grad():
            nb = gather(inputs, data.next_idx[idx], None, target.text)
            # The online batch's inputs serve the target too unless the target has its own (fine-tuned)
            # encoders or backs up another candidate.
            same = backup_col is None and (inputs.texts is None or inputs.tables is not None)
            tb = b if same else gather(inputs, idx, 0 if backup_col is None else backup_col, target.text)
            v_next, q_back = backup_targets(
                target.v_all(nb.state, nb.state_text).float(),
                target.q_all(tb.action, tb.state, tb.state_text, tb.action_text).float(),
                cfg.critic.target_pairing,
                cfg.critic.aggregate,
            )
        lq = td_q_loss(q.float(), expand(data.reward[idx]), expand(data.done[idx]), v_next, cfg.gamma)
        if cfg.critic.q_param == "dueling":
            # Q_targ(s, a') = V_targ(s) + A_targ(s, a') would regress V on itself: no anchor (measured: top-1
            # 0.41, V's correlation with the return halved). V's own TD target r + gamma V_targ(s') has the
            # fixed point V^beta, the same as E_{a'~beta} Q^beta(s, a') of the paper's J_V.
            v_back = td_target(expand(data.reward[idx]), expand(data.done[idx]), v_next, cfg.gamma)
            lv = td_v_loss(v.float(), v_back)
        else:
            lv = td_v_loss(v.float(), q_back)
    parts = {"loss_q": lq.detach(), "loss_v": lv.detach(), "q_mean": q.detach().mean()}
    loss = lq + lv
    if noop_col is not None:
        assert data.noop is not None
        w = data.noop[idx, noop_col].unsqueeze(-1).expand(-1, T)
        with torch.no_grad():
            # TD: the target heads' V(s), paired with the online heads as the J_Q backup. MC has no target
            # heads: its own V(s), a regression on the observed returns from s, stopped.
            v_s = target.v_all(b.state, b.state_text).float() if target is not None else v.detach().float()
            v_s, _ = backup_targets(v_s, v_s, cfg.critic.target_pairing if target is not None else "aggregate",
                                    cfg.critic.aggregate)  # fmt: skip
        ln = noop_q_loss(q_noop.float(), v_s, cfg.gamma, w)
        loss = loss + cfg.noop.weight * ln
        parts["loss_noop"] = ln.detach()
    return loss, parts


def train_step(
    model: torch.nn.Module,
    critic: Critic,
    target: Critic | None,
    opt: torch.optim.Optimizer,
    data: DeviceData,
    idx: torch.Tensor,
    cfg: Config,
    backup_col: torch.Tensor | None = None,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    noop_col: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimiser step: loss, backward, clip, Adam, target EMA. ``model`` may be DDP around ``critic``.

    Returns detached tensors (no host sync here: the caller decides when to read them).
    """
    with autocast():  # forward only; backward runs outside autocast as torch recommends
        loss, parts = batch_loss(model, target, data, idx, cfg, backup_col, noop_col)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.optim.max_grad_norm > 0:
        trainable = [p for p in critic.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.max_grad_norm, foreach=True)
    opt.step()
    if target is not None:
        soft_update(target, critic, cfg.tau)
    return loss.detach(), parts


@torch.no_grad()
def evaluate(
    critic: Critic,
    data: DeviceData,
    rows: np.ndarray,
    gamma: float,
    eval_batch_size: int,
    qstar_rows: np.ndarray | None = None,
    qstar: np.ndarray | None = None,
    qstar_groups: Sequence[str] | None = None,
) -> dict[str, float]:
    """Validation metrics on ``rows`` with the online critic (twin-aggregated); ``qstar_groups`` (one name per
    ``qstar_rows`` row, the simulator's screens) adds the top-1 agreement per group."""
    critic.eval()
    out: dict[str, float] = {}
    if len(rows) == 0:
        return out
    q_sa, v_s, td = [], [], []
    inputs = data.critic_inputs()
    for i in range(0, len(rows), eval_batch_size):
        idx = torch.as_tensor(rows[i : i + eval_batch_size], device=data.state.device)
        q, v = score(critic, inputs, idx, 0)
        _, v_next = score(critic, inputs, data.next_idx[idx], 0)
        td.append(q - (data.reward[idx] + gamma * (1 - data.done[idx]) * v_next))
        q_sa.append(q)
        v_s.append(v)
    q_np = torch.cat(q_sa).cpu().double().numpy()
    v_np = torch.cat(v_s).cpu().double().numpy()
    td_np = torch.cat(td).cpu().double().numpy()
    mc = data.mc_return[torch.as_tensor(rows, device=data.mc_return.device)].cpu().double().numpy()
    out["val/td_error"] = float(np.mean(td_np**2))
    out["val/q_mc_mse"] = float(np.mean((q_np - mc) ** 2))
    out["val/q_mc_pearson"] = pearson(q_np, mc)
    out["val/v_mc_pearson"] = pearson(v_np, mc)
    out["val/q_mean"] = float(q_np.mean())
    out["val/mc_mean"] = float(mc.mean())
    if qstar_rows is not None and qstar is not None and len(qstar_rows):
        out.update(qstar_metrics(critic, data, qstar_rows, qstar, eval_batch_size, qstar_groups))
    return out


@torch.no_grad()
def qstar_metrics(
    critic: Critic,
    data: DeviceData,
    rows: np.ndarray,
    qstar: np.ndarray,
    eval_batch_size: int,
    groups: Sequence[str] | None = None,
) -> dict[str, float]:
    """Top-1 agreement of argmax_i Q(s, a_i) with the Q*-optimal set, and mean Spearman(Q, Q*) per state.

    Padding candidates (``valid`` False) are excluded. A state whose Q* (or Q) is constant over its
    candidates has no defined Spearman and is left out of that mean (its count is reported).
    """
    chunk = max(1, eval_batch_size // max(1, data.actions.shape[1]))
    qs = []
    for i in range(0, len(rows), chunk):
        idx = torch.as_tensor(rows[i : i + chunk], device=data.actions.device)
        qs.append(score(critic, data.critic_inputs(), idx, slice(None))[0].cpu())
    q = torch.cat(qs).double().numpy()  # (M, N)
    valid = (
        np.ones_like(q, dtype=bool)
        if data.valid is None
        else data.valid[torch.as_tensor(rows, device=data.valid.device)].cpu().numpy()
    )
    return candidate_ranking(q, qstar, valid, groups)[0]


def candidate_ranking(
    q: np.ndarray, qstar: np.ndarray, valid: np.ndarray | None = None, groups: Sequence[str] | None = None
) -> tuple[dict[str, float], np.ndarray]:
    """Ranking of scores ``q`` (M, N) against reference values ``qstar`` (M, N) over the valid candidates:
    the metrics of :func:`qstar_metrics` and, per state, whether argmax ``q`` is a (tied) maximiser of
    ``qstar`` (M,) bool. Index 0 is the dataset action. ``groups`` (M names) adds ``val/qstar_top1/<name>``:
    the top-1 agreement within each group (on the simulator, per screen: where the critic ranks badly)."""
    if valid is None:
        valid = np.ones_like(q, dtype=bool)
    agree, behaviour, chance, rhos = [], [], [], []
    for j in range(len(q)):
        m = valid[j]
        qj, sj = q[j][m], qstar[j][m]
        best = sj >= sj.max() - 1e-6
        agree.append(bool(best[int(np.argmax(qj))]))
        behaviour.append(bool(best[0]))  # index 0 = the dataset action
        chance.append(best.mean())
        rho = spearman(qj, sj)
        if not math.isnan(rho):
            rhos.append(rho)
    metrics = {
        "val/qstar_top1_agreement": float(np.mean(agree)),
        "val/qstar_spearman": float(np.mean(rhos)) if rhos else float("nan"),
        "val/qstar_states": float(len(q)),
        "val/qstar_spearman_states": float(len(rhos)),
        # Context: how often the dataset action / a uniformly random candidate is Q*-optimal.
        "val/qstar_dataset_action_optimal": float(np.mean(behaviour)),
        "val/qstar_random_optimal": float(np.mean(chance)),
    }
    if groups is not None:
        if len(groups) != len(q):
            raise ValueError(f"{len(groups)} group names for {len(q)} states")
        hits: dict[str, list[bool]] = {}
        for g, a in zip(groups, agree):
            hits.setdefault(g, []).append(a)
        metrics.update({f"val/qstar_top1/{g}": float(np.mean(v)) for g, v in sorted(hits.items())})
    return metrics, np.asarray(agree, dtype=bool)


def sim_screens(state_keys: Sequence[str]) -> list[str] | None:
    """The simulator's screen of each state key (``home``, ``search``, ...); None if a key is not the
    simulator's."""
    try:
        return [state_from_key(k).screen for k in state_keys]
    except ValueError:
        return None


def noop_candidates(
    actions: torch.Tensor,
    valid: torch.Tensor | None,
    labels: np.ndarray,
    train_rows: np.ndarray,
    val_rows: np.ndarray,
    threshold: float,
    seed: int = 0,
    chunk: int = 1024,
) -> tuple[torch.Tensor, dict[str, float]]:
    """(R, N) float mask of the candidates to back up as no-ops, and the probe's diagnostics.

    A linear probe on the dataset action's features (column 0) of ``train_rows`` learns the Stage-1 label
    ``labels`` (R,); a candidate is a no-op where its P(changed) < ``threshold``. Column 0 (executed: it
    has its real transition) and padding are never masked.
    """
    y = torch.as_tensor(labels, dtype=torch.float32)
    tr = torch.as_tensor(train_rows, dtype=torch.long)
    probe = fit_change_probe(actions[tr.to(actions.device), 0].cpu(), y[tr], seed=seed).to(actions.device)
    p = torch.cat([probe(actions[i : i + chunk]) for i in range(0, len(actions), chunk)])  # (R, N)
    mask = p < threshold
    mask[:, 0] = False
    if valid is not None:
        mask &= valid.bool()
    stats = {
        "noop/candidates_masked": float(mask[:, 1:].float().mean()),
        "noop/rows_with_one": float(mask.any(1).float().mean()),
        "noop/train_label_positive": float(y[tr].mean()) if len(tr) else float("nan"),
    }
    if len(val_rows):
        vr = torch.as_tensor(val_rows, dtype=torch.long)
        pred = (p[vr.to(p.device), 0].cpu() >= 0.5).float()
        stats["noop/probe_val_accuracy"] = float((pred == y[vr]).float().mean())
    return mask.float(), stats


# --------------------------------------------------------------------------------------------------
# Recipe
# --------------------------------------------------------------------------------------------------


def _resume_state(resume_from: Path, arch: CriticArch, features: str) -> tuple[Any, CriticArch]:
    """The checkpoint to continue from and the critic architecture it was trained with."""
    ck = load_checkpoint(resume_from)
    ck_arch = CriticArch.from_json(ck.extra["arch"])
    if (ck_arch.state_dim, ck_arch.action_dim) != (arch.state_dim, arch.action_dim):
        raise DataError(
            f"feature dims of {features} (state {arch.state_dim}, action {arch.action_dim}) do not match "
            f"the checkpoint in {resume_from} (state {ck_arch.state_dim}, action {ck_arch.action_dim}): "
            "resume with the features the run started with, or start a new output_dir"
        )
    if ck_arch != arch:
        log.warning("critic settings differ from the checkpoint's; using the checkpoint's %s", ck_arch)
    return ck, ck_arch


def run(cfg: Config, q_star_fn: QStarFn | None = None) -> dict[str, float]:
    """Train the critic; returns the final validation metrics (also written to metrics.json).

    ``q_star_fn`` overrides the exact-Q* source for validation (default: the simulated device).
    """
    out = Path(cfg.output_dir)
    # Mixed precision is applied by this stage (torch.autocast), not by accelerate: accelerate's state is a
    # process-wide singleton that refuses a second, different mixed_precision in the same process (as an
    # in-process pipeline or test session would ask for). None = keep whatever the process already has.
    accelerator = make_accelerator(
        mixed_precision=None, cpu=None if cfg.device == "auto" else cfg.device == "cpu"
    )
    is_main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    check(
        cfg.batch_size % world == 0, f"batch_size {cfg.batch_size} must be divisible by the {world} processes"
    )
    local_batch = cfg.batch_size // world
    device = accelerator.device

    resume_from = check_output(out, cfg.resume, cfg.overwrite, "train-critic")
    # ---- inputs (checked before the output folder is touched) ---------------------------------------
    tr, ds = load_transitions(cfg.dataset, cfg.gamma)
    feats = FeatureCache.open(cfg.features)
    # The fingerprint catches a cache made for another dataset of the same length, and the candidate count
    # one made before `digiq candidates` changed the rows: both would otherwise train a critic on the
    # wrong features without any error.
    feats.check_against(len(tr.reward), dataset_path=cfg.dataset, fingerprint=ds._fingerprint)
    check_candidate_counts(tr.candidates, feats.num_candidates, cfg.dataset, cfg.features, ds)
    if tr.num_truncated and is_main:
        log.warning(
            "%d trajectorie(s) end without done=1 (truncated); their last step is treated as terminal",
            tr.num_truncated,
        )
    train_rows, val_rows = split_by_trajectory(ds, cfg.val_fraction)
    if len(train_rows) == 0:
        raise DataError(f"{cfg.dataset}: no training trajectories left after val_fraction={cfg.val_fraction}")
    N = feats.num_candidates
    if cfg.backup_action == "candidate" and N < 2:
        raise DataError(
            f"backup_action=candidate needs candidates in the feature cache, {cfg.features} has N=1"
        )
    arch = CriticArch(
        state_dim=feats.state_dim,
        action_dim=feats.action_dim,
        q_hidden=tuple(cfg.critic.q_hidden),
        v_hidden=tuple(cfg.critic.v_hidden),
        layer_norm=cfg.critic.layer_norm,
        aggregate=cfg.critic.aggregate,
        frame_stack=2 if cfg.critic.frame_stack else 1,
        q_input=cfg.critic.q_input,
        q_param=cfg.critic.q_param,
        text_encoder=cfg.critic.text.encoder,
        text_separate=cfg.critic.text.separate,
        text_max_length=cfg.critic.text.max_length,
        text_finetune=cfg.critic.text.finetune,
    )
    ck = None
    if resume_from is not None:
        ck, arch = _resume_state(resume_from, arch, cfg.features)
    text = None
    if arch.text_encoder:
        check(
            world == 1 or not arch.text_finetune,
            "critic.text.finetune runs on one process (its encoder passes sit outside the DDP forward)",
        )
        text = TextEncoders.load(arch.text_encoder, arch.text_separate, arch.text_max_length)
        arch = dataclasses.replace(arch, text_dim=text.hidden_size)
    begin_output(out, cfg.overwrite, accelerator)
    set_seed(cfg.seed + rank)

    data = DeviceData(
        state=feats.state.to(device),
        actions=feats.actions.to(device),
        valid=None if feats.valid is None else feats.valid.to(device),
        reward=torch.as_tensor(tr.reward, device=device),
        done=torch.as_tensor(tr.done, device=device),
        mc_return=torch.as_tensor(tr.mc_return, device=device),
        next_idx=torch.as_tensor(tr.next_idx, device=device),
    )
    del feats
    noop_stats: dict[str, float] = {}
    if cfg.noop.enabled:
        if N < 2:
            raise DataError(f"noop.enabled needs candidates in the feature cache, {cfg.features} has N=1")
        labels = dataset_labels(ds, cfg.noop.eps, cfg.noop.scale, cfg.dataset)
        # The same deterministic fit on every process (a few hundred full-batch steps on (R, Da)).
        data.noop, noop_stats = noop_candidates(
            data.actions, data.valid, labels, train_rows, val_rows, cfg.noop.threshold, seed=cfg.seed
        )
        if is_main:
            log.info("no-op backup: %s", {k: round(v, 4) for k, v in noop_stats.items()})

    # ---- model ----------------------------------------------------------------------------------
    torch.manual_seed(cfg.seed)  # identical init on every rank
    critic = Critic(arch, text).to(device)
    train_t = torch.as_tensor(train_rows, device=device)
    if ck is not None:
        ck.restore_weights(critic, trainable_only=False)
    elif cfg.critic.normalize_inputs:
        s_mean, s_std = feature_stats(data.state, train_t)
        a_mean, a_std = feature_stats(data.actions, train_t)
        critic.set_normalization(s_mean, s_std, a_mean, a_std)
    target = make_target(critic) if cfg.critic_loss == "td" else None
    if target is not None and ck is not None and ck.weights("target") is not None:
        ck.restore_weights(target, "target", trainable_only=False)
    if arch.frame_stack > 1 or arch.text_encoder:
        # Frozen encoders: every unique string embedded once (cached next to the features); fine-tuned
        # ones embed each batch's unique strings in the step.
        data.inputs = build_inputs(
            critic, data.state, data.actions, ds, cfg.features, tables=not arch.text_finetune,
            batch_size=cfg.critic.text.batch_size,
        )  # fmt: skip
    # One Adam over the heads and, when fine-tuned, the encoders (official trainer.py:54-55).
    opt = torch.optim.Adam(
        [p for p in critic.parameters() if p.requires_grad],
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        weight_decay=cfg.optim.weight_decay,
        foreach=True,
    )
    total = cfg.epochs * cfg.steps_per_epoch
    sched = make_scheduler(opt, cfg.optim.scheduler, total, cfg.optim.warmup_ratio)
    start_step, start_epoch = 0, 0
    if ck is not None:
        ck.restore_optimizer(critic, opt)
        ck.restore_scheduler(sched)
        ck.restore_rng(rank)
        start_step, start_epoch = ck.step, int(ck.position["epoch"])
    # DDP by hand (not accelerator.prepare) so that no process-wide autocast wrapper is attached to forward.
    model: torch.nn.Module = critic
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            critic, device_ids=[device.index] if device.type == "cuda" else None
        )
    use_bf16 = resolve_mixed_precision(cfg.mixed_precision, cpu=device.type != "cuda") == "bf16"

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    # ---- validation set-up (exact Q* on simulated data) -----------------------------------------
    qs_rows = qs_table = qs_screens = None
    if is_main and cfg.q_star == "auto" and len(val_rows):
        sim_rows = [r for r in val_rows.tolist() if tr.state_key[r] and len(tr.candidates[r]) == N and N >= 2]
        if sim_rows:
            fn = q_star_fn or SimPhone().q_star
            try:
                qs_rows, qs_table = q_star_table(tr, np.asarray(sim_rows), N, cfg.gamma, fn)
                qs_screens = sim_screens([tr.state_key[int(r)] for r in qs_rows])
            except Exception as e:  # noqa: BLE001 - a metric source must not kill the training run
                log.warning("exact Q* unavailable for these state keys (%s): skipping the Q* metrics", e)

    if is_main:
        save_config(cfg, out)
    logger = MetricsLogger(
        out, cfg.wandb, to_dict(cfg), enabled=is_main, resume_step=start_step if ck is not None else None
    )
    log.info(
        "critic: %d train / %d val rows, N=%d, Ds=%d, Da=%d, %d params, %d steps on %s x%d",
        len(train_rows), len(val_rows), N, arch.state_dim, arch.action_dim,
        sum(p.numel() for p in critic.parameters()), total, device, world,
    )  # fmt: skip

    gen = torch.Generator(device="cpu")
    train_cpu = torch.as_tensor(train_rows)
    valid_cpu = None if data.valid is None else data.valid.cpu().float()
    noop_cpu = None if data.noop is None else data.noop.cpu()
    step = start_step
    metrics: dict[str, float] = {}
    bar = tqdm(total=total, initial=start_step, disable=not is_main, desc="train-critic")
    for epoch in range(start_epoch, cfg.epochs):
        # Sampling depends only on (seed, rank, epoch): resuming at an epoch boundary replays it exactly.
        gen.manual_seed(cfg.seed * 1_000_003 + rank * 7_919 + epoch)
        model.train()
        for _ in range(cfg.steps_per_epoch):
            idx_cpu = train_cpu[torch.randint(len(train_cpu), (local_batch,), generator=gen)]
            col = None
            if cfg.critic_loss == "td" and cfg.backup_action == "candidate":
                if valid_cpu is None:
                    col = torch.randint(N, (local_batch,), generator=gen)
                else:
                    col = torch.multinomial(valid_cpu[idx_cpu], 1, generator=gen).squeeze(1)
                col = col.to(device, non_blocking=True)
            ncol = None
            if noop_cpu is not None:
                w = noop_cpu[idx_cpu]  # advanced indexing copies: the mask itself is not written
                w[w.sum(1) == 0, 0] = 1.0  # a row without no-ops draws column 0, whose weight is 0
                ncol = torch.multinomial(w, 1, generator=gen).squeeze(1).to(device, non_blocking=True)
            idx = idx_cpu.to(device, non_blocking=True)
            lr = opt.param_groups[0]["lr"]  # the rate of this update (the scheduler moves it after the step)
            loss, parts = train_step(model, critic, target, opt, data, idx, cfg, col, autocast, ncol)
            sched.step()
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == total:
                logs = {k: float(v) for k, v in parts.items()}
                logs["loss"] = float(loss)
                logs["lr"] = lr
                if not math.isfinite(logs["loss"]):
                    raise DataError(f"critic loss became {logs['loss']} at step {step}: lower optim.lr")
                logger.log({f"train/{k}": v for k, v in logs.items()}, step)
                bar.set_postfix(loss=f"{logs['loss']:.4f}")
        # ---- end of epoch: validate (main process) + checkpoint (every process; the main one writes) ----
        if is_main:
            metrics = evaluate(
                critic, data, val_rows, cfg.gamma, cfg.eval_batch_size, qs_rows, qs_table, qs_screens
            )
            metrics.update(epoch=float(epoch + 1), **noop_stats)
            logger.log(metrics, step)
            shown = {k: round(v, 4) for k, v in metrics.items() if k.startswith("val/")}
            log.info("epoch %d/%d step %d: %s", epoch + 1, cfg.epochs, step, shown)
        save_checkpoint(
            out, step, critic, opt, sched, position={"epoch": epoch + 1}, extra={"arch": arch.to_json()},
            keep=cfg.keep_checkpoints, trainable_only=False, others=None if target is None else {"target": target},
            accelerator=accelerator,
        )  # fmt: skip
    bar.close()

    if is_main:
        if not metrics:  # resumed a finished run: recompute the final metrics
            metrics = evaluate(
                critic, data, val_rows, cfg.gamma, cfg.eval_batch_size, qs_rows, qs_table, qs_screens
            )
            metrics.update(noop_stats)
        metrics["step"] = float(step)
        save_critic(
            critic,
            out / CRITIC_DIR,
            extra={"gamma": cfg.gamma, "critic_loss": cfg.critic_loss, "step": step, "features": str(cfg.features),
                   "dataset": str(cfg.dataset), "val_fraction": cfg.val_fraction},
        )  # fmt: skip
        atomic_write_json(out / "metrics.json", {k: (None if isinstance(v, float) and math.isnan(v) else v)
                                                 for k, v in metrics.items()})  # fmt: skip
        finish_output(out, {"step": step})
        log.info("critic written to %s", out / CRITIC_DIR)
    logger.finish()
    accelerator.wait_for_everyone()
    return metrics
