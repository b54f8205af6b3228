"""``digiq pretrain-vlm``: teach a tiny VLM to read GUI screens before it ever sees the simulator's tasks.

    digiq pretrain-vlm --config configs/pretrain-vlm/gui-tiny.yaml      # the shipped data/pretrained/gui-tiny
    digiq pretrain-vlm output_dir=runs/pt train.max_steps=200            # a short run
    digiq pretrain-vlm ... --resume                                      # continue a killed run

The paper starts from VLMs that already read screens (LLaVA-1.5 for the critic, AutoUI for the policy;
arXiv:2502.15760, Sec. 5); our tiny VLMs start from random weights. This recipe trains one on an endless
stream of randomised synthetic screens (:mod:`digiq.data.synthetic`) and questions of general skills:
grounding, referring, reading, toggle state, screen type, instruction parsing and copying text. It never
sees the simulator's task solutions (no next actions, success, screen-change or value labels).

Each optimiser step draws ``train.batch_size`` fresh samples, sample ``i`` of step ``t`` a pure function of
``(seed, t, i)``: a resumed run sees exactly the data an uninterrupted one would. The output ``model/`` is
a policy export (``save_pretrained`` + ``digiq_policy.json``, compact actions) with ``pretraining.json``
(config and metrics) and a model card ``README.md``; ``export_dir`` copies it to a second place (the shipped
model in ``data/pretrained/``). Per-skill accuracy is measured at the end on freshly generated screens of
another seed (``eval_seed``).
"""

from __future__ import annotations

import dataclasses
import random
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from digiq.config import ModelConfig, WandbConfig, check, save_config, to_dict
from digiq.data.synthetic import SKILLS, Sample, is_correct, make_sample, sample_stream_item
from digiq.envs.web_screens import (
    WEB_SKILLS,
    WebScreen,
    WebScreensConfig,
    bank_summary,
    collect_web_screens,
    load_web_screens,
    make_web_sample,
    save_web_screens,
)
from digiq.errors import DataError
from digiq.models.policy import (
    PolicySpec,
    build_chat_training_batch,
    generate_texts,
    save_policy,
)
from digiq.models.vlm import load_vlm
from digiq.sim.synthetic import GRID_SKILLS, check_grid_colour_tiles
from digiq.training.accelerator import make_accelerator
from digiq.training.checkpoint import inner, load_checkpoint
from digiq.training.output import begin_output, check_output, finish_output
from digiq.training.policy_loop import PolicyOptimConfig, train_steps
from digiq.training.schedule import make_scheduler
from digiq.utils.io import atomic_write_json, atomic_write_text, is_complete, plan_output, staged_output
from digiq.utils.logging import MetricsLogger, get_logger
from digiq.utils.machine import describe
from digiq.utils.seed import set_seed

ALL_SKILLS = (*SKILLS, *GRID_SKILLS, *WEB_SKILLS)
log = get_logger(__name__)
DISTRIBUTED = True
MODEL_DIR = "model"
PRETRAINING_FILE = "pretraining.json"
# The policy of the simulated pipeline (train_bc.TINY_POLICY): the pretrained model is its drop-in start.
TINY_POLICY = "tiny:idefics3@image_size=128,patch=16"


