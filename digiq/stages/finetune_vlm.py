"""Stage 1: fine-tune a VLM to answer "does this action visibly change the screen?" (Yes/No).

Digi-Q's off-the-shelf VLM features make the critic ignore the action (paper: 31.9% vs 58.0% on Web
Shopping); this stage teaches the VLM which actions matter before its features are frozen for Stage 2.
For each dataset row we build the prompt for (s_t, goal, previous action, dataset action), label it with
:func:`digiq.data.labels.screen_changed` (s_t vs s_{t+1}, eps 30 at 0.25x; DigiRL-agent/digiq @ 8181379,
``construct_sft_data.py:23-37``) and
train cross-entropy on the answer token "Yes"/"No" at the last prompt position.

    digiq finetune-vlm --config configs/finetune-vlm/tiny.yaml dataset=data/sim output_dir=runs/vlm
    digiq finetune-vlm --config configs/finetune-vlm/tiny.yaml output_dir=runs/vlm --resume
    accelerate launch --config_file configs/accelerate/ddp_multi_gpu.yaml -m digiq finetune-vlm \\
        --config configs/finetune-vlm/llava-1.5-7b.yaml dataset=data/aitw output_dir=runs/vlm7b

Outputs (``output_dir``): ``config.yaml``, ``metrics.jsonl`` (+ wandb, offline by default),
``checkpoints/step-N/`` (trainable weights, optimizer, scheduler, RNG and data position: the layout of
:mod:`digiq.training.checkpoint`), ``model/`` (``save_pretrained`` model + processor, loadable with ``load_vlm``),
``metrics.json`` (final held-out accuracy / AUC / confusion matrix, majority baseline, time), and
``_COMPLETE`` once everything is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from tqdm.auto import tqdm

from digiq.actions import ActionType, parse_action
from digiq.config import LoraConfig, ModelConfig, OptimConfig, WandbConfig, check, save_config, to_dict
from digiq.data.labels import dataset_labels, label_stats
from digiq.data.schema import (
    decode_batch,
    load_dataset,
    split_by_trajectory,
    undecoded_view,
)
from digiq.errors import DataError
from digiq.models.families import FAMILIES
from digiq.models.prompts import make_inputs, previous_action_from_observation, yes_no_token_ids
from digiq.models.vlm import answer_logits, export_state, family_of, load_vlm, save_vlm
from digiq.training.accelerator import make_accelerator, train_dtype
from digiq.training.checkpoint import inner, load_checkpoint, save_checkpoint
from digiq.training.data_order import epoch_order
from digiq.training.output import begin_output, check_output, finish_output
from digiq.training.schedule import make_scheduler
from digiq.utils.io import OutputPlan, atomic_write_json, staged_dir
from digiq.utils.logging import MetricsLogger, get_logger
from digiq.utils.seed import set_seed

log = get_logger(__name__)
# Splits its work over the processes of a launcher (digiq.cli).
DISTRIBUTED = True


@dataclasses.dataclass
class Config:
    # Dataset folder (digiq schema, written by `digiq collect` or `digiq import`).
    dataset: str = "data/sim"
    # Run folder: config.yaml, metrics, checkpoints/, model/.
    output_dir: str = "runs/finetune_vlm"
    # The VLM to fine-tune (hub id, local folder such as a train-bc policy, or tiny:<family>). The default
    # is a random tiny Idefics3 of the same kind as train-bc's pi_beta (128 px screens, 16 px patches), so
    # that Stage 1 can start from pi_beta's weights (configs/finetune-vlm/tiny.yaml; the pipeline's
    # stage1_init=bc). From random weights it reaches 0.850 held-out, from pi_beta's 0.922.
    model: ModelConfig = dataclasses.field(
        default_factory=lambda: ModelConfig(name_or_path="tiny:idefics3@image_size=128,patch=16")
    )
    # LoRA (off = full fine-tuning, the official Stage 1 and the default for tiny random models).
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    optim: OptimConfig = dataclasses.field(
        default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.0, warmup_ratio=0.05)
    )
    wandb: WandbConfig = dataclasses.field(default_factory=WandbConfig)
    # How the dataset action is shown: 'overlay' draws a cursor / arrow on the screenshot (official);
    # 'text' writes the coordinates only (the rendering whose prompt prefix Stage 2 can share).
    rendering: Literal["overlay", "text"] = "overlay"
    # Screen-change threshold on mean squared pixel difference (0-255) at label_scale (official: 30 at 0.25).
    eps: float = 30.0
    label_scale: float = 0.25
    # Fraction of trajectories (the last ones, official order) held out for evaluation.
    val_fraction: float = 0.2
    # 4, not 8: on the simulator's pipeline data (2 Stage-1 seeds x 3 critic seeds x 200 test episodes) the
    # policy extracted on 4-epoch features solves 0.598 [0.569, 0.625] against 0.608 [0.580, 0.636] after 8
    # epochs, with the same critic top-1 (0.499 vs 0.482), at half Stage 1's time (docs/experiments/2026-12-07-sim-v1.md).
    epochs: int = 4
    # Stop after this many optimizer steps (0 = run all epochs).
    max_steps: int = 0
    # LR multiplier for the vision tower and projector (parameters named visual / vision_tower /
    # vision_model / multi_modal_projector / connector): a from-scratch tiny tower has to learn to find
    # the cursor, the language side only to read one decision off it.
    vision_lr_scale: float = 1.0
    # Per-process micro-batch size; the effective batch is batch_size x processes x grad_accum.
    batch_size: int = 16
    grad_accum: int = 1
    eval_batch_size: int = 32
    # Cap rows (0 = all): for smoke tests and quick runs.
    max_train_rows: int = 0
    max_val_rows: int = 0
    # Autocast precision through accelerate ('auto': the launcher's, else bf16 on a bf16 GPU, 'no' = fp32
    # on the CPU).
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    # Save a checkpoint every N optimizer steps (0 = at the end of each epoch only).
    save_every: int = 0
    # Keep the newest N checkpoints (older ones are deleted).
    keep_checkpoints: int = 2
    # Evaluate every N optimizer steps as well (0 = at the end of each epoch only).
    eval_every: int = 0
    # With LoRA: write merged plain weights to model/ (true) or the adapter + base id (false).
    merge_lora: bool = True
    seed: int = 0
    # Continue from the newest checkpoint in output_dir (optimizer, scheduler, RNG, step, data position).
    resume: bool = False
    # Replace an existing run in output_dir (otherwise refuse to clobber it).
    overwrite: bool = False
    log_every: int = 10
    progress: bool = True

    def validate(self) -> None:
        check(0.0 < self.val_fraction < 1.0, f"val_fraction must be in (0, 1), got {self.val_fraction}")
        check(self.epochs > 0, "epochs must be > 0")
        check(self.max_steps >= 0, "max_steps must be >= 0")
        check(self.batch_size > 0 and self.eval_batch_size > 0, "batch sizes must be > 0")
        check(self.grad_accum > 0, "grad_accum must be > 0")
        check(self.vision_lr_scale > 0, "vision_lr_scale must be > 0")
        check(self.eps >= 0, "eps must be >= 0")
        check(0 < self.label_scale <= 1, "label_scale must be in (0, 1]")
        check(self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1")
        check(not (self.resume and self.overwrite), "resume and overwrite cannot both be set")
        self.optim.validate()
        self.lora.validate()


# --------------------------------------------------------------------------------------------------
# Metrics (pure functions)
# --------------------------------------------------------------------------------------------------


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC by the Mann-Whitney rank statistic (ties get average ranks); NaN if one class is absent."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over runs of tied scores
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def confusion(pred: np.ndarray, labels: np.ndarray) -> list[list[int]]:
    """``[[tn, fp], [fn, tp]]`` (rows = true class, columns = predicted)."""
    pred, labels = np.asarray(pred).astype(bool), np.asarray(labels).astype(bool)
    return [
        [int((~labels & ~pred).sum()), int((~labels & pred).sum())],
        [int((labels & ~pred).sum()), int((labels & pred).sum())],
    ]


def yes_no_loss(
    logits: torch.Tensor, labels: torch.Tensor, yes_id: int, no_id: int, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy of the answer token (full vocabulary, as SFT on "Yes"/"No" does).

    The target is built on the logits' device whatever the labels' device (labels come from the CPU batch,
    logits from the GPU)."""
    labels = labels.to(logits.device)
    target = torch.where(labels.bool(), torch.full_like(labels, yes_id), torch.full_like(labels, no_id))
    return F.cross_entropy(logits.float(), target.long(), reduction=reduction)


