"""Behaviour cloning of a generative VLM policy (pi_beta) on the dataset's (screenshot, observation) -> action.

    digiq train-bc --config configs/train-bc/tiny.yaml dataset=data/sim output_dir=runs/bc
    digiq train-bc ... --resume                        # continue from <output_dir>/checkpoints/step-N
    accelerate launch --multi_gpu --num_processes 2 -m digiq train-bc ...

pi_beta imitates the behaviour data, so it trains on successful **and** unsuccessful trajectories
(``trajectories: all``); ``successful`` gives the Filtered-BC baseline of the paper. The model is any
``AutoModelForImageTextToText`` (LoRA or full fine-tuning); the target is the dataset action written in the
policy's action format (:mod:`digiq.models.policy`). Outputs in ``output_dir``: ``config.yaml``,
``metrics.jsonl``, ``metrics.json``, ``checkpoints/`` (resumable) and ``policy/``, an export loadable with
:func:`digiq.models.policy.load_policy` / plain ``transformers``. The training is
:func:`digiq.training.policy_loop.train_policy`, shared with ``digiq extract-policy``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from digiq.actions import parse_action
from digiq.config import LoraConfig, ModelConfig, WandbConfig, check, save_config
from digiq.data.schema import load_dataset, undecoded_view
from digiq.data.transitions import successful_rows
from digiq.errors import DataError
from digiq.models.policy import ACTION_FORMATS, PolicySpec
from digiq.models.vlm import load_vlm
from digiq.training.accelerator import train_dtype
from digiq.training.output import begin_output
from digiq.training.policy_loop import (
    PolicyExamples,
    PolicyOptimConfig,
    TrainLoopConfig,
    start_policy_run,
    train_policy,
    warn_long_targets,
)
from digiq.utils.logging import get_logger

log = get_logger(__name__)
# Splits its work over the processes of a launcher (digiq.cli).
DISTRIBUTED = True
# The default policy of the simulated pipeline (configs/train-bc/tiny.yaml uses the same).
TINY_POLICY = "tiny:idefics3@image_size=128,patch=16"


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
    # at temperature 0.8 (DigiRL-agent/digiq @ 8181379, ``scripts/config/main/train_and_eval.yaml:15``).
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
    # Replace a finished (or interrupted) run in output_dir instead of refusing it.
    overwrite: bool = False
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


def run(cfg: Config) -> dict[str, float]:
    out, accelerator, plan = start_policy_run(cfg, "train-bc")
    is_main, resume_from = accelerator.is_main_process, plan.resume_from
    examples = bc_examples(cfg)
    dtype = train_dtype(cfg.model.dtype, accelerator, frozen_base=cfg.lora.enabled)
    model, processor = load_vlm(dataclasses.replace(cfg.model, dtype=dtype), cfg.lora, for_training=True)
    spec = cfg.policy.spec(processor.digiq_family)
    begin_output(plan, accelerator)
    if is_main:
        warn_long_targets(processor, spec, examples.targets[:2000])
        save_config(cfg, out)
    return train_policy(
        accelerator, cfg, model, processor, spec, examples, resume_from,
        export_info={"stage": "train-bc", "dataset": cfg.dataset}, desc="train-bc",
    )  # fmt: skip