@dataclasses.dataclass
class SkillWeights:
    """Relative frequency of each skill in the stream (0 leaves a skill out)."""

    # 'Where is "X"?' / 'Goal: Tap "X"' -> tap y x (the hardest skill for a 16-token image: weighted up).
    ground: float = 3.0
    # 'What is at y x?' / the point drawn as a cursor -> the label or 'nothing'.
    refer: float = 3.0
    # The title or the search field's text.
    read: float = 0.5
    # 'Is <toggle> on?' on a settings-like screen.
    state: float = 1.0
    # The kind of screen.
    screen: float = 0.5
    # The site, query or toggle of an AitW-style goal of made-up words.
    parse: float = 2.0
    # 'Goal: Type "<text>"' -> type <text>: copy text the model never saw.
    type: float = 1.5
    # Which home-screen app a goal's site names (by name, or is the overlay cursor on it), and whether a
    # typed text is the goal's query. 0 keeps the shipped gui-tiny's stream (configs/pretrain-vlm/gui-tiny.yaml).
    match: float = 0.0
    # A goal naming a made-up app on a v2-like shuffled 3 x 3 app grid -> a tap on its tile (v2's apps are only
    # distractors). 0 keeps the shipped gui-tiny's stream; configs/pretrain-vlm/gui-tiny-grid.yaml uses it.
    grid: float = 0.0
    # A goal naming a tile's colour on the same grid of 9 distinct named colours -> a tap on it (colours only,
    # no v2 app). 0 keeps the shipped gui-tiny's stream; configs/pretrain-vlm/gui-tiny-colour.yaml uses it.
    grid_colour: float = 0.0
    # Grounding and referring on real web pages: MiniWoB++ screens of tasks outside the pipeline's list, labels
    # from the DOM (`web`; needs chromium: pip install -e ".[miniwob]"). 0 = no browser needed.
    web_ground: float = 0.0
    web_refer: float = 0.0

    def as_lists(self) -> tuple[list[str], list[float]]:
        pairs = [(s, float(getattr(self, s))) for s in ALL_SKILLS if getattr(self, s) > 0]
        return [s for s, _ in pairs], [w for _, w in pairs]

    @property
    def uses_web(self) -> bool:
        return any(getattr(self, s) > 0 for s in WEB_SKILLS)

    def validate(self, where: str = "skills") -> None:
        check(all(getattr(self, s) >= 0 for s in ALL_SKILLS), f"{where}: weights must be >= 0")
        check(any(getattr(self, s) > 0 for s in ALL_SKILLS), f"{where}: at least one weight must be > 0")


@dataclasses.dataclass
class PretrainLoopConfig:
    # Global batch size (split across processes); every sample is a fresh screen.
    batch_size: int = 32
    # Optimiser steps (the stream is endless).
    max_steps: int = 4000
    log_every: int = 25
    # Write <output_dir>/checkpoints/step-N every this many steps (and at the end); resumable with --resume.
    save_every: int = 250
    keep_checkpoints: int = 2
    # DataLoader workers drawing and encoding the screens (0 = in the training process; on 2 cores the
    # worker and the model share them: 0 measured 10% faster there).
    num_workers: int = 0

    def validate(self, where: str = "train") -> None:
        check(self.batch_size > 0 and self.max_steps > 0, f"{where}.batch_size / max_steps must be > 0")
        check(self.log_every > 0 and self.save_every > 0, f"{where}.log_every / save_every must be > 0")
        check(self.keep_checkpoints >= 1, f"{where}.keep_checkpoints must be >= 1")
        check(self.num_workers >= 0, f"{where}.num_workers must be >= 0")


@dataclasses.dataclass
class Config:
    output_dir: str = "runs/pretrain"
    # The VLM to pretrain: by default the simulated pipeline's tiny policy architecture (Idefics3, 128 px,
    # 16 px patches: 16 image tokens), so the result is a drop-in start for train-bc and finetune-vlm.
    model: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(name_or_path=TINY_POLICY))
    skills: SkillWeights = dataclasses.field(default_factory=SkillWeights)
    # How many of a grid_colour screen's 9 tiles carry a distinct named colour (the rest one neutral fill):
    # 2 is the skill's easiest stage (tap the named one of two coloured tiles); 9 is the full skill.
    grid_colour_tiles: int = 9
    # The web screens of skills.web_ground / web_refer (collected once into <output_dir>/web_screens).
    web: WebScreensConfig = dataclasses.field(default_factory=WebScreensConfig)
    # Screen size of the generated screens (the simulated device's, sim.SimConfig).
    width: int = 180
    height: int = 320
    train: PretrainLoopConfig = dataclasses.field(default_factory=PretrainLoopConfig)
    optim: PolicyOptimConfig = dataclasses.field(
        default_factory=lambda: PolicyOptimConfig(lr=1e-3, warmup_ratio=0.02)
    )
    # Questions per skill of the final evaluation, on screens of `eval_seed` (never a training screen).
    eval_per_skill: int = 100
    eval_seed: int = 20261130
    seed: int = 0
    # Also copy the finished model/ folder here (e.g. data/pretrained/gui-tiny); refused if it holds a
    # finished model unless overwrite=true.
    export_dir: str = ""
    resume: bool = False
    overwrite: bool = False
    wandb: WandbConfig = dataclasses.field(default_factory=WandbConfig)

    def validate(self) -> None:
        check(bool(self.output_dir), "output_dir must be set")
        check(32 <= self.width <= 2048 and 32 <= self.height <= 4096, "width / height out of range")
        check(self.eval_per_skill >= 0, "eval_per_skill must be >= 0")
        check(
            not self.export_dir or Path(self.export_dir).resolve() != (Path(self.output_dir) / MODEL_DIR).resolve(),
            "export_dir must differ from <output_dir>/model",
        )  # fmt: skip
        check_grid_colour_tiles(self.grid_colour_tiles)
        self.skills.validate()
        if self.skills.uses_web:
            self.web.validate()
        self.train.validate()
        self.optim.validate()


