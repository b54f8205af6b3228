"""Episodes on any :class:`~digiq.envs.base.Env`, several environment workers in lock-step.

Every round, each worker with an episode in progress contributes its screen to one batch, the policy acts on
the batch, and the workers step (on threads when the environments are browsers: each Chromium runs in its own
processes, so two workers use two cores). A policy is a function of the batch; the environment never imports
a model. Each item the policy sees has:

* ``screenshot`` (PIL), ``observation`` (the AutoUI prompt: goal + previous action), ``task`` (the goal);
* ``info``: the environment's privileged facts (``state_key`` on the simulator, the DOM on MiniWoB++), which
  only scripted policies read; ``state_key`` is repeated at the top level (``""`` where there is none);
* ``episode`` / ``step``: the episode's index in the instance list and its step, so a stochastic scripted
  policy can keep one random stream per episode (results then do not depend on worker scheduling).

A device that dies (:class:`~digiq.envs.base.EnvCrashed`, e.g. a browser's ``BrowserCrashed``) loses only the
episode it was running: the episode is started again from its first step on a fresh device, so a finished
episode is never partial.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from digiq.actions import Action, make_observation, parse_action
from digiq.envs.base import Env, EnvCrashed, Observation, StepResult, TaskInstance
from digiq.errors import DigiqError
from digiq.utils.logging import get_logger

log = get_logger(__name__)

PolicyFn = Callable[[list[dict]], list[Any]]
# (batch, n) -> n candidate actions per item (index 0 is NOT included: the caller prepends the taken action).
CandidateFn = Callable[[list[dict], int], list[list[Any]]]


@dataclasses.dataclass
class Transition:
    observation: Observation
    prompt: str
    action: Action
    text: str
    reward: float
    done: bool
    next_observation: Observation
    candidates: list[str]


@dataclasses.dataclass
class Episode:
    index: int
    instance: TaskInstance
    success: bool
    steps: int
    # Filled when ``record=True``.
    transitions: list[Transition] = dataclasses.field(default_factory=list)


def _as_action(x: Any) -> tuple[Action, str]:
    if isinstance(x, Action):
        return x, x.render()
    return parse_action(x), x


@dataclasses.dataclass
class _Slot:
    episode: int = -1
    attempt: int = 0
    obs: Observation | None = None
    prev: Action | None = None
    steps: int = 0
    transitions: list[Transition] = dataclasses.field(default_factory=list)


def run_episodes(
    envs: Sequence[Env],
    instances: Sequence[TaskInstance],
    policy: PolicyFn,
    *,
    candidates: CandidateFn | None = None,
    num_candidates: int = 0,
    record: bool = False,
    skip: set[int] | frozenset[int] = frozenset(),
    on_episode: Callable[[Episode], None] | None = None,
    refill: bool = True,
    threads: bool = False,
    group_by_task: bool = False,
    max_restarts: int = 3,
    progress: Any = None,
) -> list[Episode]:
    """Run every instance not in ``skip`` to its end and return the episodes in instance order.

    ``refill=False`` starts the next block of ``len(envs)`` episodes only when the whole block has ended (the
    simulator's historical batching, kept so that its evaluations reproduce bit for bit); ``True`` gives a
    worker its next episode as soon as one ends. ``on_episode`` is called on the main thread as each episode
    ends (collection writes shards from it). ``progress`` is a tqdm bar updated per episode.
    ``group_by_task`` hands out the episodes task by task (a browser switches page once per task, not per
    episode); what each episode does does not depend on the order.
    """
    if not envs:
        raise DigiqError("run_episodes needs at least one environment")
    if num_candidates > 0 and candidates is None:
        raise DigiqError("num_candidates > 0 needs a candidate sampler")
    todo = [i for i in range(len(instances)) if i not in skip]
    if group_by_task:
        todo.sort(key=lambda i: (instances[i].task_id, i))
    # One queue per worker. Grouped by task, each worker gets a contiguous run of the task-sorted episodes
    # and takes from another's tail only when its own run is done: a browser switches page about once per
    # task in all, not once per task per worker.
    if group_by_task and refill and len(envs) > 1:
        cut = [round(k * len(todo) / len(envs)) for k in range(len(envs) + 1)]
        queues = [deque(todo[cut[k] : cut[k + 1]]) for k in range(len(envs))]
    else:
        queues = [deque(todo)]
    shared = len(queues) == 1

    def pending() -> bool:
        return any(queues)

    def take(w: int) -> int | None:
        own = queues[0 if shared else w]
        if own:
            return own.popleft()
        other = max(queues, key=len)
        return other.pop() if other else None

    slots = [_Slot() for _ in envs]
    done: dict[int, Episode] = {}
    restarts: dict[int, int] = {}
    pool = ThreadPoolExecutor(len(envs)) if threads and len(envs) > 1 else None

    def parallel(fn: Callable[[int], Any], ws: list[int]) -> list[Any]:
        """``fn(w)`` for each worker, returning results or the exception each raised."""

        def safe(w: int) -> Any:
            try:
                return fn(w)
            except Exception as e:  # noqa: BLE001  (sorted out by the caller, per worker)
                return e

        return list(pool.map(safe, ws)) if pool is not None else [safe(w) for w in ws]

    def crashed(w: int, err: Exception) -> None:
        if not isinstance(err, EnvCrashed):
            raise err
        i = slots[w].episode
        restarts[i] = restarts.get(i, 0) + 1
        if restarts[i] > max_restarts:
            raise DigiqError(
                f"episode {i} ({instances[i]}): the browser died {restarts[i]} times; last: {err}"
            )
        log.warning("worker %d: %s; episode %d starts again on a fresh browser", w, err, i)
        queues[0 if shared else w].appendleft(i)
        slots[w] = _Slot()

    try:
        while pending() or any(s.episode >= 0 for s in slots):
            idle = [w for w, s in enumerate(slots) if s.episode < 0]
            starting: list[int] = []
            if idle and pending() and (refill or len(idle) == len(slots)):
                for w in idle:
                    i = take(w)
                    if i is None:
                        break
                    slots[w] = _Slot(episode=i)
                    starting.append(w)
            active = [w for w, s in enumerate(slots) if s.episode >= 0 and s.obs is not None]
            batch = []
            for w in active:
                s = slots[w]
                assert s.obs is not None
                batch.append(
                    {
                        "screenshot": s.obs.screenshot,
                        "observation": make_observation(s.obs.goal, s.prev),
                        "task": s.obs.goal,
                        "state_key": s.obs.info.get("state_key", ""),
                        "info": s.obs.info,
                        "episode": s.episode,
                        "step": s.steps,
                    }
                )
            acts: list[tuple[Action, str]] = []
            cands = None
            if batch:
                outs = policy(batch)
                if len(outs) != len(batch):
                    raise DigiqError(f"the policy returned {len(outs)} actions for a batch of {len(batch)}")
                acts = [_as_action(o) for o in outs]
                if num_candidates > 0 and candidates is not None:
                    cands = candidates(batch, num_candidates)
            # Workers starting an episode reset while the others step: one round trip, no reset barrier.
            moves = {w: a for w, (a, _) in zip(active, acts)}

            def job(w: int, moves: dict = moves) -> Any:
                return envs[w].step(moves[w]) if w in moves else envs[w].reset(instances[slots[w].episode])

            results = parallel(job, [*starting, *active])
            for w, got in zip(starting, results[: len(starting)]):
                if isinstance(got, Exception):
                    crashed(w, got)
                else:
                    slots[w].obs = got
            results = results[len(starting) :]
            for k, (w, res) in enumerate(zip(active, results)):
                if isinstance(res, Exception):
                    crashed(w, res)
                    continue
                s = slots[w]
                assert isinstance(res, StepResult) and s.obs is not None
                action, text = acts[k]
                if record:
                    extra = [_as_action(c)[1] for c in cands[k]] if cands is not None else []
                    s.transitions.append(
                        Transition(
                            s.obs,
                            batch[k]["observation"],
                            action,
                            text,
                            float(res.reward),
                            bool(res.done),
                            res.observation,
                            [text, *extra] if cands is not None else [],
                        )
                    )
                s.steps += 1
                s.prev, s.obs = action, res.observation
                if res.done:
                    ep = Episode(s.episode, instances[s.episode], res.reward > 0, s.steps, s.transitions)
                    done[s.episode] = ep
                    slots[w] = _Slot()
                    if on_episode is not None:
                        on_episode(ep)
                    if progress is not None:
                        progress.update(1)
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    return [done[i] for i in sorted(done)]
