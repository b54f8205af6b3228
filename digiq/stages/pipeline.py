"""``digiq pipeline``: the whole Digi-Q pipeline on the simulated device, resumable stage by stage.

    digiq pipeline                                   # the recipe: configs/pipeline/default.yaml
    digiq pipeline output_dir=runs/p2 seed=1 train_critic.critic_loss=mc
    digiq pipeline --resume                          # continue a killed run (finished stages are skipped)

Stages, each writing its own folder under ``output_dir`` and handing off through files only::

    collect -> train_bc -> finetune_vlm -> candidates -> cache_features -> train_critic -> extract_policy -> evaluate

pi_beta (``train_bc``) and Stage 1 (``finetune_vlm``) both start from the shipped GUI-pretrained tiny VLM
(``data/pretrained/gui-tiny``, ``stage1_init: pretrained``, the default), as the paper's start from AutoUI and
LLaVA-1.5: models that already read screens (see ``Config.stage1_init``).

A stage whose folder holds a ``_COMPLETE`` marker is skipped; a folder without one is resumed (stages that
support ``resume``) or rebuilt. The per-stage sections take any field of that stage's own config, except the
input/output paths, which the pipeline wires (``<output_dir>/<stage>``). ``summary.json`` / ``summary.md``
collect the numbers: behaviour, BC and extracted-policy success rates, critic ranking metrics, stage times.

The recipe (every value tuned for the simulated device) is ``configs/pipeline/default.yaml``, read on top of the
stages' own defaults before any ``--config`` file (``configs/pipeline/smoke.yaml`` and the others change it
key by key); ``digiq pipeline --print-config`` prints the resolved config without running anything.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

from digiq.config import ConfigError, check, save_config, to_dict
from digiq.data.schema import (
    dataset_info,
    load_dataset,
    num_val_trajectories,
    save_dataset,
    trajectory_bounds,
)
from digiq.envs.registry import DEFAULT_ENV, episode_unit, get_env
from digiq.errors import DataError
from digiq.models.shipped import GUI_TINY, resolve_model_folder
from digiq.stages import (
    cache_features,
    candidates,
    evaluate,
    extract_policy,
    finetune_vlm,
    train_bc,
    train_critic,
)
from digiq.stages.collect import Config as CollectConfig
from digiq.stages.collect import run as run_collect
from digiq.training.policy_loop import POLICY_DIR
from digiq.utils.io import atomic_write_json, atomic_write_text, is_complete, mark_complete
from digiq.utils.logging import get_logger
from digiq.utils.machine import describe, matmul_gflops
from digiq.utils.stats import unit_success

log = get_logger("pipeline")

STAGES = (
    "collect",
    "train_bc",
    "finetune_vlm",
    "candidates",
    "cache_features",
    "train_critic",
    "extract_policy",
    "evaluate",
)


@dataclasses.dataclass
class Config:
    # The recipe: read before any --config, on top of these defaults (the stages' own); docs/defaults.md.
    RECIPE: ClassVar[str] = "configs/pipeline/default.yaml"

    # Root folder; every stage writes <output_dir>/<stage>.
    output_dir: str = "runs/pipeline"
    # Seed for every stage (each stage's own `seed` is overwritten with it).
    seed: int = 0
    # Stages to run, in order; a stage whose output is complete is skipped.
    stages: list[str] = dataclasses.field(default_factory=lambda: list(STAGES))
    # Stages to re-run even if their output is complete (later stages are re-run too).
    force: list[str] = dataclasses.field(default_factory=list)
    # Continue a killed run (the default behaviour of the pipeline anyway; kept for `--resume`).
    resume: bool = False
    # The weights Stage 1 fine-tunes. 'pretrained' (default) = the GUI-pretrained model `pretrained`, which
    # is then also pi_beta's start (train_bc.model): the paper's setting, a VLM that already reads screens
    # (LLaVA-1.5) for the critic and a pretrained GUI policy (AutoUI) for pi_beta. 'bc' = the
    # behaviour-cloned policy's VLM (train_bc's output, whatever train_bc.model is), the start before gui-tiny
    # existed.
    # 'model' = finetune_vlm.model as configured (a hub VLM such as LLaVA-1.5 on real data).
    stage1_init: Literal["pretrained", "bc", "model"] = "pretrained"
    # The pretrained VLM of stage1_init=pretrained: a save_pretrained folder (repository-relative paths are
    # found from any working directory). The shipped one is made by `digiq pretrain-vlm`.
    pretrained: str = GUI_TINY
    # Which VLM the Stage-2 features come from: 'stage1' = the fine-tuned model (Digi-Q); 'base' = the model
    # Stage 1 started from (the paper's off-the-shelf ablation).
    features_from: Literal["stage1", "base"] = "stage1"
    # Behaviour trajectories Stage 1 fine-tunes on (0 = the collected dataset itself). Above
    # collect.num_trajectories, the finetune_vlm stage first collects `data_stage1`: the same behaviour policy
    # on the same tasks with the same seed, so its first collect.num_trajectories trajectories are the
    # dataset's own. Stage 1 holds out the same trajectories as without the option (the dataset's last
    # finetune_vlm.val_fraction, which the critic validates on) and trains on all the others; every other
    # stage keeps the dataset. Off by default (docs/defaults.md).
    stage1_trajectories: int = 0
    # Which model samples the Best-of-N candidates with candidates.source=policy: 'pi_beta' = the behaviour
    # clone of the data (train_bc's export); 'behaviour' = the model that collected the data
    # (collect.policy, a policy folder), as the paper samples AutoUI. candidates.source=sim ignores it: the
    # simulator's scripted sampler reads the optimal actions, an oracle-backed reference.
    candidates_from: Literal["pi_beta", "behaviour"] = "pi_beta"
    # Where the actor that Stage 3 extracts (extract_policy.init_policy) starts: 'pi_beta' = the behaviour
    # clone of the data; 'behaviour' = the model that collected the data (collect.policy, a policy folder),
    # as the paper fine-tunes AutoUI (arXiv:2502.15760, Sec. 5.1). pi_beta is trained and evaluated either
    # way (a baseline row).
    actor_from: Literal["pi_beta", "behaviour"] = "pi_beta"
    # The simulated device's benchmark (env=sim): v1 (32 test goals, fixed starts) or v2 (train / val / test
    # goals, randomised starts; docs/benchmark_v2.md). Sets the `sim.benchmark` of every stage that steps it.
    benchmark: Literal["v1", "v2"] = "v1"
    # torch threads (0 = torch's default). On a shared 2-core machine 1-2 is fastest.
    threads: int = 0
    # The environment data is collected on and policies are evaluated on (a registered one,
    # digiq.envs.registry): sim = the simulated phone; miniwob = MiniWoB++ in headless Chromium (tasks in
    # `collect.miniwob.tasks`; evaluation uses the same tasks on fresh page seeds). On an environment without
    # an offline scripted sampler (MiniWoB++: its sampler needs the live page) the scripted collection draws
    # the Best-of-N candidates itself, so the candidates stage is skipped and `candidates.num_candidates` sets
    # their number; with candidates.source=policy (required when a model collects) the candidates stage
    # samples them from a model on the stored screenshots, on any environment (see candidates_in_collection).
    env: str = "sim"
    collect: CollectConfig = dataclasses.field(default_factory=CollectConfig)
    finetune_vlm: finetune_vlm.Config = dataclasses.field(default_factory=finetune_vlm.Config)
    train_bc: train_bc.Config = dataclasses.field(default_factory=train_bc.Config)
    candidates: candidates.Config = dataclasses.field(default_factory=candidates.Config)
    cache_features: cache_features.Config = dataclasses.field(default_factory=cache_features.Config)
    train_critic: train_critic.Config = dataclasses.field(default_factory=train_critic.Config)
    extract_policy: extract_policy.Config = dataclasses.field(default_factory=extract_policy.Config)
    evaluate: evaluate.Config = dataclasses.field(default_factory=evaluate.Config)

    def validate(self) -> None:
        for s in [*self.stages, *self.force]:
            check(s in STAGES, f"unknown stage {s!r}; stages are {list(STAGES)}")
        check(self.threads >= 0, "threads must be >= 0")
        for key, does in (("candidates_from", "samples"), ("actor_from", "starts the actor from")):
            check(
                getattr(self, key) == "pi_beta" or self.collect.policy != "scripted",
                f"{key}=behaviour {does} the model that collected the data: set collect.policy to a policy "
                "folder (the scripted policy is no model)",
            )
        check(
            self.candidates_from == "pi_beta" or self.candidates.source == "policy",
            "candidates_from=behaviour needs candidates.source=policy",
        )
        check(
            self.stage1_trajectories == 0 or self.stage1_trajectories > self.collect.num_trajectories,
            f"stage1_trajectories ({self.stage1_trajectories}) must be 0 (Stage 1 on the dataset) or more than "
            f"collect.num_trajectories ({self.collect.num_trajectories})",
        )
        spec = get_env(self.env)  # an unknown name lists the registered ones
        check(
            self.collect.policy == "scripted"
            or self.candidates.source == "policy"
            or spec.candidates is not None,
            f"collect.policy={self.collect.policy}: a model collects without candidates, and env={self.env} has "
            "no offline scripted sampler: set candidates.source=policy (candidates from a model, "
            "candidates_from=pi_beta|behaviour)",
        )
        check(
            self.stage1_trajectories == 0 or spec.lockstep,
            f"stage1_trajectories collects on the simulated device only (env=sim; lock-step environments), "
            f"not env={self.env}",
        )
        default_model = finetune_vlm.Config().model.name_or_path
        check(
            self.stage1_init == "model" or self.finetune_vlm.model.name_or_path == default_model,
            f"finetune_vlm.model ({self.finetune_vlm.model.name_or_path}) is ignored with "
            f"stage1_init={self.stage1_init} (Stage 1 starts from "
            f"{'the behaviour-cloned policy' if self.stage1_init == 'bc' else 'pretrained=' + self.pretrained}); "
            "set stage1_init=model to fine-tune it",
        )
        check(
            self.stage1_init != "pretrained"
            or self.train_bc.model.name_or_path == train_bc.Config().model.name_or_path,
            f"train_bc.model ({self.train_bc.model.name_or_path}) is ignored with stage1_init=pretrained "
            f"(pi_beta starts from pretrained={self.pretrained}); set `pretrained` instead, or stage1_init=bc",
        )
        check(
            self.stage1_init != "pretrained" or bool(self.pretrained), "pretrained must name a model folder"
        )


# Stage 1's own collection with `stage1_trajectories` (under output_dir).
STAGE1_DATA = "data_stage1"
# stage -> folder under output_dir
FOLDERS = {
    "collect": "data",
    "finetune_vlm": "finetune_vlm",
    "train_bc": "bc",
    "candidates": "data_candidates",
    "cache_features": "features",
    "train_critic": "critic",
    "extract_policy": "extract",
    "evaluate": "eval",
}


def candidates_in_collection(cfg: Config) -> bool:
    """True when the collection draws the Best-of-N candidates (and the candidates stage is skipped): a
    scripted collection on an environment whose scripted sampler needs the live device, unless the
    candidates are to come from a model (candidates.source=policy)."""
    return (
        cfg.collect.policy == "scripted"
        and cfg.candidates.source != "policy"
        and get_env(cfg.env).candidates is None
    )


def wire(cfg: Config) -> dict[str, Any]:
    """The per-stage configs with the pipeline's paths and seed filled in (pure; nothing is run)."""
    out = Path(cfg.output_dir)
    d = {k: out / v for k, v in FOLDERS.items()}
    c = {name: dataclasses.replace(getattr(cfg, name)) for name in STAGES}
    policy = str(d["train_bc"] / POLICY_DIR)  # pi_beta: Stage 1's start, the candidates', the actor's
    for name in STAGES:
        if hasattr(c[name], "seed"):
            c[name].seed = cfg.seed
    c["collect"].output_dir = str(d["collect"])
    for name in ("collect", "candidates", "evaluate"):
        c[name].sim = dataclasses.replace(c[name].sim, benchmark=cfg.benchmark)
    if cfg.collect.policy != "scripted":  # a shipped behaviour model is found from any working directory
        c["collect"].policy = resolve_model_folder(cfg.collect.policy)
    c["collect"].env = c["evaluate"].env = cfg.env
    data = d["candidates"]
    spec = get_env(cfg.env)
    if candidates_in_collection(cfg):  # drawn during collection (see Config.env)
        c["collect"].num_candidates = c["candidates"].num_candidates
        data = d["collect"]
    section = getattr(c["collect"], spec.section, None) if spec.section else None
    if hasattr(section, "tasks"):  # evaluation runs the collected tasks (on fresh seeds)
        setattr(
            c["evaluate"],
            spec.section,
            dataclasses.replace(getattr(c["evaluate"], spec.section), tasks=list(section.tasks)),
        )
    if spec.trace is None:
        c["evaluate"].trace = False  # the trace needs an exact Q*
    c["finetune_vlm"].dataset = str(d["collect"])
    if cfg.stage1_trajectories:
        # data_stage1 ends with the dataset's held-out trajectories (see _collect_stage1_data): hold out
        # exactly those (the +0.5 keeps floor() in split_by_trajectory off a rounding edge)
        held = num_val_trajectories(cfg.collect.num_trajectories, cfg.finetune_vlm.val_fraction)
        c["finetune_vlm"].dataset = str(out / STAGE1_DATA)
        c["finetune_vlm"].val_fraction = (held + 0.5) / cfg.stage1_trajectories
    c["finetune_vlm"].output_dir = str(d["finetune_vlm"])
    if cfg.stage1_init == "bc":
        c["finetune_vlm"].model = dataclasses.replace(c["finetune_vlm"].model, name_or_path=policy)
    elif cfg.stage1_init == "pretrained":
        start = resolve_model_folder(cfg.pretrained)
        c["finetune_vlm"].model = dataclasses.replace(c["finetune_vlm"].model, name_or_path=start)
        c["train_bc"].model = dataclasses.replace(c["train_bc"].model, name_or_path=start)
    c["train_bc"].dataset = str(d["collect"])
    c["train_bc"].output_dir = str(d["train_bc"])
    c["candidates"].dataset = str(d["collect"])
    c["candidates"].output_dir = str(d["candidates"])
    c["candidates"].policy = c["collect"].policy if cfg.candidates_from == "behaviour" else policy
    c["cache_features"].dataset = str(data)
    c["cache_features"].output_dir = str(d["cache_features"])
    if cfg.features_from == "base":
        base = c["finetune_vlm"].model  # after the stage1_init wiring: what Stage 1 started from
        c["cache_features"].model = dataclasses.replace(
            c["cache_features"].model, name_or_path=base.name_or_path, tiny_seed=base.tiny_seed
        )
    else:
        c["cache_features"].model = dataclasses.replace(
            c["cache_features"].model, name_or_path=str(d["finetune_vlm"])
        )
    # Features must be read the way Stage 1 was trained to read the screen (same rendering of the action).
    c["cache_features"].rendering = c["finetune_vlm"].rendering
    c["train_critic"].dataset = str(data)
    c["train_critic"].features = str(d["cache_features"])
    c["train_critic"].output_dir = str(d["train_critic"])
    c["train_critic"].gamma = c["collect"].gamma
    c["extract_policy"].dataset = str(data)
    c["extract_policy"].features = str(d["cache_features"])
    c["extract_policy"].critic_dir = str(d["train_critic"] / "critic")
    c["extract_policy"].init_policy = c["collect"].policy if cfg.actor_from == "behaviour" else policy
    c["extract_policy"].output_dir = str(d["extract_policy"])
    c["extract_policy"].gamma = c["collect"].gamma
    c["evaluate"].output_dir = str(d["evaluate"])
    return c