def spec_for(processor: Any) -> PolicySpec:
    """The pretrained model's prompt settings: the chat template of its family, compact actions."""
    return PolicySpec(family=processor.digiq_family, action_format="compact", precision=2, max_new_tokens=24)


class _StepData(torch.utils.data.Dataset):
    """Item ``t`` = this process's share of step ``t``'s batch, encoded (draws and encodes in workers)."""

    def __init__(
        self, cfg: Config, processor: Any, rank: int, world: int, bank: list[WebScreen] | None = None
    ) -> None:
        self.cfg, self.processor, self.rank, self.world, self.bank = cfg, processor, rank, world, bank
        self.skills, self.weights = cfg.skills.as_lists()

    def __len__(self) -> int:
        return self.cfg.train.max_steps

    def __getitem__(self, step: int) -> tuple[list[int], dict[str, torch.Tensor]]:
        local = self.cfg.train.batch_size // self.world
        idx = range(self.rank * local, (self.rank + 1) * local)
        samples = [
            stream_item(
                self.cfg.seed,
                step,
                i,
                self.skills,
                self.weights,
                self.cfg.width,
                self.cfg.height,
                self.bank,
                self.cfg.grid_colour_tiles,
            )
            for i in idx
        ]
        # (row indices, batch) as train_steps takes them; the stream has no per-row weights.
        return [], build_chat_training_batch(
            self.processor,
            [s.image for s in samples],
            [s.question for s in samples],
            [s.answer for s in samples],
        )


def stream_item(
    seed: int,
    step: int,
    index: int,
    skills: list[str],
    weights: list[float],
    width: int,
    height: int,
    bank: list[WebScreen] | None = None,
    grid_colour_tiles: int = 9,
) -> Sample:
    """Sample ``index`` of step ``step``: the synthetic stream's item, or a web question drawn from the same
    random stream (without web skills it is exactly :func:`digiq.data.synthetic.sample_stream_item`)."""
    if bank is None:
        return sample_stream_item(seed, step, index, skills, weights, width, height, grid_colour_tiles)
    rng = random.Random(f"{seed}:{step}:{index}")
    skill = rng.choices(skills, weights)[0]
    if skill in WEB_SKILLS:
        return make_web_sample(rng, skill, bank)
    return make_sample(rng, skill, width, height, grid_colour_tiles)


def evaluation_samples(
    seed: int,
    per_skill: int,
    width: int = 180,
    height: int = 320,
    bank: list[WebScreen] | None = None,
    skills: Sequence[str] = SKILLS,
    grid_colour_tiles: int = 9,
) -> list[Sample]:
    """``per_skill`` fresh questions of each synthetic skill in ``skills`` (and of the web skills on the
    held-out web screens, when given), a pure function of ``seed``."""
    out = [
        make_sample(random.Random(f"eval:{seed}:{skill}:{i}"), skill, width, height, grid_colour_tiles)
        for skill in skills
        for i in range(per_skill)
    ]
    if bank:
        out += [
            make_web_sample(random.Random(f"eval:{seed}:{skill}:{i}"), skill, bank)
            for skill in WEB_SKILLS
            for i in range(per_skill)
        ]
    return out


def evaluate(
    model: Any, processor: Any, samples: list[Sample], batch_size: int = 32, progress: bool = False
) -> dict[str, float]:
    """Greedy answers to ``samples``; per-skill accuracy (``acc/<skill>``) and their mean (``acc/mean``)."""
    spec = spec_for(processor)
    hits: dict[str, list[bool]] = {}
    for b in tqdm(range(0, len(samples), batch_size), disable=not progress, desc="evaluate", unit="batch"):
        chunk = samples[b : b + batch_size]
        texts = generate_texts(
            model, processor, [s.image for s in chunk], ["" for _ in chunk], spec, temperature=0.0,
            user_texts=[s.question for s in chunk],
        )  # fmt: skip
        for s, out in zip(chunk, texts, strict=True):
            hits.setdefault(s.skill, []).append(is_correct(s, out[0]))
    acc = {f"acc/{k}": sum(v) / len(v) for k, v in hits.items()}
    if acc:
        acc["acc/mean"] = sum(acc.values()) / len(acc)
    return acc