def p_yes(logits: torch.Tensor, yes_id: int, no_id: int) -> torch.Tensor:
    """P(Yes) renormalised over {Yes, No}."""
    two = torch.stack([logits[:, no_id], logits[:, yes_id]], dim=-1).float()
    return two.softmax(-1)[:, 1]


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


class Stage1Data:
    """Rows of a dataset with their screen-change labels; builds model inputs for index batches."""

    def __init__(self, path: str, eps: float, scale: float, processor: Any, rendering: str) -> None:
        self.path = path
        self.ds = load_dataset(path)
        self.processor = processor
        self.rendering = rendering
        # A missing/corrupt screenshot is a DataError naming the dataset, trajectory, step and column
        # (datasets' own decoder gives a bare PIL traceback).
        self.labels = dataset_labels(self.ds, eps, scale, path)
        self.view = undecoded_view(self.ds, ["screenshot", "task", "observation", "action"])
        self.kinds = np.asarray([action_kind(a) for a in self.ds["action"]])

    def batch(self, rows: np.ndarray) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        got = decode_batch(self.view[[int(r) for r in rows]], self.path)
        inputs = make_inputs(
            self.processor,
            got["screenshot"],
            got["task"],
            [previous_action_from_observation(o) for o in got["observation"]],
            got["action"],
            self.rendering,
        )
        return inputs, torch.as_tensor(self.labels[rows])