def _policies_to_evaluate(cfg: Config) -> dict[str, tuple[str, float | None]]:
    """label -> (policy, temperature; None = the evaluate config's). A model that collected the data is
    evaluated as it collected (sampled) and greedy; the scripted policy as itself."""
    out = Path(cfg.output_dir)
    behaviour: dict[str, tuple[str, float | None]] = {"behaviour": ("behaviour", None)}
    if cfg.collect.policy != "scripted":
        model = resolve_model_folder(cfg.collect.policy)
        behaviour = {
            "behaviour": (model, cfg.collect.temperature),
            "behaviour_greedy": (model, 0.0),
        }
    return {
        **behaviour,
        "bc": (str(out / FOLDERS["train_bc"] / POLICY_DIR), None),
        "extracted": (str(out / FOLDERS["extract_policy"] / POLICY_DIR), None),
    }


def _run_stage(name: str, stage_cfg: Any, cfg: Config) -> dict[str, Any]:
    if name == "collect":
        return run_collect(stage_cfg) or {}
    if name == "evaluate":
        results = {}
        for label, (policy, temperature) in _policies_to_evaluate(cfg).items():
            ecfg = dataclasses.replace(
                stage_cfg, policy=policy, mode="online", output_dir=str(Path(stage_cfg.output_dir) / label)
            )
            if temperature is not None:
                ecfg.temperature = temperature
            log.info("evaluate %s (%s)", label, policy)
            results[label] = evaluate.run(ecfg)
        return results
    if name == "finetune_vlm" and cfg.stage1_trajectories:
        _collect_stage1_data(cfg)
    module = {
        "finetune_vlm": finetune_vlm,
        "train_bc": train_bc,
        "candidates": candidates,
        "cache_features": cache_features,
        "train_critic": train_critic,
        "extract_policy": extract_policy,
    }[name]
    return module.run(stage_cfg) or {}


