"""Stage 2: train twin Q/V heads on cached VLM features (TD, as Digi-Q, or the MC-regression ablation).

    digiq train-critic --config configs/train-critic/td.yaml dataset=data/sim features=runs/feats \\
        output_dir=runs/critic
    digiq train-critic --config configs/train-critic/mc.yaml ...          # MC ablation
    digiq train-critic ... --resume                                       # continue from the last epoch
    accelerate launch --multi_gpu --num_processes 2 -m digiq train-critic ...   # multi-GPU (DDP)

TD (Digi-Q's backup, DigiRL-agent/digiq @ 8181379 ``trainer.py:133-176``) or MC (the paper's ablation: both
heads regress on the discounted return, recomputed from the rewards with ``gamma`` as
``offpolicy_train_loop.py:110``). ``backup_action`` picks a' in V's target Q_targ(s, a'),
``critic.target_pairing`` which target head backs up which online head (``per_head`` is the official backup,
``trainer.py:148-152,173-175``; ``critic.aggregate: max`` alone does not reproduce it), ``noop.enabled``
(beyond the paper; the pipeline's default) adds ``noop.weight * (Q(s, a) - gamma V_targ(s))^2`` for the
candidates a linear probe on the Stage-1 labels reads as leaving the screen unchanged, and
``conservative.weight`` (beyond the paper, off by default) adds CQL's regulariser over the stored candidates, and
``critic.frame_stack`` / ``q_input`` / ``text`` give the official critic's inputs
(:mod:`digiq.models.critic_text`, ``configs/train-critic/official-aitw.yaml``).

This module is the recipe (configs, set-up, train loop, checkpoints, evaluation). The objectives and the
update are :class:`digiq.training.critic_learner.CriticLearner`'s, data staging and batch sampling
:mod:`digiq.training.critic_data`'s, the validation metrics :mod:`digiq.training.critic_metrics`'s. Outputs
in ``output_dir``: ``config.yaml``, ``metrics.jsonl``, ``metrics.json`` (final validation metrics),
``checkpoints/step-N/`` (one per epoch, the layout of :mod:`digiq.training.checkpoint`: critic, EMA target,
optimiser, scheduler, RNG) and the final ``critic/`` (:func:`digiq.models.critic.load_critic`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from digiq.config import OptimConfig, WandbConfig, check, save_config, to_dict
from digiq.data.labels import dataset_labels
from digiq.data.schema import dataset_info
from digiq.envs.registry import env_for_dataset
from digiq.errors import DataError
from digiq.models.change_probe import noop_candidates
from digiq.models.critic import Critic, CriticArch, CriticNetConfig, save_critic
from digiq.models.critic_text import TextEncoders, build_inputs
from digiq.training.accelerator import make_accelerator, resolve_mixed_precision
from digiq.training.checkpoint import load_checkpoint, save_checkpoint
from digiq.training.critic_data import RowSampler, StagedTensors, feature_stats, open_critic_data
from digiq.training.critic_learner import CriticLearner, Objective
from digiq.training.critic_metrics import QStarFn, QStarSet, validation_metrics
from digiq.training.output import begin_output, check_output, finish_output
from digiq.training.schedule import make_scheduler
from digiq.utils.io import atomic_write_json
from digiq.utils.logging import MetricsLogger, get_logger
from digiq.utils.seed import set_seed

log = get_logger(__name__)
# Splits its work over the processes of a launcher (digiq.cli).
DISTRIBUTED = True

CRITIC_DIR = "critic"


@dataclasses.dataclass
class NoopBackupConfig:
    # Beyond the paper: a Bellman target for candidates the dataset never executed but that would leave the
    # screen as it was (a tap on nothing, Go on an empty field). Such an action leads back to the same state
    # with no reward, so Q(s, a) = gamma V(s); without it the critic sees returns for the dataset action
    # only and ranks unexecuted no-ops at random (on the simulator they are 47% of the candidates and the
    # argmax of the default critic on 27% of the validation states; docs/experiments/2026-12-07-sim-v1.md). Which candidates
    # leave the screen unchanged is read off the cached features by a linear probe fitted on the dataset
    # actions' Stage-1 labels (s_t vs s_{t+1}, as Stage 1): no simulator knowledge.
    enabled: bool = False
    # A candidate counts as a no-op when the probe's P(screen changed) is below this (precision over recall:
    # a real state change wrongly backed up by gamma V(s) would teach a wrong value).
    threshold: float = 0.1
    # Weight of the no-op term against J_Q (one no-op candidate drawn per sampled row, of ~7 per state on
    # the simulator; 10 ranked better than 3 there, docs/experiments/2026-12-07-sim-v1.md).
    weight: float = 10.0
    # The Stage-1 label's threshold and scale (mean squared pixel difference at 0.25x; finetune_vlm's).
    eps: float = 30.0
    scale: float = 0.25

    def validate(self, where: str = "noop") -> None:
        check(0.0 < self.threshold < 1.0, f"{where}.threshold must be in (0, 1), got {self.threshold}")
        check(self.weight > 0, f"{where}.weight must be > 0, got {self.weight}")
        check(self.eps >= 0 and 0 < self.scale <= 1, f"{where}.eps must be >= 0 and {where}.scale in (0, 1]")


@dataclasses.dataclass
class ConservativeConfig:
    # Beyond the paper: CQL's regulariser (Kumar et al. 2020, Eq. 4) with the stored candidates as the action
    # set, tau * logsumexp_j Q(s, a_j) / tau - Q(s, a_data). The TD backup fits Q on executed actions only, so
    # a candidate no episode tried gets whatever value its features generalise to, and Best-of-N imitates the
    # candidates the critic over-rates (on MiniWoB++ most kept states imitated an unseen candidate,
    # docs/miniwob.md). 0 = off (the paper's critic).
    weight: float = 0.0
    temperature: float = 1.0
    # Candidates per row in the term: the dataset action and num_candidates - 1 others drawn uniformly per step
    # (CQL samples its action set too); 0 = every stored candidate. Scoring all 16 makes each step's Q forward
    # 16 times larger.
    num_candidates: int = 0

    def validate(self, where: str = "conservative") -> None:
        check(self.weight >= 0, f"{where}.weight must be >= 0, got {self.weight}")
        check(
            self.num_candidates == 0 or self.num_candidates >= 2,
            f"{where}.num_candidates must be 0 (all) or >= 2 (the dataset action and another), got {self.num_candidates}",
        )
        check(self.temperature > 0, f"{where}.temperature must be > 0, got {self.temperature}")


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
    conservative: ConservativeConfig = dataclasses.field(default_factory=ConservativeConfig)
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
        self.conservative.validate("conservative")
        check(
            self.conservative.weight == 0 or not self.critic.text.encoder,
            "conservative.weight > 0 scores every stored candidate from the cached features; it does not "
            "support critic.text.encoder",
        )
        self.optim.validate("optim")


# --------------------------------------------------------------------------------------------------
# Recipe: setup (data, model, learner), train loop, checkpoint, evaluation
# --------------------------------------------------------------------------------------------------


def objective(cfg: Config) -> Objective:
    """The learner's objective for ``cfg`` (the dueling V target follows the critic's own q_param)."""
    return Objective(
        loss=cfg.critic_loss, gamma=cfg.gamma, tau=cfg.tau, target_pairing=cfg.critic.target_pairing,
        aggregate=cfg.critic.aggregate, noop_weight=cfg.noop.weight, max_grad_norm=cfg.optim.max_grad_norm,
        conservative_weight=cfg.conservative.weight, conservative_temperature=cfg.conservative.temperature,
    )  # fmt: skip


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

    ``q_star_fn`` overrides the exact-Q* source for validation (default: the dataset's environment's).
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
    device = accelerator.device

    # ---- inputs (checked before the output folder is touched) ---------------------------------------
    plan = check_output(out, cfg.resume, cfg.overwrite, "train-critic", cfg)
    resume_from = plan.resume_from
    cd = open_critic_data(cfg.dataset, cfg.features, cfg.gamma, cfg.val_fraction, warn=is_main)
    tr, ds, N = cd.transitions, cd.dataset, cd.features.num_candidates
    train_rows, val_rows = cd.train_rows, cd.val_rows
    if cfg.backup_action == "candidate":
        cd.require_candidates("backup_action=candidate")
    if cfg.noop.enabled:
        cd.require_candidates("noop.enabled")
    if cfg.conservative.weight > 0:
        cd.require_candidates("conservative.weight > 0")
    arch = cfg.critic.arch(cd.features.state_dim, cd.features.action_dim)
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
    begin_output(plan, accelerator)
    set_seed(cfg.seed + rank)

    data = StagedTensors.stage(cd.features, tr, device)
    del cd
    noop_stats: dict[str, float] = {}
    if cfg.noop.enabled:
        labels = dataset_labels(ds, cfg.noop.eps, cfg.noop.scale, cfg.dataset)
        # The same deterministic fit on every process (a few hundred full-batch steps on (R, Da)).
        data.noop, noop_stats = noop_candidates(
            data.actions, data.valid, labels, train_rows, val_rows, cfg.noop.threshold, seed=cfg.seed
        )
        if is_main:
            log.info("no-op backup: %s", {k: round(v, 4) for k, v in noop_stats.items()})

    # ---- model and learner ----------------------------------------------------------------------
    torch.manual_seed(cfg.seed)  # identical init on every rank
    critic = Critic(arch, text).to(device)
    if ck is not None:
        ck.restore_weights(critic, trainable_only=False)
    elif cfg.critic.normalize_inputs:
        train_t = torch.as_tensor(train_rows, device=device)
        s_mean, s_std = feature_stats(data.state, train_t)
        a_mean, a_std = feature_stats(data.actions, train_t)
        critic.set_normalization(s_mean, s_std, a_mean, a_std)
    # The target heads copy the critic as it now stands (normalisation set or weights restored).
    learner = CriticLearner.create(
        critic, objective(cfg), cfg.optim.lr, tuple(cfg.optim.betas), cfg.optim.weight_decay
    )
    target, opt = learner.target, learner.optimizer
    if target is not None and ck is not None and ck.weights("target") is not None:
        ck.restore_weights(target, "target", trainable_only=False)
    if arch.frame_stack > 1 or arch.text_encoder:
        # Frozen encoders: every unique string embedded once (cached next to the features); fine-tuned
        # ones embed each batch's unique strings in the step.
        data.inputs = build_inputs(
            critic, data.state, data.actions, ds, cfg.features, tables=not arch.text_finetune,
            batch_size=cfg.critic.text.batch_size,
        )  # fmt: skip
    total = cfg.epochs * cfg.steps_per_epoch
    sched = make_scheduler(opt, cfg.optim.scheduler, total, cfg.optim.warmup_ratio)
    start_step, start_epoch = 0, 0
    if ck is not None:
        ck.restore_optimizer(critic, opt)
        ck.restore_scheduler(sched)
        ck.restore_rng(rank)
        start_step, start_epoch = ck.step, int(ck.position["epoch"])
    # DDP by hand (not accelerator.prepare) so that no process-wide autocast wrapper is attached to forward.
    if world > 1:
        learner.model = torch.nn.parallel.DistributedDataParallel(
            critic, device_ids=[device.index] if device.type == "cuda" else None
        )
    use_bf16 = resolve_mixed_precision(cfg.mixed_precision, cpu=device.type != "cuda") == "bf16"
    learner.autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    # ---- validation set-up (exact Q* where the dataset's environment has one, main process) ----------
    qs = QStarSet()  # exact Q* of the validation rows where the environment has one (main process)
    if is_main and cfg.q_star == "auto":
        env = env_for_dataset(dataset_info(cfg.dataset).get("source"))
        qs = QStarSet.build(tr, val_rows, N, cfg.gamma, q_star_fn, env)
    validate = functools.partial(
        validation_metrics, critic, data, val_rows, cfg.gamma, cfg.eval_batch_size, qs
    )

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

    # ---- train loop ----------------------------------------------------------------------------------
    backup_candidate = cfg.critic_loss == "td" and cfg.backup_action == "candidate"
    sampler = RowSampler(
        train_rows, cfg.batch_size // world, data, backup_candidate, cfg.seed, rank,
        conservative_candidates=cfg.conservative.num_candidates if cfg.conservative.weight > 0 else 0,
    )  # fmt: skip
    step = start_step
    metrics: dict[str, float] = {}
    bar = tqdm(total=total, initial=start_step, disable=not is_main, desc="train-critic")
    for epoch in range(start_epoch, cfg.epochs):
        sampler.start_epoch(epoch)  # (seed, rank, epoch) alone: a resumed epoch replays exactly
        learner.model.train()
        for _ in range(cfg.steps_per_epoch):
            lr = opt.param_groups[0]["lr"]  # the rate of this update (the scheduler moves it after the step)
            loss, parts = learner.step(data, sampler.draw(device))
            sched.step()
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == total:
                logs = {**{k: float(v) for k, v in parts.items()}, "loss": float(loss), "lr": lr}
                if not math.isfinite(logs["loss"]):
                    raise DataError(f"critic loss became {logs['loss']} at step {step}: lower optim.lr")
                logger.log({f"train/{k}": v for k, v in logs.items()}, step)
                bar.set_postfix(loss=f"{logs['loss']:.4f}")
        # ---- end of epoch: validate (main process) + checkpoint (every process; the main one writes) ----
        if is_main:
            metrics = {**validate(), "epoch": float(epoch + 1), **noop_stats}
            logger.log(metrics, step)
            shown = {k: round(v, 4) for k, v in metrics.items() if k.startswith("val/")}
            log.info("epoch %d/%d step %d: %s", epoch + 1, cfg.epochs, step, shown)
        save_checkpoint(
            out, step, critic, opt, sched, position={"epoch": epoch + 1}, extra={"arch": arch.to_json()},
            keep=cfg.keep_checkpoints, trainable_only=False, others=None if target is None else {"target": target},
            accelerator=accelerator,
        )  # fmt: skip
    bar.close()

    # ---- final critic and metrics --------------------------------------------------------------------
    if is_main:
        if not metrics:  # resumed a finished run: recompute the final metrics
            metrics = {**validate(), **noop_stats}
        metrics["step"] = float(step)
        save_critic(
            critic,
            out / CRITIC_DIR,
            extra={"gamma": cfg.gamma, "critic_loss": cfg.critic_loss, "step": step, "features": str(cfg.features),
                   "dataset": str(cfg.dataset), "val_fraction": cfg.val_fraction},
            overwrite=True,  # this run's own critic/ (a resumed run rewrites it); the run folder was guarded
        )  # fmt: skip
        atomic_write_json(out / "metrics.json", {k: (None if isinstance(v, float) and math.isnan(v) else v)
                                                 for k, v in metrics.items()})  # fmt: skip
        finish_output(out, {"step": step})
        log.info("critic written to %s", out / CRITIC_DIR)
    logger.finish()
    accelerator.wait_for_everyone()
    return metrics
