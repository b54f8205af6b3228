"""``digiq collect``: behaviour-policy trajectories on any environment, in the digiq dataset schema.

    digiq collect output_dir=data/sim num_trajectories=500                 # the simulated phone (default)
    digiq collect env=miniwob output_dir=data/mw num_trajectories=480 num_workers=2 num_candidates=16
    digiq collect env=miniwob output_dir=data/mw --resume                  # continue a killed collection
    digiq collect env=toy ...                                              # any registered environment

Rows follow :data:`digiq.data.schema.FEATURES`. Candidates (``num_candidates > 0``: index 0 is the dataset
action, then ``n - 1`` samples) come from the same scripted behaviour policy at more noise, from its own random
stream, so the dataset actions are the same whether or not candidates are drawn. On MiniWoB++ they are drawn
during collection because they need the live page (its DOM). A model behaviour policy (``policy=<folder>``,
the paper's protocol) collects without candidates on any environment: ``digiq candidates source=policy`` then
samples them from a model on the stored screenshots.

    digiq collect env=miniwob policy=data/pretrained/gui-tiny-web-agent temperature=1.0 num_workers=1 ...

**Crash safety.** On MiniWoB++ finished episodes are written every ``shard_size`` episodes as complete shards
under ``<output_dir>/shards/``; the dataset itself (and its ``_COMPLETE`` marker) appears only when every
episode has been collected, so a killed collection never looks finished, and ``resume=true`` keeps every
finished shard and collects only the missing episodes (each episode's randomness is its own, so a resumed
collection holds the same episodes on the same pages as an uninterrupted one; a real browser under CPU load is
not bit-deterministic, see docs/miniwob.md). A browser that dies mid-episode is restarted and the episode collected
again from its first step. The simulator collects in seconds and writes the dataset in one go, with its
historical single random stream (the datasets of earlier releases are reproduced bit for bit). The
environment comes from :mod:`digiq.envs.registry` (``sim collect`` is this command's alias with env=sim).
"""

from __future__ import annotations

import dataclasses
import io
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np

from digiq.config import check, to_dict
from digiq.data.labels import DEFAULT_EPS, DEFAULT_SCALE, screen_diff
from digiq.data.schema import FEATURES, discounted_returns, save_dataset, undecoded_view
from digiq.envs import per_task_success
from digiq.envs.base import Observation
from digiq.envs.registry import EnvSpec, config_class, get_env, registered, validate_env
from digiq.envs.rollout import Episode, run_episodes
from digiq.errors import DataError, DigiqError
from digiq.utils.io import OutputPlan, begin_output, is_complete, plan_output
from digiq.utils.logging import get_logger

log = get_logger(__name__)
# The built-in environments' sections (YAMLs and overrides such as sim.benchmark=v2, miniwob.tasks=...).
SimConfig, BehaviourConfig = config_class("sim"), config_class("sim", behaviour=True)
MiniWoBConfig, MiniWoBBehaviourConfig = config_class("miniwob"), config_class("miniwob", behaviour=True)
# The Stage-1 label (DigiRL-agent/digiq @ 8181379,
# postprocess_data/get_more_actions/construct_sft_data.py:23-37): mean squared difference of the two
# screenshots at 0.25x scale on 0-255, "Yes" if > 30 -- the rule finetune-vlm trains on (digiq/data/labels.py).
CHANGE_SCALE = DEFAULT_SCALE
CHANGE_THRESHOLD = DEFAULT_EPS
SHARDS = "shards"


def screen_change(png_a: bytes, png_b: bytes, scale: float = CHANGE_SCALE) -> float:
    """Mean squared pixel difference (0-255 scale, all channels) of two PNG screenshots resized by ``scale``."""
    from PIL import Image

    with Image.open(io.BytesIO(png_a)) as a, Image.open(io.BytesIO(png_b)) as b:
        return screen_diff(a, b, scale)


def _policy_folder(policy: str) -> str | None:
    """A policy folder as given, or relative to the repository (the shipped models), or None."""
    from digiq.models.shipped import resolve_model_folder

    try:
        folder = resolve_model_folder(policy)
    except DigiqError:
        return None
    return folder if Path(folder).is_dir() else None