def _collect_stage1_data(cfg: Config) -> None:
    """Stage 1's own, larger collection (``stage1_trajectories``), unless a finished one is there: collected
    with the dataset's settings and seed, then reordered so that the dataset's held-out trajectories come last
    (Stage 1 holds out the trajectories it would hold out of the dataset). Part of the finetune_vlm stage, so
    that a run whose dataset was collected before the option was set gets it too."""
    folder = Path(cfg.output_dir) / STAGE1_DATA
    if is_complete(folder):
        return
    base = wire(cfg)["collect"]
    raw = folder.with_name(folder.name + ".raw")
    log.info("[finetune_vlm] collecting %d trajectories for Stage 1 -> %s", cfg.stage1_trajectories, folder)
    run_collect(
        dataclasses.replace(
            base, output_dir=str(raw), num_trajectories=cfg.stage1_trajectories, overwrite=True, resume=False
        )
    )
    ds = load_dataset(raw)
    bounds = trajectory_bounds(ds)
    n = cfg.collect.num_trajectories
    held = num_val_trajectories(n, cfg.finetune_vlm.val_fraction)
    if len(bounds) != cfg.stage1_trajectories:
        raise DataError(f"{raw}: expected {cfg.stage1_trajectories} trajectories, found {len(bounds)}")
    keep = [*bounds[: n - held], *bounds[n:], *bounds[n - held : n]]
    order = [i for s, e in keep for i in range(s, e)]
    info = {**dataset_info(raw), "stage1_of": str(base.output_dir), "held_out_last": held}
    save_dataset(ds.select(order), folder, info, overwrite=True)  # rebuilt only when unfinished or forced
    shutil.rmtree(raw, ignore_errors=True)