def action_kind(action: str) -> str:
    """The action's type for per-type metrics: ``tap``, ``swipe``, ``type``, ``press_back``, ..."""
    a = parse_action(action)
    if a.type is ActionType.DUAL_POINT:
        return "tap" if a.is_tap else "swipe"
    return a.type.name.lower()


def accuracy_by_kind(pred: np.ndarray, labels: np.ndarray, kinds: np.ndarray) -> dict[str, dict[str, float]]:
    """Accuracy, count and positive fraction per action type (where the errors are: taps vs the rest)."""
    out = {}
    for k in sorted(set(kinds.tolist())):
        m = kinds == k
        out[k] = {
            "accuracy": float((pred[m] == labels[m]).mean()),
            "count": int(m.sum()),
            "positive_fraction": float(labels[m].mean()),
        }
    return out


def param_groups(model: torch.nn.Module, lr: float, vision_lr_scale: float) -> list[dict[str, Any]]:
    """Trainable parameters as AdamW groups: the vision side (the family's ``vision_modules``) at
    ``lr * vision_lr_scale``, the rest at ``lr``.

    Always two groups (one may be empty) so a checkpoint's optimizer state lines up on resume."""
    names = "|".join(re.escape(m) for m in FAMILIES[family_of(model)].vision_modules)
    vision_param = re.compile(rf"(^|\.)({names})\.")
    vision, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (vision if vision_param.search(name) else rest).append(p)
    return [{"params": rest, "lr": lr}, {"params": vision, "lr": lr * vision_lr_scale}]


# --------------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model: Any, data: Stage1Data, rows: np.ndarray, accelerator: Accelerator, yes_id: int, no_id: int, bs: int
) -> dict:
    """Held-out accuracy, AUC, confusion matrix and loss; rows are sharded over processes and gathered."""
    model.eval()
    world, rank = accelerator.num_processes, accelerator.process_index
    per = math.ceil(len(rows) / world)
    mine = rows[rank * per : (rank + 1) * per]
    probs, labs, losses = [], [], []
    for s in range(0, per, bs):
        chunk = mine[s : s + bs]
        n = len(chunk)
        if n == 0:  # keep the collective calls aligned across processes
            chunk = rows[:1]
        inputs, y = data.batch(chunk)
        inputs = {k: v.to(accelerator.device) for k, v in inputs.items()}
        with accelerator.autocast():
            logits = answer_logits(model, inputs)
        pr = p_yes(logits, yes_id, no_id).cpu()
        lo = yes_no_loss(logits, y, yes_id, no_id, reduction="none").cpu()
        pad = bs - len(chunk)
        valid = torch.zeros(bs, dtype=torch.bool)
        valid[:n] = True
        probs.append(F.pad(pr, (0, pad)))
        labs.append(F.pad(y, (0, pad)))
        losses.append(F.pad(lo, (0, pad)))
        probs[-1] = torch.stack([probs[-1], labs[-1].float(), losses[-1], valid.float()], dim=-1)
    local = torch.cat(probs) if probs else torch.zeros(0, 4)
    # every rank has ceil(per / bs) chunks of bs rows: equal sizes, so a plain gather works
    allv = accelerator.gather(local.to(accelerator.device)).cpu()
    allv = allv[allv[:, 3] > 0]
    score, label, loss = allv[:, 0].numpy(), allv[:, 1].numpy().astype(int), allv[:, 2].numpy()
    pred = score > 0.5
    model.train()
    frac = float(label.mean()) if len(label) else 0.0
    return {
        "accuracy": float((pred == label.astype(bool)).mean()) if len(label) else float("nan"),
        "auc": roc_auc(score, label),
        "loss": float(loss.mean()) if len(loss) else float("nan"),
        "confusion": confusion(pred, label),
        "majority_baseline": max(frac, 1 - frac),
        "count": int(len(label)),
        # gathered in rank order with the padding dropped: the same order as ``rows``
        "by_action": accuracy_by_kind(pred, label.astype(bool), data.kinds[rows]) if len(label) else {},
    }