@dataclasses.dataclass
class Config:
    # A registered environment (digiq.envs.registry): sim = the simulated phone; miniwob = MiniWoB++ in
    # headless Chromium (pip install -e ".[miniwob]").
    env: str = "sim"
    # Where the dataset folder is written (HF save_to_disk + digiq_dataset.json + _COMPLETE).
    output_dir: str = "data/sim"
    # Number of trajectories; on the simulator 500 gives ~3.7k steps, enough for the critic stages on a CPU.
    num_trajectories: int = 500
    # Task split (disjoint: tasks on the simulator, page seeds on MiniWoB++; val exists on benchmarks that
    # have validation goals; demo = MiniWoB++'s demonstration pages, which the behaviour model learns from).
    split: Literal["train", "val", "test", "demo"] = "train"
    # Discount for mc_return (0.95 as the official default.yaml).
    gamma: float = 0.95
    # 0: leave `candidates` empty. >0: index 0 = the dataset action, then n-1 behaviour samples.
    num_candidates: int = 0
    # The behaviour policy that collects the data. 'scripted' = the environment's scripted policy (it reads
    # privileged state: a demonstrator, or a reference row). A folder = an exported digiq policy, a pixel
    # model that reads only the screen and the prompt, sampled at `temperature`: the paper's protocol,
    # where AutoUI collects the offline data (Digi-Q paper, Sec. 5.1). On devices collected in shards
    # (MiniWoB++) each step is sampled with its own seed, from (seed, episode, step), so an episode does the
    # same whichever worker runs it and after a resume.
    policy: str = "scripted"
    # Sampling temperature of a model policy (0 = greedy; the official candidate sampler uses 1.2,
    # DigiRL-agent/digiq @ 8181379, postprocess_data/get_more_actions/get_more_actions_batched.py:77).
    temperature: float = 1.0
    # A model policy: episodes stepped together (one generation batch).
    batch_size: int = 64
    # Seed of the task order, the behaviour policy and the candidate sampler (same seed = same dataset).
    seed: int = 0
    # Replace a finished output at output_dir instead of refusing it.
    overwrite: bool = False
    # Devices collected in shards (MiniWoB++): keep the finished shards of a killed collection and collect
    # only the missing episodes.
    resume: bool = False
    # MiniWoB++ (devices on worker threads): devices stepping episodes side by side (each browser is a
    # Chromium: ~350 MB, about one core).
    num_workers: int = 1
    # MiniWoB++: finished episodes per shard (a kill loses at most the episodes of one unwritten shard).
    shard_size: int = 25
    # The simulated device and the noise of its behaviour policy (env=sim).
    sim: SimConfig = dataclasses.field(default_factory=SimConfig)
    behaviour: BehaviourConfig = dataclasses.field(default_factory=BehaviourConfig)
    # MiniWoB++ tasks and browser, and the noise of its DOM behaviour policy (env=miniwob).
    miniwob: MiniWoBConfig = dataclasses.field(default_factory=MiniWoBConfig)
    miniwob_behaviour: MiniWoBBehaviourConfig = dataclasses.field(default_factory=MiniWoBBehaviourConfig)
    # The settings of an environment registered without a section here, checked against its config class.
    env_config: dict[str, Any] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        spec = validate_env(self)
        check(self.num_trajectories > 0, "num_trajectories must be > 0")
        check(0.0 <= self.gamma < 1.0, f"gamma must be in [0, 1), got {self.gamma}")
        check(self.num_candidates >= 0, "num_candidates must be >= 0")
        check(self.num_workers > 0, "num_workers must be > 0")
        check(self.shard_size > 0, "shard_size must be > 0")
        check(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        check(self.batch_size > 0, "batch_size must be > 0")
        if self.policy != "scripted":
            check(
                self.num_candidates == 0,
                "a model behaviour policy leaves the candidates to `digiq candidates source=policy "
                "policy=<a model>` (num_candidates must be 0 here)",
            )
            check(
                _policy_folder(self.policy) is not None,
                f"policy={self.policy}: neither 'scripted' nor an existing policy folder",
            )
        check(
            not spec.lockstep or not self.resume,
            f"resume is for environments collected in shards (env=miniwob); env={self.env} collects in one "
            "go",
        )


# --------------------------------------------------------------------------------------------------
# Episodes -> columns
# --------------------------------------------------------------------------------------------------


def _png(obs: Observation) -> bytes:
    if obs.png is None:
        buf = io.BytesIO()
        obs.screenshot.save(buf, format="PNG")
        obs.png = buf.getvalue()
    return obs.png


def episode_columns(episodes: list[Episode], gamma: float, changes: dict | None = None) -> tuple[dict, int]:
    """Dataset columns of ``episodes`` (``traj_id`` = the episode's index) and how many steps changed the
    screen by more than the Stage-1 threshold. ``changes`` caches the label per (png, png) pair."""
    cols: dict[str, list] = {name: [] for name in FEATURES}
    changes = {} if changes is None else changes
    changed = 0
    for ep in episodes:
        for t, tr in enumerate(ep.transitions):
            a, b = _png(tr.observation), _png(tr.next_observation)
            cols["traj_id"].append(ep.index)
            cols["step_id"].append(t)
            cols["task"].append(tr.observation.goal)
            cols["observation"].append(tr.prompt)
            cols["screenshot"].append({"bytes": a, "path": None})
            cols["next_screenshot"].append({"bytes": b, "path": None})
            cols["action"].append(tr.text)
            cols["reward"].append(float(tr.reward))
            cols["done"].append(bool(tr.done))
            cols["state_key"].append(str(tr.observation.info.get("state_key", "")))
            cols["candidates"].append(list(tr.candidates))
            key = (
                tr.observation.info.get("state_key") or hash(a),
                tr.next_observation.info.get("state_key") or hash(b),
            )
            if key not in changes:
                changes[key] = a != b and screen_change(a, b) > CHANGE_THRESHOLD
            changed += changes[key]
        cols["mc_return"].extend(
            float(v) for v in discounted_returns([t.reward for t in ep.transitions], gamma)
        )
    return cols, changed


def step_seed(seed: int, episode: int, step: int) -> int:
    """The sampling seed of one step of a model collecting in shards: a function of the episode and step
    only, never of which worker ran it or what else was in the batch."""
    return int(np.random.SeedSequence([seed, 3, episode, step]).generate_state(1)[0])


def episode_seeded_policy(folder: str, temperature: float, seed: int) -> Any:
    """A policy folder as a rollout callable that samples each item on its own, seeded by
    :func:`step_seed` (``temperature`` 0: greedy). Devices on worker threads fill the batch in whatever order
    they finish, so a batch-level seed would tie an episode's actions to the scheduling; one generation per
    item costs little at the 1-2 browsers a CPU runs."""
    from digiq.models.policy import generate_actions, load_policy, load_policy_fn

    if temperature == 0:
        return load_policy_fn(folder, temperature=0.0)  # greedy: already a function of the screen alone
    model, processor, spec = load_policy(folder)

    def policy_fn(batch: list[dict]) -> list[str]:
        return [
            generate_actions(
                model,
                processor,
                [b["screenshot"]],
                [b["observation"]],
                temperature=temperature,
                seed=step_seed(seed, int(b["episode"]), int(b["step"])),
                spec=spec,
            )[0][0]
            for b in batch
        ]

    return policy_fn


def _plan(cfg: Config, spec: EnvSpec, world: Any) -> tuple[list, Any, Any]:
    """The environment's instances, scripted behaviour policy and candidate sampler for ``cfg``."""
    return spec.plan(world, spec.settings(cfg)[1], cfg.split, cfg.num_trajectories, cfg.seed)


def collect_columns(cfg: Config, world: Any = None, progress: bool = True) -> tuple[dict, dict]:
    """A lock-step environment's (the simulator's) dataset columns (dict of lists) and summary stats, without
    writing anything. ``world``: the environment's opened world (a ``SimPhone``), else opened from ``cfg``."""
    from tqdm.auto import tqdm

    spec = get_env(cfg.env)
    check(
        spec.lockstep,
        f"collect_columns is the in-memory collection of lock-step environments; env={cfg.env} writes shards",
    )
    world = world if world is not None else spec.open(spec.settings(cfg)[0])
    instances, policy, cands = _plan(cfg, spec, world)
    workers = 1
    if cfg.policy != "scripted":
        from digiq.models.policy import load_policy_fn

        # Its own seed stream (the scripted plan's third child would be the candidates'): the same seed
        # collects the same episodes.
        model_seed = int(np.random.SeedSequence(cfg.seed).spawn(4)[3].generate_state(1)[0])
        policy = load_policy_fn(
            _policy_folder(cfg.policy),
            temperature=cfg.temperature,
            seed=model_seed,
            batch_size=cfg.batch_size,
        )
        workers = min(cfg.batch_size, len(instances))
    with tqdm(total=len(instances), desc=f"{cfg.env} collect", unit="traj", disable=not progress) as bar:
        episodes = run_episodes(
            spec.make(world, workers),
            instances,
            policy,
            candidates=cands,
            num_candidates=cfg.num_candidates - 1 if cfg.num_candidates > 0 else 0,
            record=True,
            progress=bar,
        )
    changes: dict = {}
    cols, changed = episode_columns(episodes, cfg.gamma, changes)
    stats = _stats(episodes, len(cols["traj_id"]), changed)
    stats["distinct_states"] = len({k for pair in changes for k in pair})
    stats["distinct_transitions"] = len(changes)
    return cols, stats


def _stats(episodes: list[Episode], steps: int, changed: int) -> dict[str, Any]:
    per_task = per_task_success((e.instance.task_id, e.success) for e in episodes)
    return {
        "num_trajectories": len(episodes),
        "num_steps": steps,
        "success_rate": sum(e.success for e in episodes) / max(1, len(episodes)),
        # Stage-1 label balance: the fraction of steps whose screen changed by more than the threshold.
        "screen_change_fraction": changed / max(1, steps),
        "per_task_success": per_task,
    }


# --------------------------------------------------------------------------------------------------
# MiniWoB++: sharded, resumable collection
# --------------------------------------------------------------------------------------------------


def _plan_fingerprint(cfg: Config) -> dict[str, Any]:
    """What fixes each episode's content: a resumed collection must have the same (num_trajectories,
    workers and shard size may change)."""
    d = to_dict(cfg)
    for k in ("output_dir", "overwrite", "resume", "num_workers", "shard_size", "num_trajectories"):
        d.pop(k, None)
    spec = get_env(cfg.env)
    for name in _other_sections(spec):  # another environment's settings change nothing here
        d.pop(name, None)
    if not d["env_config"]:  # the plans of earlier releases have no such key
        d.pop("env_config")
    section = (d.get(spec.section) if spec.section else d.get("env_config")) or {}
    for k in spec.volatile:
        section.pop(k, None)
    return d


def _other_sections(spec: EnvSpec) -> list[str]:
    """The stage-config sections of the registered environments other than ``spec``."""
    out = []
    for name in registered():
        other = get_env(name)
        if other is not spec:
            out += [
                f
                for f in (other.section, other.behaviour_section)
                if f and f not in (spec.section, spec.behaviour_section)
            ]
    return out


def _finished_shards(shard_root: Path) -> list[Path]:
    return sorted(p for p in shard_root.glob("shard-*") if p.is_dir() and is_complete(p))


def _collect_miniwob(cfg: Config, plan: OutputPlan) -> tuple[Any, dict[str, Any]]:
    from datasets import concatenate_datasets, load_from_disk
    from tqdm.auto import tqdm

    out = Path(cfg.output_dir)
    shard_root = out / SHARDS
    begin_output(plan)  # on overwrite the old output is kept aside until the dataset replaces the shards
    shard_root.mkdir(parents=True, exist_ok=True)
    # Leftovers of a shard whose writer was killed: never complete, never read.
    for junk in shard_root.glob(".shard-*"):
        shutil.rmtree(junk, ignore_errors=True)

    def read_shards() -> list[Any]:
        return [load_from_disk(str(p)) for p in _finished_shards(shard_root)]

    done_ids: set[int] = set()
    prior = read_shards()
    for ds in prior:
        done_ids.update(int(t) for t in set(ds["traj_id"]))
    done_ids = {i for i in done_ids if i < cfg.num_trajectories}
    if done_ids:
        log.info(
            "resuming: %d of %d episodes already collected in %s",
            len(done_ids),
            cfg.num_trajectories,
            shard_root,
        )

    spec = get_env(cfg.env)
    world = spec.open(spec.settings(cfg)[0])
    instances, policy, cands = _plan(cfg, spec, world)
    if cfg.policy != "scripted":  # a pixel model collects by sampling; candidates come offline
        policy, cands = episode_seeded_policy(_policy_folder(cfg.policy), cfg.temperature, cfg.seed), None
    pending: list[Episode] = []
    outcomes: list[Episode] = []
    next_shard = len(_finished_shards(shard_root))

    def flush() -> None:
        nonlocal next_shard
        if not pending:
            return
        from datasets import Dataset

        cols, _ = episode_columns(sorted(pending, key=lambda e: e.index), cfg.gamma)
        save_dataset(
            Dataset.from_dict(cols, features=FEATURES),
            shard_root / f"shard-{next_shard:05d}",
            {"episodes": len(pending)},
            overwrite=False,  # a new shard number: never a finished shard
        )
        next_shard += 1
        pending.clear()

    def on_episode(ep: Episode) -> None:
        outcomes.append(Episode(ep.index, ep.instance, ep.success, ep.steps))
        pending.append(ep)
        if len(pending) >= cfg.shard_size:
            flush()

    envs = spec.make(world, cfg.num_workers)
    t0 = time.perf_counter()
    try:
        with tqdm(
            total=cfg.num_trajectories, initial=len(done_ids), desc=f"collect {cfg.env}", unit="ep"
        ) as bar:
            run_episodes(
                envs,
                instances,
                policy,
                candidates=cands,
                num_candidates=cfg.num_candidates - 1 if cfg.num_candidates > 0 else 0,
                record=True,
                skip=done_ids,
                on_episode=on_episode,
                threads=True,
                group_by_task=True,
                progress=bar,
            )
        flush()
    finally:
        for e in envs:
            e.close()
    seconds = time.perf_counter() - t0
    shards = read_shards()
    ds = concatenate_datasets(shards)
    ds = ds.filter(lambda t: t < cfg.num_trajectories, input_columns="traj_id")
    ds = ds.sort(["traj_id", "step_id"])
    ids = set(int(t) for t in set(ds["traj_id"]))
    missing = set(range(cfg.num_trajectories)) - ids
    if missing:
        raise DataError(f"{out}: episodes {sorted(missing)[:10]} are missing from the shards")
    # Success and steps from the rows (episodes of earlier, resumed runs included).
    task_of = {i: instances[i].task_id for i in range(cfg.num_trajectories)}
    ends = [i for i, d in enumerate(ds["done"]) if d]
    rewards, trajs = ds["reward"], ds["traj_id"]
    per_task = per_task_success((task_of[int(trajs[i])], rewards[i] > 0) for i in ends)
    view = undecoded_view(ds, ["screenshot", "next_screenshot"])
    changed = 0
    for start in range(0, len(view), 256):
        rows = view[start : start + 256]
        for a, b in zip(rows["screenshot"], rows["next_screenshot"]):
            changed += a["bytes"] != b["bytes"] and screen_change(a["bytes"], b["bytes"]) > CHANGE_THRESHOLD
    stats = {
        "num_trajectories": cfg.num_trajectories,
        "num_steps": len(ds),
        "success_rate": sum(r[0] for r in per_task.values()) / cfg.num_trajectories,
        "screen_change_fraction": changed / max(1, len(ds)),
        "per_task_success": per_task,
        "collected_this_run": len(outcomes),
        "collect_seconds": seconds,
        "steps_per_second": sum(e.steps for e in outcomes) / seconds if seconds > 0 else 0.0,
        "num_workers": cfg.num_workers,
    }
    return ds, stats


def run(cfg: Config) -> dict:
    from datasets import Dataset

    spec = get_env(cfg.env)
    plan = plan_output(
        cfg.output_dir,
        "collect",
        resume=cfg.resume,
        overwrite=cfg.overwrite,
        fingerprint=_plan_fingerprint(cfg),
        resumable=not spec.lockstep,
    )
    if plan.finished:
        log.info("%s is already complete: nothing to resume", cfg.output_dir)
        return {}
    t0 = time.perf_counter()
    if spec.lockstep:
        cols, stats = collect_columns(cfg)
        ds = Dataset.from_dict(cols, features=FEATURES)
    else:
        ds, stats = _collect_miniwob(cfg, plan)
    info: dict[str, Any] = {
        "source": cfg.env,
        "gamma": cfg.gamma,
        "split": cfg.split,
        "seed": cfg.seed,
        "num_candidates": cfg.num_candidates,
        "config": to_dict(cfg),
        **stats,
    }
    config, behaviour = spec.settings(cfg)
    info[spec.section or "env_config"] = to_dict(config)
    if behaviour is not None:
        info["behaviour"] = to_dict(behaviour)
    # a sharded collection's dataset replaces its folder of shards
    save_dataset(ds, cfg.output_dir, info, plan=plan)
    stats["seconds"] = time.perf_counter() - t0
    log.info(
        "wrote %d trajectories / %d steps to %s in %.1fs (behaviour success %.3f, screen-change fraction %.3f)",
        stats["num_trajectories"],
        stats["num_steps"],
        cfg.output_dir,
        stats["seconds"],
        stats["success_rate"],
        stats["screen_change_fraction"],
    )
    return stats