def model_card(cfg: Config, metrics: dict[str, Any], command: str) -> str:
    """The model card (README.md of the exported folder): what it is, how it was made, what it scores."""
    acc = "\n".join(f"| {k.split('/', 1)[1]} | {v:.3f} |" for k, v in metrics.items() if k.startswith("acc/"))
    m = metrics.get("machine", {})
    name = Path(cfg.export_dir).name if cfg.export_dir else "pretrained"
    web = (
        f" and on {metrics.get('web_screens', {}).get('screens', 0)} real web pages (MiniWoB++ screens of "
        f"{len(cfg.web.tasks)} tasks outside the pipeline's list, `digiq/envs/web_screens.py`; grounding and "
        "referring labels from the DOM)"
        if cfg.skills.uses_web
        else ""
    )
    return f"""# {name}: a tiny VLM pretrained on GUI screens

A {metrics["parameters"] / 1e6:.2f}M-parameter `{cfg.model.name_or_path}` (Idefics3 classes, 16 image
tokens) trained by `digiq pretrain-vlm` on randomised synthetic phone screens (`digiq/data/synthetic.py`){web}
to ground, refer, read, tell toggle states and screen types, parse AitW-style goals of made-up words and
copy text. It never saw the simulated device's task solutions (no next actions, success, screen-change
or value labels). It is the start of `digiq pipeline` (pi_beta and Stage 1), as AutoUI and LLaVA-1.5 are
the paper's.

Load it with plain `transformers` (`AutoModelForImageTextToText`, `AutoProcessor`) or `digiq.models.vlm.load_vlm`;
`digiq_policy.json` holds the prompt template.

## How it was made

- command: `{command}`
- seed: {cfg.seed}; steps: {int(metrics["steps"])} of batch {cfg.train.batch_size}
  ({int(metrics["steps"]) * cfg.train.batch_size} generated screens); lr {cfg.optim.lr} ({cfg.optim.scheduler})
- wall time: {metrics["train_seconds"]:.0f} s training, {metrics["total_seconds"]:.0f} s in all;
  CPU time {metrics["cpu_seconds"]:.0f} s; machine: {m.get("cores")} cores, {m.get("torch_threads")} torch
  threads, measured matmul rate {m.get("matmul_gflops")} GFLOP/s
- loss: {metrics["loss_first"]:.3f} -> {metrics["loss_last"]:.3f}
- the resolved config and these numbers: `{PRETRAINING_FILE}`

## Accuracy on fresh screens (eval_seed {cfg.eval_seed}, {cfg.eval_per_skill} questions per skill, greedy)

| skill | accuracy |
|---|---|
{acc}

Grounding counts a tap inside the named widget; every other skill an exact answer (any case).
`tests/test_shipped_model.py` re-measures grounding and referring with plain `transformers`.
"""


def _command() -> str:
    args = sys.argv[1:]
    if args and args[0] == "pretrain-vlm":
        return "digiq " + " ".join(args)
    return "digiq pretrain-vlm " + " ".join(args)