@dataclasses.dataclass
class Stage1Run:
    """Everything the training loop, the checkpoints and the evaluations share; built by :func:`setup`."""

    cfg: Config
    out: Path
    accelerator: Accelerator
    model: Any
    processor: Any
    data: Stage1Data
    train_rows: np.ndarray
    val_rows: np.ndarray
    yes_id: int
    no_id: int
    opt: Any
    sched: Any
    logger: MetricsLogger
    global_bs: int
    batches_per_epoch: int
    total_steps: int
    n_trainable: int
    label_stats: tuple[dict, dict]  # (train, held-out)
    # Where the loop stands (restored from a checkpoint on resume).
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    # The step of the last evaluation / checkpoint (nothing is done twice at one step).
    eval_step: int = -1
    ckpt_step: int = -1


def _split(cfg: Config, data: Stage1Data) -> tuple[np.ndarray, np.ndarray]:
    train_rows, val_rows = split_by_trajectory(data.ds, cfg.val_fraction)
    if cfg.max_train_rows:
        train_rows = train_rows[: cfg.max_train_rows]
    if cfg.max_val_rows:
        val_rows = val_rows[: cfg.max_val_rows]
    if len(train_rows) == 0 or len(val_rows) == 0:
        raise DataError(f"{cfg.dataset}: need trajectories in both the train and held-out split")
    return train_rows, val_rows


