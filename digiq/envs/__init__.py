"""Devices behind one interface (:class:`digiq.envs.base.Env`), and the episodes run on them.

* :mod:`digiq.envs.base`     ``Env``, ``Observation``, ``StepResult``, ``TaskInstance``
* :mod:`digiq.envs.registry` ``EnvSpec``, ``register_env``, ``get_env``: environments by name, with their
  scripted policies and capabilities (docs/environments.md)
* :mod:`digiq.envs.sim`      the simulated phone (:mod:`digiq.sim`), with its scripted policies
* :mod:`digiq.envs.miniwob`  MiniWoB++ in headless Chromium (``pip install -e ".[miniwob]"``)
* :mod:`digiq.envs.miniwob_policy`  the scripted DOM behaviour policy for MiniWoB++
* :mod:`digiq.envs.rollout`  ``run_episodes``: lock-step episodes over several environment workers

Collection (``digiq collect env=...``), evaluation (``digiq evaluate env=...``) and candidate sampling are
written once against the interface and the registry; a policy is passed in as a function of a batch of
screens.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from digiq.envs.base import Env, Observation, StepResult, TaskInstance
from digiq.envs.registry import BUILTINS, EnvSpec, get_env, register_env, registered
from digiq.envs.rollout import PolicyFn, run_episodes
from digiq.errors import DigiqError
from digiq.utils.stats import wilson_interval

__all__ = [
    "BUILTINS",
    "Env",
    "EnvSpec",
    "Observation",
    "StepResult",
    "TaskInstance",
    "builtin_policy_fn",
    "evaluate_policy",
    "get_env",
    "make_envs",
    "per_task_success",
    "register_env",
    "registered",
    "success_summary",
]


def make_envs(
    name: str,
    num: int,
    *,
    config: Any = None,
    world: Any = None,
    sim: Any = None,
    miniwob: Any = None,
    phone: Any = None,
) -> list[Env]:
    """``num`` devices of environment ``name`` sharing one ``world`` (opened from ``config`` when None).

    ``phone`` (a ``SimPhone``) is the simulator's world, ``sim`` / ``miniwob`` its and MiniWoB++'s config:
    the names of earlier releases."""
    spec = get_env(name)
    world = world if world is not None else phone
    if world is None:
        world = spec.open(next((c for c in (config, sim, miniwob) if c is not None), None))
    return spec.make(world, num)


def builtin_policy_fn(
    env: str,
    name: str,
    seed: int = 0,
    *,
    world: Any = None,
    config: Any = None,
    behaviour: Any = None,
    **kw: Any,
) -> PolicyFn:
    """A scripted policy of environment ``env``: ``behaviour`` (the data-collection policy), ``optimal``
    (argmax Q* on the simulator, the DOM expert on MiniWoB++) or ``random`` (the behaviour's mistakes only).

    ``world`` / ``config``: the environment's (default settings when both are None); ``behaviour``: its
    behaviour policy's settings. Earlier names: ``phone`` (the simulator's world), ``miniwob_behaviour``."""
    if name not in BUILTINS:
        raise DigiqError(f"unknown built-in policy {name!r} ({', '.join(BUILTINS)})")
    spec = get_env(env)
    world = world if world is not None else kw.get("phone")
    if world is None:
        world = spec.open(config)
    if behaviour is None and spec.behaviour_section:
        behaviour = kw.get(spec.behaviour_section)
    if behaviour is None and spec.behaviour_cls is not None:
        behaviour = spec.behaviour_cls()
    return spec.scripted_policy(world, behaviour, name, seed)


def per_task_success(outcomes: Iterable[tuple[str, bool]]) -> dict[str, list[int]]:
    """``{task_id: [successes, episodes]}`` of ``(task_id, success)`` pairs."""
    per_task: dict[str, list[int]] = {}
    for task_id, success in outcomes:
        row = per_task.setdefault(task_id, [0, 0])
        row[0] += int(success)
        row[1] += 1
    return per_task


def success_summary(episodes: Sequence[Any], split: str) -> dict[str, Any]:
    """Success rate with its 95% Wilson interval, mean steps, and per-task [successes, episodes]."""
    n = len(episodes)
    k = sum(int(e.success) for e in episodes)
    lo, hi = wilson_interval(k, n)
    per_task = per_task_success((e.instance.task_id, e.success) for e in episodes)
    return {
        "success_rate": k / n if n else 0.0,
        "ci_low": lo,
        "ci_high": hi,
        "num_episodes": n,
        "num_successes": k,
        "mean_steps": float(np.mean([e.steps for e in episodes])) if n else 0.0,
        "split": split,
        "per_task": per_task,
    }


def evaluate_policy(
    policy_fn: PolicyFn,
    split: str = "test",
    num_episodes: int = 200,
    seed: int = 0,
    phone: Any = None,
    batch_size: int = 64,
    progress: bool = False,
    *,
    env: str = "sim",
    miniwob: Any = None,
    num_workers: int = 1,
    trace: bool = False,
    config: Any = None,
    world: Any = None,
) -> dict[str, Any]:
    """Run ``num_episodes`` episodes of ``policy_fn`` on ``split`` of environment ``env``.

    Lock-step environments (the simulator) step ``batch_size`` devices in blocks (the policy sees batches of
    that size); the others (MiniWoB++) run ``num_workers`` devices, each taking its next episode as soon as
    one ends. Tasks are cycled in a seeded order (MiniWoB++ instances also get fresh page seeds: see
    :func:`digiq.envs.miniwob.task_instances`). ``world`` (``phone`` on the simulator) or ``config``
    (``miniwob`` on MiniWoB++) sets the environment up (its defaults when all are None).
    Returns ``success_rate, ci_low, ci_high, num_episodes, num_successes, mean_steps, split, per_task``.

    ``trace`` (environments with a trace capability, i.e. an exact Q*) adds where the failed episodes went
    wrong: ``first_mistakes`` (per task, the first failed episode's first non-optimal step: see
    :func:`digiq.envs.sim.first_mistake`) and ``first_mistake_screens`` (failed episodes counted by the screen
    of that step).
    """
    if num_episodes <= 0:
        raise DigiqError(f"num_episodes must be > 0, got {num_episodes}")
    spec = get_env(env)
    tracer = spec.require("trace", "trace (the exact Q*)") if trace else None
    world = world if world is not None else phone
    if world is None:
        world = spec.open(config if config is not None else miniwob)
    lockstep = spec.lockstep
    envs = spec.make(world, min(batch_size, num_episodes) if lockstep else num_workers)
    bar = None
    try:
        instances = envs[0].task_instances(split, num_episodes, seed)
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=num_episodes, desc=f"rollout {env} {split}", unit="ep")
        episodes = run_episodes(
            envs,
            instances,
            policy_fn,
            refill=not lockstep,
            threads=not lockstep,
            group_by_task=not lockstep,
            progress=bar,
            record=trace,
        )
    finally:
        if bar is not None:
            bar.close()
        for e in envs:
            e.close()
    summary = success_summary(episodes, split)
    if tracer is not None:
        summary.update(tracer(world, episodes))
    return summary