def run(cfg: Config) -> dict[str, Any]:
    t_start, cpu_start = time.perf_counter(), time.process_time()
    out = Path(cfg.output_dir)
    accelerator = make_accelerator()
    is_main, world, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    plan = check_output(out, cfg.resume, cfg.overwrite, "pretrain-vlm", cfg)
    resume_from = plan.resume_from
    # the export folder is checked before hours of training, not after
    export = (
        plan_output(cfg.export_dir, "pretrain-vlm export", overwrite=cfg.overwrite)
        if cfg.export_dir
        else None
    )
    if cfg.train.batch_size % world:
        raise DataError(f"train.batch_size {cfg.train.batch_size} is not divisible by {world} processes")
    machine = describe()
    set_seed(cfg.seed)
    model, processor = load_vlm(cfg.model, None, for_training=True)
    begin_output(plan, accelerator)
    if is_main:
        save_config(cfg, out)
    total = cfg.train.max_steps
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params, lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay
    )
    sched = make_scheduler(opt, cfg.optim.scheduler, total, cfg.optim.warmup_ratio)
    model.train()
    model, opt = accelerator.prepare(model, opt)
    start = 0
    if resume_from is not None:
        start = load_checkpoint(resume_from).restore_training(
            accelerator.unwrap_model(model), inner(opt), sched, rank
        )
        log.info("resumed from %s at step %d / %d", resume_from, start, total)
    logger = MetricsLogger(
        out, cfg.wandb, to_dict(cfg), enabled=is_main, resume_step=start if resume_from else None
    )
    bank = eval_bank = None
    if cfg.skills.uses_web:
        bank_dir = out / "web_screens"
        if is_main and not is_complete(bank_dir):
            save_web_screens(collect_web_screens(cfg.web), bank_dir, cfg.web)
        accelerator.wait_for_everyone()
        bank, eval_bank = load_web_screens(bank_dir, "train"), load_web_screens(bank_dir, "eval")
        log.info("web screens: %s", bank_summary(bank_dir))
    loader = torch.utils.data.DataLoader(
        _StepData(cfg, processor, rank, world, bank),
        sampler=range(start, total),
        batch_size=None,
        num_workers=cfg.train.num_workers,
        generator=torch.Generator().manual_seed(cfg.seed),  # not the global RNG a resume restores
    )
    t0 = time.perf_counter()
    losses, _ = train_steps(
        accelerator, model, opt, sched, loader, out, total, start, cfg.train.log_every, cfg.train.save_every,
        cfg.train.keep_checkpoints, cfg.optim.max_grad_norm, logger, "pretrain-vlm",
    )  # fmt: skip
    train_seconds = time.perf_counter() - t0
    model = accelerator.unwrap_model(model)
    metrics: dict[str, Any] = {
        "steps": float(total),
        "steps_this_run": float(total - start),
        "loss_first": losses[0] if losses else float("nan"),
        "loss_last": sum(losses[-10:]) / max(1, len(losses[-10:])) if losses else float("nan"),
        "train_seconds": train_seconds,
        "parameters": float(sum(p.numel() for p in model.parameters())),
    }
    if is_main:
        model.eval()
        # The synthetic skills it was trained on (a skill of weight 0 would only add a 0 to the mean).
        trained = [sk for sk in cfg.skills.as_lists()[0] if sk not in WEB_SKILLS]
        samples = evaluation_samples(
            cfg.eval_seed,
            cfg.eval_per_skill,
            cfg.width,
            cfg.height,
            eval_bank,
            trained,
            cfg.grid_colour_tiles,
        )
        if bank is not None:
            metrics["web_screens"] = bank_summary(out / "web_screens")
        metrics.update(evaluate(model, processor, samples, progress=True))
        metrics["total_seconds"] = time.perf_counter() - t_start
        metrics["cpu_seconds"] = time.process_time() - cpu_start
        metrics["machine"] = machine
        command = _command()
        spec = spec_for(processor)
        # this run's own model/ (a resumed run rewrites it); the run folder was guarded
        save_policy(model, processor, out / MODEL_DIR, spec, {"stage": "pretrain-vlm"}, overwrite=True)
        record = {"command": command, "metrics": metrics, "config": to_dict(cfg)}
        atomic_write_json(out / MODEL_DIR / PRETRAINING_FILE, record)
        atomic_write_text(out / MODEL_DIR / "README.md", model_card(cfg, metrics, command))
        logger.log({f"final/{k}": v for k, v in metrics.items() if isinstance(v, float)}, total)
        atomic_write_json(out / "metrics.json", metrics)
        if export is not None:
            with staged_output(export) as tmp:
                for f in sorted((out / MODEL_DIR).iterdir()):
                    if f.is_file() and not f.name.startswith("_"):
                        shutil.copy2(f, tmp / f.name)
            log.info("exported the pretrained model to %s", cfg.export_dir)
        finish_output(out, {"steps": total})
        accs = ", ".join(f"{k[4:]} {v:.2f}" for k, v in metrics.items() if k.startswith("acc/"))
        log.info(
            "pretrain-vlm: %d steps, loss %.3f -> %.3f; accuracy %s",
            total,
            metrics["loss_first"],
            metrics["loss_last"],
            accs,
        )
    logger.finish()
    accelerator.wait_for_everyone()
    return metrics