def _short(metrics: Any) -> Any:
    """Scalars only (stage results may hold lists or paths)."""
    if isinstance(metrics, dict):
        return {k: _short(v) for k, v in metrics.items() if _scalar_or_nested(v)}
    return metrics


def _scalar_or_nested(v: Any) -> bool:
    """Scalars, dicts, and short lists of numbers (per-goal ``[successes, episodes]`` for the summary)."""
    if isinstance(v, (list, tuple)):
        return len(v) <= 2 and all(isinstance(x, (int, float)) for x in v)
    return isinstance(v, (int, float, str, bool, dict))


def run(cfg: Config) -> dict[str, Any]:
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.output_dir)
    bc_folder = out / FOLDERS["train_bc"]
    if (
        cfg.stage1_init == "bc"
        and "finetune_vlm" in cfg.stages
        and "train_bc" not in cfg.stages
        and not is_complete(bc_folder)
    ):
        raise ConfigError(
            f"stage1_init=bc fine-tunes the behaviour-cloned policy, but {bc_folder} is not a finished "
            "train_bc output and train_bc is not in `stages`: add it, or set stage1_init=model"
        )
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    stage_cfgs = wire(cfg)
    summary_path = out / "summary.json"
    summary: dict[str, Any] = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary.setdefault("stages", {})
    machine = (
        None  # measured when a stage first runs: a re-run that skips them all keeps the old times' machine
    )
    forced = False
    for name in STAGES:
        if name not in cfg.stages:
            continue
        folder = out / FOLDERS[name]
        forced = forced or name in cfg.force
        if is_complete(folder) and not forced:
            log.info("[%s] complete at %s: skipped", name, folder)
            continue
        if name == "candidates" and candidates_in_collection(cfg):
            log.info("[candidates] drawn during collection on env=%s: skipped", cfg.env)
            continue
        scfg = stage_cfgs[name]
        resumable = hasattr(scfg, "resume") and folder.exists() and not forced
        if resumable:
            scfg.resume = True  # a folder without its marker: a killed run of this stage
            log.info("[%s] resuming the unfinished run in %s", name, folder)
        elif hasattr(scfg, "overwrite"):
            # forced, or a killed run of a stage that cannot resume: its old output goes
            scfg.overwrite = True
        if machine is None:
            machine = summary["machine"] = describe()  # stage times only compare next to the machine's speed
            log.info("machine: %s", machine)
        log.info("[%s] running -> %s", name, folder)
        t0 = time.perf_counter()
        metrics = _run_stage(name, scfg, cfg)
        seconds = time.perf_counter() - t0
        if not is_complete(folder):
            mark_complete(folder, {"stage": name})
        summary["stages"][name] = {"seconds": round(seconds, 1), "metrics": _short(metrics)}
        atomic_write_json(summary_path, summary)
        log.info("[%s] done in %.1f s", name, seconds)
    summary["total_seconds"] = round(sum(s.get("seconds", 0.0) for s in summary["stages"].values()), 1)
    if machine is not None:
        machine["matmul_gflops_end"] = round(matmul_gflops(), 1)
    summary["success"] = success_table(summary)
    atomic_write_json(summary_path, summary)
    atomic_write_text(out / "summary.md", render_summary(summary))
    print(render_summary(summary))  # noqa: T201 - the CLI result
    return summary


