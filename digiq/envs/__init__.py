"""Devices behind one interface (:class:`digiq.envs.base.Env`), and the episodes run on them.

* :mod:`digiq.envs.base`     ``Env``, ``Observation``, ``StepResult``, ``TaskInstance``
* :mod:`digiq.envs.sim`      the simulated phone (:mod:`digiq.sim`), with its scripted policies
* :mod:`digiq.envs.miniwob`  MiniWoB++ in headless Chromium (``pip install -e ".[miniwob]"``)
* :mod:`digiq.envs.miniwob_policy`  the scripted DOM behaviour policy for MiniWoB++
* :mod:`digiq.envs.rollout`  ``run_episodes``: lock-step episodes over several environment workers

Collection (``digiq collect env=...``), evaluation (``digiq evaluate env=...``) and candidate sampling are
written once against the interface; a policy is passed in as a function of a batch of screens.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from digiq.envs.base import Env, Observation, StepResult, TaskInstance
from digiq.envs.rollout import PolicyFn, run_episodes
from digiq.errors import DigiqError
from digiq.utils.stats import wilson_interval

ENVS = ("sim", "miniwob")
BUILTINS = ("behaviour", "optimal", "random")

__all__ = [
    "BUILTINS",
    "ENVS",
    "Env",
    "Observation",
    "StepResult",
    "TaskInstance",
    "builtin_policy_fn",
    "evaluate_policy",
    "make_envs",
    "per_task_success",
    "success_summary",
]


def make_envs(name: str, num: int, *, sim: Any = None, miniwob: Any = None, phone: Any = None) -> list[Env]:
    """``num`` workers of environment ``name`` (simulated phones share one ``SimPhone``: its caches)."""
    if name == "sim":
        from digiq.envs.sim import SimEnv
        from digiq.sim.phone import SimPhone

        phone = phone or SimPhone(sim)
        return [SimEnv(phone=phone) for _ in range(num)]
    if name == "miniwob":
        from digiq.envs.miniwob import MiniWoBConfig, MiniWoBEnv

        cfg = miniwob or MiniWoBConfig()
        envs: list[Env] = []
        try:
            for _ in range(num):
                envs.append(MiniWoBEnv(cfg))
        except BaseException:
            for e in envs:
                e.close()
            raise
        return envs
    raise DigiqError(f"unknown environment {name!r}; choose one of {', '.join(ENVS)}")


def builtin_policy_fn(env: str, name: str, seed: int = 0, **kw: Any) -> PolicyFn:
    """A scripted policy of environment ``env``: ``behaviour`` (the data-collection policy), ``optimal``
    (argmax Q* on the simulator, the DOM expert on MiniWoB++) or ``random`` (the behaviour's mistakes only).

    Keywords: ``phone`` / ``behaviour`` (sim), ``miniwob_behaviour`` (a ``MiniWoBBehaviourConfig``)."""
    if name not in BUILTINS:
        raise DigiqError(f"unknown built-in policy {name!r} (behaviour, optimal, random)")
    if env == "sim":
        from digiq.envs.sim import sim_policy_fn
        from digiq.sim.phone import SimPhone

        return sim_policy_fn(name, kw.get("phone") or SimPhone(), seed, kw.get("behaviour"))
    if env == "miniwob":
        from digiq.envs.miniwob_policy import MiniWoBBehaviour, MiniWoBBehaviourConfig

        pi = MiniWoBBehaviour(kw.get("miniwob_behaviour") or MiniWoBBehaviourConfig())
        p = {"behaviour": None, "optimal": 1.0, "random": 0.0}[name]
        rngs: dict[int, np.random.Generator] = {}

        def fn(batch: list[dict]) -> list[Any]:
            out = []
            for b in batch:
                # One stream per episode, restarted with the episode: worker scheduling and browser restarts
                # do not change what the policy does.
                if b["step"] == 0 or b["episode"] not in rngs:
                    rngs[b["episode"]] = np.random.default_rng([seed, 1, b["episode"]])
                out.append(pi.act(b["info"], rngs[b["episode"]], p_optimal=p))
            return out

        return fn
    raise DigiqError(f"unknown environment {env!r}; choose one of {', '.join(ENVS)}")


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
) -> dict[str, Any]:
    """Run ``num_episodes`` episodes of ``policy_fn`` on ``split`` of environment ``env``.

    The simulator steps ``batch_size`` phones in blocks (the policy sees batches of that size); MiniWoB++ runs
    ``num_workers`` browsers, each taking its next episode as soon as one ends. Tasks are cycled in a seeded
    order (MiniWoB++ instances also get fresh page seeds: see :func:`digiq.envs.miniwob.task_instances`).
    Returns ``success_rate, ci_low, ci_high, num_episodes, num_successes, mean_steps, split, per_task``.

    ``trace`` (simulator only: it needs the exact Q*) adds where the failed episodes went wrong:
    ``first_mistakes`` (per task, the first failed episode's first non-optimal step: see
    :func:`digiq.envs.sim.first_mistake`) and ``first_mistake_screens`` (failed episodes counted by the screen
    of that step).
    """
    if num_episodes <= 0:
        raise DigiqError(f"num_episodes must be > 0, got {num_episodes}")
    if trace and env != "sim":
        raise DigiqError(f"trace needs the simulator's exact Q*; env={env!r} has none")
    sim_run = env == "sim"
    envs = make_envs(
        env, min(batch_size, num_episodes) if sim_run else num_workers, miniwob=miniwob, phone=phone
    )
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
            refill=not sim_run,
            threads=not sim_run,
            group_by_task=not sim_run,
            progress=bar,
            record=trace,
        )
    finally:
        if bar is not None:
            bar.close()
        for e in envs:
            e.close()
    summary = success_summary(episodes, split)
    if trace:
        summary.update(trace_failures(envs[0].phone, episodes))
    return summary


def trace_failures(phone: Any, episodes: Sequence[Any]) -> dict[str, Any]:
    """``first_mistakes`` and ``first_mistake_screens`` of recorded simulator episodes (see
    :func:`evaluate_policy`); a failed episode whose every action was optimal counts under ``none``."""
    from digiq.envs.sim import first_mistake

    per_task: dict[str, dict] = {}
    screens: dict[str, int] = {}
    for e in episodes:
        if e.success:
            continue
        m = first_mistake(phone, e.transitions)
        screen = m["screen"] if m else "none"
        screens[screen] = screens.get(screen, 0) + 1
        if m is not None and e.instance.task_id not in per_task:
            per_task[e.instance.task_id] = m
    return {
        "first_mistakes": dict(sorted(per_task.items())),
        "first_mistake_screens": dict(sorted(screens.items(), key=lambda kv: (-kv[1], kv[0]))),
    }
