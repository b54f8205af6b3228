"""The generative-policy training of ``digiq train-bc`` and ``digiq extract-policy``.

Both fine-tune a VLM policy with cross-entropy on target action tokens: train-bc on the dataset actions
(pi_beta), extract-policy on the Best-of-N selected candidates, starting from pi_beta (optionally weighted
per row, and logging the token KL to pi_beta). :func:`fit_policy` is that loop: checkpointed every
``save_every`` steps in the layout of :mod:`digiq.training.checkpoint` and resumable bit for bit;
:func:`train_policy` is the whole run around it (metrics log, export, completion marker).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from accelerate import Accelerator
from datasets import Image as HFImage
from tqdm.auto import tqdm

from digiq.config import OptimConfig, check, to_dict
from digiq.data.schema import decode_batch, decode_image
from digiq.errors import DataError
from digiq.models.policy import (
    PolicySpec,
    collate_encoded,
    encode_row,
    format_action,
    label_logits,
    masked_token_kl,
    save_policy,
    target_ids,
    weighted_nll,
)
from digiq.models.vlm import export_state
from digiq.training.accelerator import make_accelerator
from digiq.training.checkpoint import inner, load_checkpoint, save_checkpoint
from digiq.training.data_order import epoch_order
from digiq.training.output import check_output, finish_output
from digiq.training.schedule import make_scheduler
from digiq.utils.io import OutputPlan, atomic_write_json
from digiq.utils.logging import MetricsLogger, get_logger
from digiq.utils.seed import set_seed

log = get_logger(__name__)
# The exported policy inside a train-bc / extract-policy output_dir.
POLICY_DIR = "policy"


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
    # Write <output_dir>/checkpoints/step-N every this many steps (and at the end); resumable with --resume.
    save_every: int = 200
    # Keep the newest this many checkpoints (older ones are deleted).
    keep_checkpoints: int = 2
    # Mixed precision. 'auto': the launcher's, else bf16 on a bf16 GPU, 'no' on the CPU
    # (digiq.training.accelerator.resolve_mixed_precision).
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"
    # How rows become model inputs. 'once': every row encoded before training, rows with the same screenshot
    # sharing its pixels (fastest on one CPU: the simulator's screens repeat). 'lazy': each process encodes
    # only the rows of its batches, in DataLoader workers, while the model trains (a real dataset's pixels
    # for every row would not fit in each GPU process's memory). 'auto': 'once' for one CPU process.
    encode: Literal["auto", "once", "lazy"] = "auto"
    # DataLoader worker processes of the lazy encoding (0 = in the training process).
    num_workers: int = 2

    def validate(self, where: str = "train") -> None:
        check(self.batch_size > 0, f"{where}.batch_size must be > 0")
        check(self.num_workers >= 0, f"{where}.num_workers must be >= 0")
        check(self.epochs > 0 or self.max_steps > 0, f"{where}: epochs or max_steps must be > 0")
        check(self.log_every > 0 and self.save_every > 0, f"{where}.log_every / save_every must be > 0")
        check(self.keep_checkpoints >= 1, f"{where}.keep_checkpoints must be >= 1")


@dataclasses.dataclass
class PolicyExamples:
    """Rows to imitate: the dataset (images decoded lazily), row indices, target action strings, weights."""

    dataset: Any  # a schema.undecoded_view: images are decoded by us, so a broken one names its row
    rows: np.ndarray  # int64 (M,)
    targets: list[str]  # AutoUI strings, one per row
    weights: np.ndarray | None = None  # float32 (M,) or None (= 1)
    source: str = "dataset"  # the dataset path, named in image errors

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, idx: Sequence[int]) -> tuple[list, list[str], list[str], np.ndarray | None]:
        rows = [int(self.rows[i]) for i in idx]
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


def encode_example(
    processor: Any, examples: PolicyExamples, spec: PolicySpec, i: int
) -> dict[str, torch.Tensor]:
    """Example ``i`` as model-ready tensors (the lazy twin of :func:`encode_examples`, equal values)."""
    shots, observations, targets, _ = examples.batch([i])
    text = format_action(targets[0], spec.action_format, spec.precision)
    return encode_row(processor, shots[0].convert("RGB"), observations[0], text, spec)


class _Rows(torch.utils.data.Dataset):
    """Examples as ``(index, model inputs)``: from a list encoded up front, or encoded on demand."""

    def __init__(self, processor: Any, examples: PolicyExamples, spec: PolicySpec, encoded: list | None):
        self.processor, self.examples, self.spec, self.encoded = processor, examples, spec, encoded

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple[int, dict[str, torch.Tensor]]:
        if self.encoded is not None:
            return i, self.encoded[i]
        return i, encode_example(self.processor, self.examples, self.spec, i)


def _collate(items: list[tuple[int, dict[str, torch.Tensor]]], pad_id: int) -> tuple[list[int], dict]:
    return [i for i, _ in items], collate_encoded([e for _, e in items], pad_id)


class _StepBatches(torch.utils.data.Sampler):
    """This process's example indices for optimiser steps ``start .. total - 1``: each epoch's order is a
    pure function of (seed, epoch), each step takes the next ``batch`` of it, and the process its slice."""

    def __init__(self, n: int, batch: int, seed: int, start: int, total: int, rank: int, world: int) -> None:
        self.n, self.batch, self.seed, self.start, self.total = n, batch, seed, start, total
        self.local = batch // world
        self.rank = rank
        self.steps_per_epoch = max(1, n // batch)

    def __len__(self) -> int:
        return self.total - self.start

    def __iter__(self):
        for step in range(self.start, self.total):
            epoch, pos = divmod(step, self.steps_per_epoch)
            idx = epoch_order(self.n, self.seed, epoch)[pos * self.batch : (pos + 1) * self.batch]
            yield idx[self.rank * self.local : (self.rank + 1) * self.local].tolist()


def warn_long_targets(processor: Any, spec: PolicySpec, targets: Sequence[str]) -> None:
    """Warn when a target action is longer than generation may emit (it would be cut at act time)."""
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


def share_from_main(module: torch.nn.Module, accelerator: Accelerator) -> None:
    """Move ``module`` to the accelerator's device with the main process's weights on every process.

    For a model no ``accelerator.prepare`` sees: the frozen pi_beta copy of the KL term. Under FSDP's
    RAM-efficient loading (``fsdp_cpu_ram_efficient_loading``, configs/accelerate/fsdp_7b.yaml) only local
    rank 0 is sure to get the checkpoint's values (accelerate's FSDP2 preparation itself treats the other
    processes' weights as placeholders and replaces them with rank 0's); ``prepare`` broadcasts them into the
    model it shards, a model it never sees keeps the placeholders (empty, zero or meta tensors). So every
    parameter and buffer is broadcast from the main process, one tensor at a time (no second full copy).
    """

    def tensors() -> list[torch.Tensor]:  # read again after to_empty, which replaces them
        return [*module.parameters(), *module.buffers()]

    if any(t.is_meta for t in tensors()):
        module.to_empty(device=accelerator.device)  # storage to receive the main process's values
    module.to(accelerator.device)
    if accelerator.num_processes > 1:
        for t in tensors():
            dist.broadcast(t.data, src=0)


def train_steps(
    accelerator: Accelerator,
    model: Any,
    opt: torch.optim.Optimizer,
    sched: Any,
    loader: Any,
    out: Path,
    total: int,
    start: int,
    log_every: int,
    save_every: int,
    keep_checkpoints: int,
    max_grad_norm: float,
    logger: MetricsLogger,
    desc: str,
    weights: np.ndarray | None = None,
    ref_model: Any = None,
) -> tuple[list[float], float]:
    """Optimiser steps ``start .. total - 1`` of cross-entropy on target tokens, shared by every generative
    VLM trainer (train-bc, extract-policy, pretrain-vlm): ``loader`` yields ``(row indices, batch)`` per
    step (``weights[indices]`` weight the rows when given), the loss is logged every ``log_every`` steps
    (with the token KL to ``ref_model`` when given) and a checkpoint written every ``save_every`` steps and
    at the end. Returns this run's per-step losses and the last logged KL (nan without ``ref_model``)."""
    device = accelerator.device
    bar = tqdm(total=total, initial=start, disable=not accelerator.is_main_process, desc=desc)
    losses: list[float] = []
    last_kl = float("nan")
    for step, (idx, batch) in enumerate(loader, start=start):
        batch = {k: v.to(device) for k, v in batch.items()}
        lr = opt.param_groups[0]["lr"]  # the rate of this update (the scheduler moves it after the step)
        with accelerator.autocast():
            logits, labels = label_logits(model, batch)  # the LM head on the target span only
            w = None if weights is None else torch.as_tensor(weights[idx], device=device)
            loss = weighted_nll(logits, labels, w)
        accelerator.backward(loss)
        if max_grad_norm > 0:  # the prepared parameters: FSDP replaces the modules' parameters
            accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        bar.update(1)
        done = step + 1
        if done % log_every == 0 or done == total:
            row = {"train/loss": float(np.mean(losses[-log_every:])), "train/lr": lr}
            if ref_model is not None:
                with torch.no_grad():
                    ref_logits, _ = label_logits(ref_model, batch)
                    last_kl = float(masked_token_kl(logits.detach(), ref_logits, labels))
                    row["train/kl_to_beta"] = last_kl
            logger.log(row, done)
            bar.set_postfix(loss=f"{row['train/loss']:.3f}")
        if done % save_every == 0 or done == total:
            save_checkpoint(
                out, done, accelerator.unwrap_model(model), inner(opt), sched, extra={"total": total},
                keep=keep_checkpoints, accelerator=accelerator,
            )  # fmt: skip
    bar.close()
    return losses, last_kl


