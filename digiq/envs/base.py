"""One environment interface for collection, evaluation and candidate sampling.

An environment is one device (a simulated phone, one headless browser): ``reset(instance)`` starts a task
instance and returns the first :class:`Observation`; ``step(action)`` applies one AitW
:class:`~digiq.actions.Action` and returns a :class:`StepResult`. Rewards are 0/1: 1 on the step that
completes the task, which also ends the episode. ``Observation.info`` carries what only scripted policies may
read (the simulator's state key, a page's DOM); learnt policies see the screenshot and the goal.

Adding a device (an Android emulator, say) is one module with a class that has these four methods plus
``task_instances``, and one :func:`digiq.envs.registry.register_env` call that names its settings, scripted
policies and capabilities (docs/environments.md).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

from PIL import Image

from digiq.actions import Action
from digiq.errors import DigiqError


class EnvCrashed(DigiqError):
    """The device died mid-episode (a browser, an emulator): the episode is lost, ``reset`` starts a fresh
    device. Episode runners restart the episode; any other exception is a bug and propagates."""


@dataclasses.dataclass(frozen=True)
class TaskInstance:
    """What ``reset`` starts: a task (catalogue id or MiniWoB++ task name) and, where the task is randomised,
    the seed of its instance (MiniWoB++ draws the goal, the page and the answer from it)."""

    task_id: str
    seed: int = 0


@dataclasses.dataclass
class Observation:
    screenshot: Image.Image
    goal: str
    # Privileged, environment-specific facts for scripted policies (never shown to a learnt policy).
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    # The screenshot's PNG bytes when the environment has them already (saves an encode per stored row).
    png: bytes | None = None


@dataclasses.dataclass
class StepResult:
    observation: Observation
    reward: float
    done: bool
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


class Env(Protocol):
    """A device behind the AitW action space."""

    name: str

    def task_instances(self, split: str, num: int, seed: int) -> list[TaskInstance]:
        """``num`` instances of ``split`` in a seeded order; train and test never share an instance."""

    def reset(self, instance: TaskInstance) -> Observation: ...

    def step(self, action: Action) -> StepResult: ...

    def close(self) -> None: ...
