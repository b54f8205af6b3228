"""Behaviour cloning of a generative VLM policy (pi_beta) on the dataset's (screenshot, observation) -> action.

    digiq train-bc --config configs/train-bc/tiny.yaml dataset=data/sim output_dir=runs/bc
    digiq train-bc ... --resume                        # continue from <output_dir>/checkpoint
    accelerate launch --multi_gpu --num_processes 2 -m digiq train-bc ...

pi_beta imitates the behaviour data, so it trains on successful **and** unsuccessful trajectories
(``trajectories: all``); ``successful`` gives the Filtered-BC baseline of the paper. The model is any
``AutoModelForImageTextToText`` (LoRA or full fine-tuning); the target is the dataset action written in the
policy's action format (:mod:`digiq.models.policy`). Outputs in ``output_dir``: ``config.yaml``,
``metrics.jsonl``, ``metrics.json``, ``checkpoint/`` (resumable) and ``policy/``, an export loadable with
:func:`digiq.models.policy.load_policy` / plain ``transformers``.

:func:`fit_policy` is the training loop shared with ``digiq extract-policy`` (Best-of-N is BC on the
selected actions, starting from pi_beta).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from digiq.actions import parse_action
from digiq.config import LoraConfig, ModelConfig, OptimConfig, WandbConfig, check, save_config, to_dict
from digiq.data.schema import decode_batch, decode_image, load_dataset, trajectory_bounds, undecoded_view
from digiq.errors import DataError
from digiq.models.policy import (
    ACTION_FORMATS,
    PolicySpec,
    collate_encoded,
    encode_row,
    format_action,
    masked_token_kl,
    policy_logits,
    save_policy,
    weighted_nll,
)
from digiq.utils.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from digiq.utils.io import atomic_write_json, is_complete
from digiq.utils.logging import MetricsLogger, get_logger
from digiq.utils.seed import set_seed

log = get_logger(__name__)
CHECKPOINT_DIR = "checkpoint"
# The default policy of the simulated pipeline (configs/train-bc/tiny.yaml uses the same).
TINY_POLICY = "tiny:idefics3@image_size=128,patch=16"
POLICY_DIR = "policy"


@dataclasses.dataclass
class PolicyFormatConfig:
    # Text the policy emits: compact ('tap 0.79 0.68', 5-10 tokens), decision (AutoUI without the plan) or
    # autoui (the full official string, ~56 tokens with the tiny BPE). Outputs are always AutoUI strings.
    action_format: Literal["autoui", "decision", "compact"] = "compact"
    # Decimals of tap / swipe coordinates (2 is enough for the simulator's widgets).
    precision: int = 2
    # Generation cap; must cover the longest target (a warning says when a target is cut).
    max_new_tokens: int = 24
    # Sampling of the exported policy at act/evaluate time: false = greedy. The official evaluation samples
    # at temperature 0.8 (digiq_official.md section 3, "Policy model").
    do_sample: bool = False
    temperature: float = 1.0

    def validate(self, where: str = "policy") -> None:
        check(self.action_format in ACTION_FORMATS, f"{where}.action_format must be one of {ACTION_FORMATS}")
        check(0 <= self.precision <= 6, f"{where}.precision must be in [0, 6]")
        check(self.max_new_tokens > 0, f"{where}.max_new_tokens must be > 0")
        check(self.temperature > 0, f"{where}.temperature must be > 0")

    def spec(self, family: str) -> PolicySpec:
        return PolicySpec(
            family=family,
            action_format=self.action_format,
            precision=self.precision,
            do_sample=self.do_sample,
            temperature=self.temperature,
            max_new_tokens=self.max_new_tokens,
        )


@dataclasses.dataclass
class PolicyOptimConfig(OptimConfig):
    """AdamW for the policy; a subclass so partial overrides keep these defaults."""

    # Full fine-tuning of a tiny random VLM learns fast at 1e-3; use ~1e-4 (LoRA) / 1e-5 (full) on real models.
    lr: float = 1e-3
    warmup_ratio: float = 0.05
    scheduler: Literal["cosine", "constant", "linear"] = "cosine"
    max_grad_norm: float = 1.0


@dataclasses.dataclass
class TrainLoopConfig:
    # Global batch size (split across processes).
    batch_size: int = 16
    # Passes over the training rows (fractional allowed); `max_steps` > 0 overrides it.
    epochs: float = 2.0
    max_steps: int = 0
    # Log the training loss every this many optimiser steps.
    log_every: int = 10
    # Write <output_dir>/checkpoint every this many steps (and at the end); resumable with --resume.
    save_every: int = 200
    # Mixed precision ('bf16' on recent GPUs).
    mixed_precision: Literal["no", "bf16"] = "no"

    def validate(self, where: str = "train") -> None:
        check(self.batch_size > 0, f"{where}.batch_size must be > 0")
        check(self.epochs > 0 or self.max_steps > 0, f"{where}: epochs or max_steps must be > 0")
        check(self.log_every > 0 and self.save_every > 0, f"{where}.log_every / save_every must be > 0")


@dataclasses.dataclass
class Config:
    # Dataset folder (digiq schema); screenshot, observation and action are read.
    dataset: str = "data/sim"
    output_dir: str = "runs/bc"
    # The policy VLM: a hub id / local folder, or 'tiny:<family>[@key=value,...]'. Idefics3 is the cheapest
    # tiny family on a CPU; at 128 px with 16 px patches its 2x2 pixel shuffle leaves 16 image tokens (49 at
    # the 112 px / 8 px default, 196 for LLaVA), ~2x cheaper per BC step and enough for the sim's widgets.
    model: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(name_or_path=TINY_POLICY))
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    policy: PolicyFormatConfig = dataclasses.field(default_factory=PolicyFormatConfig)
    # all = pi_beta (imitate the behaviour data, the Digi-Q recipe); successful = Filtered BC baseline.
    trajectories: Literal["all", "successful"] = "all"
    # Use at most this many dataset rows (0 = all), in dataset order; for smoke runs.
    max_rows: int = 0
    train: TrainLoopConfig = dataclasses.field(default_factory=TrainLoopConfig)
    optim: PolicyOptimConfig = dataclasses.field(default_factory=PolicyOptimConfig)
    seed: int = 0
    # Continue from <output_dir>/checkpoint (set by --resume).
    resume: bool = False
    # Replace a finished run in output_dir.
    overwrite: bool = True
    wandb: WandbConfig = dataclasses.field(default_factory=WandbConfig)

    def validate(self) -> None:
        check(bool(self.dataset), "dataset must be set")
        check(self.max_rows >= 0, "max_rows must be >= 0")
        self.policy.validate()
        self.train.validate()
        self.optim.validate()
        self.lora.validate()


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PolicyExamples:
    """Rows to imitate: the dataset (images decoded lazily), row indices, target action strings, weights."""

    dataset: Any
    rows: np.ndarray  # int64 (M,)
    targets: list[str]  # AutoUI strings, one per row
    weights: np.ndarray | None = None  # float32 (M,) or None (= 1)
    source: str = "dataset"  # the dataset path, named in image errors

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, idx: Sequence[int]) -> tuple[list, list[str], list[str], np.ndarray | None]:
        rows = [int(self.rows[i]) for i in idx]
        # dataset is a schema.undecoded_view: decode here so a broken screenshot names its row
        got = decode_batch(self.dataset[rows], self.source)
        w = None if self.weights is None else self.weights[list(idx)]
        return got["screenshot"], got["observation"], [self.targets[i] for i in idx], w


def encode_examples(
    processor: Any, examples: PolicyExamples, spec: PolicySpec, progress: bool = True
) -> list[dict[str, torch.Tensor]]:
    """Every example as model-ready tensors, computed once before training (see :func:`encode_row`).

    Screenshots are decoded once per distinct PNG (the simulated device has a finite set of screens; real
    data simply has one per row) and rows with the same screenshot share one set of image tensors, so the
    memory is one pixel tensor per distinct screen plus the token ids.
    """
    from datasets import Image as HFImage
    from tqdm.auto import tqdm

    ds = examples.dataset
    rows = [int(r) for r in examples.rows]
    raw = ds.cast_column("screenshot", HFImage(decode=False)).select_columns(["screenshot"])[rows][
        "screenshot"
    ]
    ids = ds.select_columns(["traj_id", "step_id"])[rows]
    observations = ds.select_columns(["observation"])[rows]["observation"]
    images: dict[bytes, Any] = {}
    shared: dict[bytes, dict[str, torch.Tensor]] = {}
    out: list[dict[str, torch.Tensor]] = []
    for i in tqdm(range(len(rows)), disable=not progress, desc="encode rows", unit="row"):
        key = raw[i]["bytes"] or (Path(raw[i]["path"]).read_bytes() if raw[i].get("path") else b"")
        if key not in images:
            # decode_image: a missing/corrupt screenshot is a DataError naming trajectory, step and column
            img = decode_image(raw[i], examples.source, ids["traj_id"][i], ids["step_id"][i], "screenshot")
            images[key] = img.convert("RGB")
        text = format_action(examples.targets[i], spec.action_format, spec.precision)
        enc = encode_row(processor, images[key], observations[i], text, spec)
        T = int(enc["input_ids"].shape[1])
        image_keys = [k for k, v in enc.items() if not (v.dim() == 2 and tuple(v.shape) == (1, T))]
        if key in shared:
            enc.update(shared[key])
        else:
            shared[key] = {k: enc[k] for k in image_keys}
        out.append(enc)
    return out


def successful_rows(ds: Any) -> np.ndarray:
    """Rows of trajectories that end with a positive reward."""
    reward = np.asarray(ds["reward"], dtype=np.float64)
    keep = np.zeros(len(reward), dtype=bool)
    for s, e in trajectory_bounds(ds):
        if reward[e - 1] > 0:
            keep[s:e] = True
    return np.flatnonzero(keep)


def bc_examples(cfg: Config) -> PolicyExamples:
    ds = load_dataset(cfg.dataset)
    cols = ds.select_columns(["traj_id", "reward", "action"])
    rows = successful_rows(cols) if cfg.trajectories == "successful" else np.arange(len(ds))
    if cfg.max_rows:
        rows = rows[: cfg.max_rows]
    if len(rows) == 0:
        raise DataError(f"{cfg.dataset}: no rows to imitate (trajectories={cfg.trajectories})")
    actions = cols["action"]
    bad = [int(r) for r in rows if not parse_action(actions[int(r)]).is_valid]
    if bad:
        log.warning("%s: %d dataset actions do not parse; imitating their raw text", cfg.dataset, len(bad))
    images = undecoded_view(ds, ["screenshot", "observation"])
    return PolicyExamples(
        images, rows.astype(np.int64), [actions[int(r)] for r in rows], source=str(cfg.dataset)
    )


# --------------------------------------------------------------------------------------------------
# The shared training loop
# --------------------------------------------------------------------------------------------------


def lr_factor(step: int, total: int, optim: OptimConfig) -> float:
    """Linear warm-up then constant / linear / cosine decay to 0, as a multiplier of ``optim.lr``."""
    warm = int(round(optim.warmup_ratio * total))
    if warm > 0 and step < warm:
        return (step + 1) / warm
    if optim.scheduler == "constant" or total <= warm:
        return 1.0
    frac = min(1.0, (step - warm) / max(1, total - warm))
    if optim.scheduler == "linear":
        return 1.0 - frac
    return 0.5 * (1.0 + math.cos(math.pi * frac))


def epoch_order(n: int, epoch: int, seed: int) -> np.ndarray:
    """The deterministic shuffle of epoch ``epoch`` (a resumed run recomputes it, no sampler state needed)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def fit_policy(
    model: Any,
    processor: Any,
    spec: PolicySpec,
    examples: PolicyExamples,
    out: Path,
    train: TrainLoopConfig,
    optim: OptimConfig,
    seed: int,
    resume: bool,
    logger: MetricsLogger,
    ref_model: Any = None,
    desc: str = "train-bc",
) -> dict[str, float]:
    """Cross-entropy on the target action tokens (weighted per row), checkpointed and resumable.

    With ``ref_model`` (pi_beta) the token-level KL(pi || pi_beta) on the batch is logged every
    ``log_every`` steps. Returns the final metrics (``loss_first``, ``loss_last``, ``steps``, ...).
    """
    from tqdm.auto import tqdm

    from digiq.utils.dist import make_accelerator

    accelerator = make_accelerator(mixed_precision=train.mixed_precision)
    is_main, world, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    n = len(examples)
    steps_per_epoch = max(1, n // train.batch_size)
    total = train.max_steps or max(1, int(math.ceil(train.epochs * steps_per_epoch)))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay)
    start = 0
    ck = out / CHECKPOINT_DIR
    if resume and has_checkpoint(ck):
        state = load_checkpoint(ck, model, opt)
        start = state["step"]
        log.info("resumed from %s at step %d / %d", ck, start, total)
    elif resume:
        log.warning("resume requested but %s has no finished checkpoint: starting from scratch", ck)
    model.train()
    model, opt = accelerator.prepare(model, opt)
    device = accelerator.device
    if ref_model is not None:
        ref_model.to(device).eval().requires_grad_(False)
    if train.batch_size % world:
        raise DataError(f"train.batch_size {train.batch_size} is not divisible by {world} processes")
    local_bs = train.batch_size // world

    encoded = encode_examples(processor, examples, spec, progress=is_main)
    pad_id = processor.tokenizer.pad_token_id
    bar = tqdm(total=total, initial=start, disable=not is_main, desc=desc)
    losses: list[float] = []
    first_loss = None
    last_kl = float("nan")
    t0 = time.perf_counter()
    for step in range(start, total):
        epoch, pos = divmod(step, steps_per_epoch)
        order = epoch_order(n, epoch, seed)
        idx = order[pos * train.batch_size : (pos + 1) * train.batch_size]
        idx = idx[rank * local_bs : (rank + 1) * local_bs]
        batch = collate_encoded([encoded[int(i)] for i in idx], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        weights = None if examples.weights is None else examples.weights[idx]
        for g in opt.param_groups:
            g["lr"] = optim.lr * lr_factor(step, total, optim)
        with accelerator.autocast():
            logits = policy_logits(model, batch)
            w = None if weights is None else torch.as_tensor(weights, device=device)
            loss = weighted_nll(logits, batch["labels"], w)
        accelerator.backward(loss)
        if optim.max_grad_norm > 0:
            accelerator.clip_grad_norm_(params, optim.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = float(loss.detach())
        first_loss = value if first_loss is None else first_loss
        losses.append(value)
        bar.update(1)
        done = step + 1
        if done % train.log_every == 0 or done == total:
            row = {
                "train/loss": float(np.mean(losses[-train.log_every :])),
                "train/lr": opt.param_groups[0]["lr"],
            }
            if ref_model is not None:
                with torch.no_grad():
                    ref_logits = policy_logits(ref_model, batch)
                    last_kl = float(masked_token_kl(logits.detach(), ref_logits, batch["labels"]))
                    row["train/kl_to_beta"] = last_kl
            logger.log(row, done)
            bar.set_postfix(loss=f"{row['train/loss']:.3f}")
        if done % train.save_every == 0 or done == total:
            accelerator.wait_for_everyone()
            if is_main:
                save_checkpoint(ck, accelerator.unwrap_model(model), opt, done, {"total": total})
    bar.close()
    return {
        "steps": float(total),
        "steps_this_run": float(total - start),
        "loss_first": float(first_loss) if first_loss is not None else float("nan"),
        "loss_last": float(np.mean(losses[-max(1, min(10, len(losses))) :])) if losses else float("nan"),
        "train_seconds": time.perf_counter() - t0,
        "rows": float(n),
        "kl_to_beta": last_kl,
    }


def prepare_output(out: Path, resume: bool, overwrite: bool, what: str) -> None:
    if (out / POLICY_DIR).exists() and is_complete(out / POLICY_DIR) and not resume and not overwrite:
        raise FileExistsError(f"{out} already holds a finished {what} run; pass overwrite=true or --resume")
    out.mkdir(parents=True, exist_ok=True)


def warn_long_targets(processor: Any, spec: PolicySpec, targets: Sequence[str]) -> None:
    from digiq.models.policy import target_ids

    lengths = [
        len(target_ids(processor, format_action(t, spec.action_format, spec.precision), spec))
        for t in targets
    ]
    longest = max(lengths) if lengths else 0
    if longest > spec.max_new_tokens:
        log.warning(
            "the longest target is %d tokens but policy.max_new_tokens=%d: generation will cut such actions",
            longest,
            spec.max_new_tokens,
        )


def run(cfg: Config) -> dict[str, float]:
    from digiq.models.vlm import load_vlm

    t0 = time.perf_counter()
    out = Path(cfg.output_dir)
    prepare_output(out, cfg.resume, cfg.overwrite, "train-bc")
    set_seed(cfg.seed)
    examples = bc_examples(cfg)
    model, processor = load_vlm(cfg.model, cfg.lora, for_training=True)
    spec = cfg.policy.spec(processor.digiq_family)
    warn_long_targets(processor, spec, examples.targets[:2000])
    save_config(cfg, out)
    logger = MetricsLogger(out, cfg.wandb, to_dict(cfg), enabled=True, resume=cfg.resume)
    metrics = fit_policy(
        model, processor, spec, examples, out, cfg.train, cfg.optim, cfg.seed, cfg.resume, logger
    )
    save_policy(model, processor, out / POLICY_DIR, spec, {"stage": "train-bc", "dataset": cfg.dataset})
    metrics["seconds"] = time.perf_counter() - t0
    logger.log({f"final/{k}": v for k, v in metrics.items()}, int(metrics["steps"]))
    logger.finish()
    atomic_write_json(out / "metrics.json", metrics)
    log.info(
        "train-bc: %d steps, loss %.3f -> %.3f, policy at %s (%.0fs)",
        metrics["steps"],
        metrics["loss_first"],
        metrics["loss_last"],
        out / POLICY_DIR,
        metrics["seconds"],
    )
    return metrics