def start_policy_run(cfg: Any, stage: str) -> tuple[Path, Accelerator, OutputPlan]:
    """What a policy trainer (train-bc, extract-policy) does before it reads any input: the accelerator at
    ``cfg.train.mixed_precision``, the output guard of ``cfg.output_dir`` (a refused run fails fast) and the
    seeds. Returns (output folder, accelerator, output plan)."""
    out = Path(cfg.output_dir)
    accelerator = make_accelerator(mixed_precision=cfg.train.mixed_precision, name="train.mixed_precision")
    plan = check_output(out, cfg.resume, cfg.overwrite, stage, cfg)
    set_seed(cfg.seed)
    return out, accelerator, plan


def fit_policy(
    accelerator: Accelerator,
    model: Any,
    processor: Any,
    spec: PolicySpec,
    examples: PolicyExamples,
    out: Path,
    train: TrainLoopConfig,
    optim: OptimConfig,
    seed: int,
    resume_from: Path | None,
    logger: MetricsLogger,
    ref_model: Any = None,
    desc: str = "train-bc",
) -> tuple[Any, dict[str, float]]:
    """Cross-entropy on the target action tokens (weighted per row), checkpointed and resumable.

    With ``ref_model`` (pi_beta) the token-level KL(pi || pi_beta) on the batch is logged every
    ``log_every`` steps. Returns the trained model (unwrapped) and the final metrics (``loss_first``,
    ``loss_last``, ``steps``, ...).
    """
    is_main, world, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    n = len(examples)
    total = train.max_steps or max(1, int(math.ceil(train.epochs * max(1, n // train.batch_size))))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay)
    sched = make_scheduler(opt, optim.scheduler, total, optim.warmup_ratio)
    model.train()
    model, opt = accelerator.prepare(model, opt)
    start = 0
    if resume_from is not None:  # after prepare: under FSDP the full tensors are sharded onto the model
        ck = load_checkpoint(resume_from)
        start = ck.restore_training(accelerator.unwrap_model(model), inner(opt), sched, rank)
        log.info("resumed from %s at step %d / %d", resume_from, start, total)
    device = accelerator.device
    if ref_model is not None:
        share_from_main(ref_model, accelerator)
        ref_model.eval().requires_grad_(False)
    if train.batch_size % world:
        raise DataError(f"train.batch_size {train.batch_size} is not divisible by {world} processes")

    encode = train.encode
    if encode == "auto":
        encode = "once" if world == 1 and device.type == "cpu" else "lazy"
    encoded = encode_examples(processor, examples, spec, progress=is_main) if encode == "once" else None
    pad_id = processor.tokenizer.pad_token_id
    loader = torch.utils.data.DataLoader(
        _Rows(processor, examples, spec, encoded),
        batch_sampler=_StepBatches(n, train.batch_size, seed, start, total, rank, world),
        collate_fn=functools.partial(_collate, pad_id=pad_id),
        num_workers=train.num_workers if encode == "lazy" else 0,
        # Its own generator: a DataLoader draws a seed for its workers when it starts, which must not come
        # from the global RNG a resumed run restores (the RNG would be one draw ahead of an uninterrupted run).
        generator=torch.Generator().manual_seed(seed),
    )
    t0 = time.perf_counter()
    losses, last_kl = train_steps(
        accelerator, model, opt, sched, loader, out, total, start, train.log_every, train.save_every,
        train.keep_checkpoints, optim.max_grad_norm, logger, desc, examples.weights, ref_model,
    )  # fmt: skip
    metrics = {
        "steps": float(total),
        "steps_this_run": float(total - start),
        "loss_first": float(losses[0]) if losses else float("nan"),
        "loss_last": float(np.mean(losses[-max(1, min(10, len(losses))) :])) if losses else float("nan"),
        "train_seconds": time.perf_counter() - t0,
        "rows": float(n),
        "kl_to_beta": last_kl,
    }
    return accelerator.unwrap_model(model), metrics


def train_policy(
    accelerator: Accelerator,
    cfg: Any,
    model: Any,
    processor: Any,
    spec: PolicySpec,
    examples: PolicyExamples,
    resume_from: Path | None,
    export_info: dict[str, Any],
    ref_model: Any = None,
    first_logs: dict[str, float] | None = None,
    extra_metrics: dict[str, Any] | None = None,
    desc: str = "train-bc",
) -> dict[str, Any]:
    """One whole policy run of train-bc or extract-policy, after the stage prepared its examples.

    ``cfg`` is the stage's config (``output_dir``, ``train``, ``optim``, ``seed``, ``wandb``). Trains with
    :func:`fit_policy`, then on the main process exports ``<output_dir>/policy`` (with ``export_info`` in
    ``digiq_policy.json``), writes ``metrics.json`` (``extra_metrics`` and the loop's metrics) and marks
    the folder finished. ``first_logs`` are logged at step 0 of a fresh run.
    """
    out = Path(cfg.output_dir)
    is_main = accelerator.is_main_process
    resume_step = load_checkpoint(resume_from).step if resume_from is not None else None
    logger = MetricsLogger(out, cfg.wandb, to_dict(cfg), enabled=is_main, resume_step=resume_step)
    if first_logs and resume_from is None:
        logger.log(first_logs, 0)
    model, fit = fit_policy(
        accelerator, model, processor, spec, examples, out, cfg.train, cfg.optim, cfg.seed, resume_from,
        logger, ref_model, desc,
    )  # fmt: skip
    metrics: dict[str, Any] = {**(extra_metrics or {}), **fit}
    # Under FSDP every process takes part in gathering the shards; the main process alone writes.
    state = export_state(model, merge_lora=True)
    if is_main:
        # this run's own policy/ (a resumed run rewrites it); the run folder was guarded
        save_policy(model, processor, out / POLICY_DIR, spec, export_info, state_dict=state, overwrite=True)
        logger.log({f"final/{k}": v for k, v in fit.items()}, int(fit["steps"]))
        atomic_write_json(out / "metrics.json", metrics)
        finish_output(out, {"steps": int(fit["steps"])})
        log.info(
            "%s: %d steps, loss %.3f -> %.3f, policy at %s",
            desc, fit["steps"], fit["loss_first"], fit["loss_last"], out / POLICY_DIR,
        )  # fmt: skip
    logger.finish()
    accelerator.wait_for_everyone()
    return metrics