def setup(cfg: Config, accelerator: Accelerator, plan: OutputPlan) -> Stage1Run:
    """Load the model and the labelled data, check them, then open the output folder and build the
    optimizer, the scheduler and the logger (restored from the checkpoint when resuming)."""
    out = plan.path
    main = accelerator.is_main_process
    dtype = train_dtype(cfg.model.dtype, accelerator, frozen_base=cfg.lora.enabled)
    model, processor = load_vlm(dataclasses.replace(cfg.model, dtype=dtype), lora=cfg.lora, for_training=True)
    yes_id, no_id = yes_no_token_ids(processor)
    data = Stage1Data(cfg.dataset, cfg.eps, cfg.label_scale, processor, cfg.rendering)
    train_rows, val_rows = _split(cfg, data)
    world = accelerator.num_processes
    global_bs = cfg.batch_size * world
    batches_per_epoch = len(train_rows) // global_bs  # drop the ragged tail: equal work on every rank
    if batches_per_epoch == 0:
        raise DataError(f"{cfg.dataset}: {len(train_rows)} training rows < one global batch of {global_bs}")
    tr_stats, va_stats = label_stats(data.labels[train_rows]), label_stats(data.labels[val_rows])
    # Class balance before training (the majority baseline is the accuracy to beat).
    log.info(
        "labels (eps=%g at %gx): train %d rows, %.1f%% changed; held-out %d rows, %.1f%% changed "
        "(majority baseline %.3f)",
        cfg.eps, cfg.label_scale, tr_stats["count"], 100 * tr_stats["positive_fraction"], va_stats["count"],
        100 * va_stats["positive_fraction"], va_stats["majority_accuracy"],
    )  # fmt: skip
    begin_output(plan, accelerator)
    if main:
        save_config(cfg, out)

    model.train()
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW(
        param_groups(model, cfg.optim.lr, cfg.vision_lr_scale),
        lr=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        betas=cfg.optim.betas,
    )
    total_steps = (batches_per_epoch // cfg.grad_accum) * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    sched = make_scheduler(opt, cfg.optim.scheduler, total_steps, cfg.optim.warmup_ratio)
    model, opt = accelerator.prepare(model, opt)
    step, epoch, batch_in_epoch = 0, 0, 0
    if plan.resume_from is not None:  # after prepare: under FSDP the full tensors are sharded onto the model
        ck = load_checkpoint(plan.resume_from)
        step = ck.restore_training(
            accelerator.unwrap_model(model), inner(opt), sched, accelerator.process_index
        )
        epoch, batch_in_epoch = ck.position["epoch"], ck.position["batch_in_epoch"]
        log.info(
            "resumed from %s: step %d, epoch %d, batch %d", plan.resume_from, step, epoch, batch_in_epoch
        )
    logger = MetricsLogger(
        out, cfg.wandb, to_dict(cfg), enabled=main, resume_step=step if plan.resume_from is not None else None
    )
    log.info(
        "%s: %d trainable params; effective batch %d = %d x %d processes x %d accum; %d steps",
        cfg.model.name_or_path, n_trainable, global_bs * cfg.grad_accum, cfg.batch_size, world, cfg.grad_accum,
        total_steps,
    )  # fmt: skip
    return Stage1Run(
        cfg, out, accelerator, model, processor, data, train_rows, val_rows, yes_id, no_id, opt, sched, logger,
        global_bs, batches_per_epoch, total_steps, n_trainable, (tr_stats, va_stats), step, epoch, batch_in_epoch,
    )  # fmt: skip


def checkpoint(r: Stage1Run) -> None:
    """Save ``checkpoints/step-N`` with the data position (once per step; every process takes part)."""
    if r.ckpt_step == r.step:
        return
    r.ckpt_step = r.step
    position = {"epoch": r.epoch, "batch_in_epoch": r.batch_in_epoch}
    save_checkpoint(
        r.out, r.step, r.accelerator.unwrap_model(r.model), inner(r.opt), r.sched, position,
        keep=r.cfg.keep_checkpoints, accelerator=r.accelerator,
    )  # fmt: skip


def evaluate_now(r: Stage1Run) -> dict:
    """Evaluate on the held-out rows and log it at the current step."""
    r.eval_step = r.step
    res = evaluate(r.model, r.data, r.val_rows, r.accelerator, r.yes_id, r.no_id, r.cfg.eval_batch_size)
    flat = {f"val/{k}": v for k, v in res.items() if k not in ("confusion", "by_action")}
    flat.update({f"val/accuracy_{k}": v["accuracy"] for k, v in res["by_action"].items()})
    r.logger.log(flat, r.step)
    log.info(
        "step %d eval: acc %.4f auc %.4f loss %.4f confusion %s (majority %.3f)",
        r.step, res["accuracy"], res["auc"], res["loss"], res["confusion"], res["majority_baseline"],
    )  # fmt: skip
    return res


def train_step(r: Stage1Run, order: np.ndarray) -> float:
    """One optimizer step over ``grad_accum`` micro-batches of this epoch's ``order``; returns the loss
    (the mean over all processes' rows, not rank 0's share)."""
    cfg, accelerator, rank = r.cfg, r.accelerator, r.accelerator.process_index
    r.opt.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for micro in range(cfg.grad_accum):
        b = (r.batch_in_epoch + micro) * r.global_bs
        rows = order[b + rank * cfg.batch_size : b + (rank + 1) * cfg.batch_size]
        inputs, y = r.data.batch(rows)
        inputs = {k: v.to(accelerator.device) for k, v in inputs.items()}
        last = micro == cfg.grad_accum - 1
        sync = contextlib.nullcontext() if last else accelerator.no_sync(r.model)
        with sync, accelerator.autocast():
            logits = answer_logits(r.model, inputs)
            loss = yes_no_loss(logits, y, r.yes_id, r.no_id) / cfg.grad_accum
        accelerator.backward(loss)
        loss_sum += float(accelerator.reduce(loss.detach(), reduction="mean"))
    if cfg.optim.max_grad_norm > 0:  # the prepared parameters: FSDP replaces the modules' parameters
        accelerator.clip_grad_norm_(r.model.parameters(), cfg.optim.max_grad_norm)
    r.opt.step()
    r.sched.step()
    r.step += 1
    r.batch_in_epoch += cfg.grad_accum
    return loss_sum


def train(r: Stage1Run) -> dict:
    """The loop: epochs in the (seed, epoch) order, logging, evaluation and checkpoints on their cadence
    and at every epoch's end; returns the last held-out evaluation (made at the final step)."""
    cfg = r.cfg
    bar = tqdm(
        total=r.total_steps, initial=r.step, desc="finetune-vlm",
        disable=not (r.accelerator.is_main_process and cfg.progress),
    )  # fmt: skip
    last_eval: dict = {}
    running: list[float] = []
    while r.step < r.total_steps and r.epoch < cfg.epochs:
        order = r.train_rows[epoch_order(len(r.train_rows), cfg.seed, r.epoch)]
        while r.batch_in_epoch + cfg.grad_accum <= r.batches_per_epoch and r.step < r.total_steps:
            lr = r.opt.param_groups[0][
                "lr"
            ]  # the rate of this update (the scheduler moves it after the step)
            running.append(train_step(r, order))
            bar.update(1)
            if r.step % cfg.log_every == 0 or r.step == r.total_steps:
                r.logger.log({"train/loss": float(np.mean(running)), "train/lr": lr}, r.step)
                bar.set_postfix(loss=f"{np.mean(running):.4f}")
                running = []
            if cfg.eval_every and r.step % cfg.eval_every == 0:
                last_eval = evaluate_now(r)
            if cfg.save_every and r.step % cfg.save_every == 0:
                checkpoint(r)
        if r.batch_in_epoch + cfg.grad_accum > r.batches_per_epoch:
            r.epoch, r.batch_in_epoch = r.epoch + 1, 0
            last_eval = evaluate_now(r)
            checkpoint(r)
    bar.close()
    if r.eval_step != r.step:
        last_eval = evaluate_now(r)
    checkpoint(r)
    return last_eval


def summarize(r: Stage1Run, last_eval: dict, seconds: float) -> dict:
    """``metrics.json``: the final held-out metrics next to the label balance and the run's size."""
    tr_stats, va_stats = r.label_stats
    return {
        "heldout_accuracy": last_eval["accuracy"],
        "heldout_auc": last_eval["auc"],
        "heldout_loss": last_eval["loss"],
        "heldout_confusion": last_eval["confusion"],
        "heldout_count": last_eval["count"],
        "heldout_by_action": last_eval["by_action"],
        "majority_baseline": va_stats["majority_accuracy"],
        "train_labels": tr_stats,
        "heldout_labels": va_stats,
        "steps": r.step,
        "processes": r.accelerator.num_processes,
        "trainable_parameters": r.n_trainable,
        "seconds": seconds,
        "model": r.cfg.model.name_or_path,
        "rendering": r.cfg.rendering,
    }


def export(r: Stage1Run, summary: dict) -> None:
    """Write ``model/`` (staged), ``metrics.json`` and, last, the completion marker."""
    cfg, accelerator = r.cfg, r.accelerator
    accelerator.wait_for_everyone()
    final = accelerator.unwrap_model(r.model)
    # Under FSDP every process takes part in gathering the shards; the main process alone writes.
    state = export_state(final, merge_lora=cfg.merge_lora)
    if accelerator.is_main_process:
        # this run's own model/ (a resumed run rewrites it); the run folder was guarded
        with staged_dir(r.out / "model", overwrite=True) as tmp:
            save_vlm(
                final, r.processor, tmp, merge_lora=cfg.merge_lora, base=cfg.model.name_or_path,
                tiny_seed=cfg.model.tiny_seed, state_dict=state,
            )  # fmt: skip
        atomic_write_json(r.out / "metrics.json", summary)
        finish_output(r.out, {"steps": r.step})
        log.info(
            "done in %.0fs: held-out accuracy %.4f (majority %.4f), AUC %.4f -> %s",
            summary["seconds"], summary["heldout_accuracy"], summary["majority_baseline"],
            summary["heldout_auc"], r.out / "model",
        )  # fmt: skip


def run(cfg: Config) -> dict:
    """Fine-tune the VLM on the screen-change labels; returns the final metrics (also in metrics.json)."""
    t0 = time.time()
    accelerator = make_accelerator(mixed_precision=cfg.mixed_precision, find_unused_parameters=True)
    plan = check_output(cfg.output_dir, cfg.resume, cfg.overwrite, "finetune-vlm", cfg)
    set_seed(cfg.seed)
    r = setup(cfg, accelerator, plan)
    last_eval = train(r)
    summary = summarize(r, last_eval, time.time() - t0)
    export(r, summary)
    r.logger.finish()
    accelerator.wait_for_everyone()
    return summary