# unit -> (what the success is over, the interval's column, the count column)
UNIT_COLUMNS = {
    "goal": ("mean over goals", "95% CI over goals", "goals"),
    "page": ("over episodes", "95% Wilson over pages", "pages"),
}


def success_table(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each evaluated policy's success with a 95% interval over its environment's outcome unit: over goals
    on the simulator (a goal's repeated greedy episodes are one outcome), Wilson over episodes where every
    episode is a fresh page (``EnvSpec.fresh_episodes``, MiniWoB++)."""
    ev = summary.get("stages", {}).get("evaluate", {}).get("metrics", {})
    table = {}
    for label, m in ev.items():
        if isinstance(m, dict) and "success_rate" in m:
            unit = episode_unit(m.get("env") or DEFAULT_ENV)  # older results hold no env: the sim's
            cells = [tuple(v) for v in (m.get("per_task") or {}).values()]
            rate, lo, hi, n = (
                unit_success(cells, unit) if cells else (m["success_rate"], m["ci_low"], m["ci_high"], "")
            )
            table[label] = {"success_rate": rate, "ci_low": lo, "ci_high": hi, "unit": unit, "units": n}
    return table


def render_summary(summary: dict[str, Any]) -> str:
    """Markdown: success rates (behaviour / BC / extracted), critic metrics, stage times."""
    lines = ["# digiq pipeline summary", ""]
    ev = summary.get("stages", {}).get("evaluate", {}).get("metrics", {})
    if ev:
        traced = any(isinstance(m, dict) and "first_mistake_screens" in m for m in ev.values())
        splits = {m.get("split") for m in ev.values() if isinstance(m, dict)} - {None}
        split = splits.pop() if len(splits) == 1 else "test"
        table = success_table(summary)
        units = {row["unit"] for row in table.values()}
        if len(units) > 1:
            raise DataError(f"evaluate results of environments with different outcome units: {sorted(units)}")
        over, interval, count = UNIT_COLUMNS[units.pop() if units else "goal"]
        head = f"| policy | {split} success ({over}) | {interval} | {count} | episodes |"
        lines += [head + " failed episodes by first-mistake screen |" if traced else head]
        lines.append("|---|---|---|---|---|---|" if traced else "|---|---|---|---|---|")
        for label, m in ev.items():
            if label in table:
                t = table[label]
                row = (
                    f"| {label} | {t['success_rate']:.3f} | [{t['ci_low']:.3f}, {t['ci_high']:.3f}] | "
                    f"{t['units']} | {m.get('num_episodes', '')} |"
                )
                lines.append(row + f" {evaluate.screens_line(m)} |" if traced else row)
        lines.append("")
    s1 = summary.get("stages", {}).get("finetune_vlm", {}).get("metrics", {})
    if "heldout_accuracy" in s1:
        majority = s1.get("heldout_labels", {}).get("majority_accuracy")
        lines += [
            "| Stage 1 (screen-change label, held-out) | value |",
            "|---|---|",
            f"| accuracy | {s1['heldout_accuracy']:.4f} |",
            f"| AUC | {s1.get('heldout_auc', float('nan')):.4f} |",
        ]
        if majority is not None:
            lines.append(f"| majority baseline | {majority:.4f} |")
        lines.append("")
    crit = summary.get("stages", {}).get("train_critic", {}).get("metrics", {})
    if crit:
        keys = [k for k in crit if any(s in k for s in ("top1", "spearman", "pearson", "td_error"))]
        if keys:
            lines += ["| critic metric | value |", "|---|---|"]
            lines += [f"| {k} | {crit[k]:.4f} |" for k in keys if isinstance(crit[k], (int, float))]
            lines.append("")
    lines += ["| stage | seconds |", "|---|---|"]
    for name, s in summary.get("stages", {}).items():
        lines.append(f"| {name} | {s.get('seconds', '')} |")
    lines.append(f"| total | {summary.get('total_seconds', '')} |")
    m = summary.get("machine")
    if m:
        lines += [
            "",
            f"Machine: {m.get('cores')} cores, {m.get('torch_threads')} torch threads, measured float32 matmul "
            f"rate {m.get('matmul_gflops')} GFLOP/s at the start, {m.get('matmul_gflops_end', '?')} at the end "
            "(machines of one kind differ 3x or more: compare stage times at this rate).",
        ]
    return "\n".join(lines) + "\n"


__all__ = ["Config", "STAGES", "FOLDERS", "run", "wire", "render_summary", "success_table", "to_dict"]
