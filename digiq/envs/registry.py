"""Environments by name: what collection, evaluation and candidate sampling need of each device.

The stages never name an environment: they look ``cfg.env`` up here and use the spec's factories, and ask
its capabilities (exact Q*, an offline candidate sampler, ...) instead of comparing names. A device is one
module that builds an :class:`EnvSpec` and calls :func:`register_env`; a built-in one is also listed in
:data:`BUILTIN_MODULES` so that it registers on first use (docs/environments.md; the toy environment of
tests/test_env_registry.py is a complete example). Registration imports only the environment's own module:
MiniWoB++'s browser stack (selenium, the ``miniwob`` package) loads when a browser starts.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Sequence
from typing import Any

from digiq.config import ConfigError, from_dict
from digiq.envs.base import Env, TaskInstance
from digiq.envs.rollout import PolicyFn
from digiq.errors import DigiqError

# A candidate sampler: (batch, n) -> n actions per state (the dataset action is prepended by the caller).
CandidateFn = Callable[[list[dict], int], list[list[Any]]]
# A collection plan: the episodes' instances in order, the behaviour policy and the candidate sampler.
Plan = tuple[list[TaskInstance], PolicyFn, CandidateFn | None]

# The built-in environments and the modules that register them when they are first asked for.
BUILTIN_MODULES = {"sim": "digiq.envs.sim", "miniwob": "digiq.envs.miniwob"}
# The stages' default environment, and the one that wrote datasets that do not say (see env_for_dataset).
DEFAULT_ENV = "sim"
# The scripted policies every environment offers by name (``digiq evaluate policy=...``).
BUILTINS = ("behaviour", "optimal", "random")


class UnknownEnvError(ConfigError, DigiqError):
    """An environment name that nothing registered (a config error, and a user-facing one)."""


def _identity(config: Any) -> Any:
    return config


@dataclasses.dataclass(frozen=True)
class EnvSpec:
    """One environment: its settings, its factories and what else it can do.

    ``world`` is what one run shares between its devices, opened once from the settings (the simulator's
    ``SimPhone`` and its caches; by default the settings themselves). Required callables:

    * ``make(world, num)`` -> ``num`` devices (:class:`~digiq.envs.base.Env`);
    * ``plan(world, behaviour, split, num, seed)`` -> :data:`Plan`: ``digiq collect``'s instances, scripted
      behaviour policy (the demonstrator: it may read ``Observation.info``) and candidate sampler (or None);
    * ``scripted_policy(world, behaviour, name, seed)`` -> the :data:`BUILTINS` policy ``name``.

    Optional capabilities (None = the environment has none; the stages say so by the environment's name):

    * ``candidates(world, behaviour, actions, state_keys, n, seed)`` -> ``[action, n-1 samples]`` per row,
      offline from the rows' ``state_key`` (``digiq candidates source=<env>``);
    * ``q_star(world)`` -> ``fn(state_key, actions, gamma)``: exact Q* (oracle scorer, report rows,
      train-critic's Q* validation metrics);
    * ``screen(world)`` -> ``fn(state_key)``: the kind of screen a state shows (train-critic's Q* agreement
      per screen; raises ValueError or DigiqError on a key that is not the environment's);
    * ``behaviour_values(world, gamma, samples, seed)`` -> an object with ``q(key, actions)`` and ``v(key)``
      of the scripted behaviour policy (extract-policy ``scorer=q_beta``);
    * ``trace(world, episodes)`` -> where recorded failed episodes first went wrong (``evaluate trace=true``).
    """

    name: str
    # The environment's settings (a dataclass with an optional validate()) and its scripted behaviour
    # policy's (None: none, or part of config_cls).
    config_cls: type
    make: Callable[[Any, int], list[Env]]
    plan: Callable[[Any, Any, str, int, int], Plan]
    scripted_policy: Callable[[Any, Any, str, int], PolicyFn]
    behaviour_cls: type | None = None
    # The stage-config fields that hold the settings ("sim"/"behaviour", "miniwob"/"miniwob_behaviour");
    # "" = the stage config's generic ``env_config`` mapping (a new environment needs no stage field).
    section: str = ""
    behaviour_section: str = ""
    world: Callable[[Any], Any] = _identity
    # True: cheap in-process devices, stepped in lock-step blocks and collected in one go. False: real
    # devices (browsers, emulators) on worker threads, each taking its next episode as soon as one ends;
    # their collection is written in shards and resumable.
    lockstep: bool = True
    # True: every evaluation episode is a fresh instance (MiniWoB++: its own page seed), so episodes are
    # independent outcomes and a success rate's interval is over episodes. False (the simulator): a goal's
    # repeated episodes are one outcome, and intervals cluster over goals.
    fresh_episodes: bool = False
    # Settings that do not change what is collected (scratch paths): a resumed collection may change them.
    volatile: tuple[str, ...] = ()
    # Extra checks of the settings before any work (MiniWoB++: every task has a scripted policy).
    check: Callable[[Any, Any], None] | None = None
    candidates: Callable[..., list[list[str]]] | None = None
    q_star: Callable[[Any], Callable[[str, Sequence[Any], float], Sequence[float]]] | None = None
    screen: Callable[[Any], Callable[[str], str]] | None = None
    behaviour_values: Callable[[Any, float, int, int], Any] | None = None
    trace: Callable[[Any, Sequence[Any]], dict[str, Any]] | None = None

    def settings(self, stage_cfg: Any) -> tuple[Any, Any]:
        """This environment's (config, behaviour config) from a stage config: its own sections where the
        stage config has them, else its generic ``env_config`` mapping checked against ``config_cls``."""
        if self.section and hasattr(stage_cfg, self.section):
            config = getattr(stage_cfg, self.section)
        else:
            config = from_dict(
                self.config_cls, dict(getattr(stage_cfg, "env_config", None) or {}), "env_config"
            )
        behaviour = None
        if self.behaviour_cls is not None:
            behaviour = getattr(stage_cfg, self.behaviour_section, None) if self.behaviour_section else None
            behaviour = behaviour if behaviour is not None else self.behaviour_cls()
        return config, behaviour

    def validate(self, config: Any, behaviour: Any) -> None:
        for part in (config, behaviour):
            if hasattr(part, "validate"):
                part.validate()
        if self.check is not None:
            self.check(config, behaviour)

    def open(self, config: Any = None) -> Any:
        """The run's shared world from the settings (the defaults when None)."""
        return self.world(config if config is not None else self.config_cls())

    def require(self, capability: str, purpose: str) -> Callable[..., Any]:
        """A capability, or an error naming the environment and the registered ones that have it."""
        fn = getattr(self, capability)
        if fn is None:
            having = [n for n in registered() if getattr(_REGISTRY[n], capability) is not None]
            raise DigiqError(
                f"{purpose} needs an environment with {capability.replace('_', ' ')}; env={self.name!r} has "
                f"none (environments that have it: {', '.join(having) or 'none'})"
            )
        return fn


_REGISTRY: dict[str, EnvSpec] = {}
_loaded = False


def register_env(spec: EnvSpec, *, replace: bool = False) -> EnvSpec:
    """Make ``spec`` available as ``env=<spec.name>`` to every stage; a second spec of a name is an error
    unless ``replace``."""
    if not spec.name or not isinstance(spec.name, str):
        raise DigiqError(f"an environment needs a name, got {spec.name!r}")
    if spec.name in _REGISTRY and not replace and _REGISTRY[spec.name] is not spec:
        raise DigiqError(f"environment {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def unregister_env(name: str) -> None:
    """Forget an environment (tests register toys and clean up after themselves)."""
    _REGISTRY.pop(name, None)


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in BUILTIN_MODULES.values():
            importlib.import_module(module)


def registered() -> list[str]:
    """The registered environment names, built-ins first (in their listed order, whatever imported first)."""
    _load_builtins()
    return sorted(
        _REGISTRY, key=lambda n: list(BUILTIN_MODULES).index(n) if n in BUILTIN_MODULES else len(_REGISTRY)
    )


def get_env(name: str) -> EnvSpec:
    """The spec registered as ``name``; an unknown name is an error listing the registered ones."""
    names = registered()
    if name not in _REGISTRY:
        raise UnknownEnvError(f"unknown environment {name!r}; choose one of {', '.join(names)}")
    return _REGISTRY[name]


def episode_unit(name: str) -> str:
    """The outcome unit of success intervals on environment ``name``: 'page' where every evaluation episode
    is a fresh instance (``fresh_episodes``: independent outcomes), else 'goal'."""
    return "page" if get_env(name).fresh_episodes else "goal"


def config_class(name: str, behaviour: bool = False) -> type:
    """The settings class of environment ``name`` (``behaviour``: its behaviour policy's), to type a stage
    config's section."""
    spec = get_env(name)
    cls = spec.behaviour_cls if behaviour else spec.config_cls
    if cls is None:
        raise DigiqError(f"environment {name!r} has no behaviour settings of its own")
    return cls


def validate_env(stage_cfg: Any) -> EnvSpec:
    """Check a stage config's ``env`` against the registry and the environments' settings it holds: every
    section it has, and the chosen environment's own checks. Returns the chosen spec."""
    spec = get_env(stage_cfg.env)
    for name in registered():
        other = _REGISTRY[name]
        for field in (other.section, other.behaviour_section) if other is not spec else ():
            part = getattr(stage_cfg, field, None) if field else None
            if hasattr(part, "validate"):
                part.validate()
    spec.validate(*spec.settings(stage_cfg))
    return spec


def env_for_dataset(source: Any) -> EnvSpec:
    """The environment that wrote a dataset (its ``digiq_dataset.json`` ``source``); datasets of another
    origin (imported, or without a source) are read as the simulator's, the default of ``digiq collect``."""
    return get_env(source if isinstance(source, str) and source in registered() else DEFAULT_ENV)
