"""The environment registry: a toy GUI registered here, and nowhere else, runs `digiq collect`, `digiq
candidates` and `digiq evaluate` through it; unknown names and capabilities are named; MiniWoB++ registers
without loading its browser stack.

The toy is a complete example of adding an environment (docs/environments.md): pages 0..length drawn with
PIL, a Back button on the top half and a Next button on the bottom half; the goal names a page, and the
episode succeeds when STATUS_TASK_COMPLETE is pressed on it.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from digiq.actions import Action, ActionType, parse_action
from digiq.cli import main
from digiq.config import ConfigError, check
from digiq.data.schema import dataset_info, load_dataset
from digiq.envs.base import Observation, StepResult, TaskInstance
from digiq.envs.registry import EnvSpec, get_env, register_env, registered, unregister_env
from digiq.errors import DigiqError

ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------------------
# The toy environment: one module's worth of code
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ToyConfig:
    # Pages 0..length; task k of a split asks for page 1 + k % length.
    length: int = 3
    # The scripted behaviour policy's chance of the optimal action (else a uniformly random one of the three).
    p_optimal: float = 0.7
    # The candidates' chance of the optimal action.
    p_optimal_candidates: float = 0.5

    def validate(self) -> None:
        check(self.length >= 1, f"env_config.length must be >= 1, got {self.length}")
        check(0 <= self.p_optimal <= 1, f"env_config.p_optimal must be in [0, 1], got {self.p_optimal}")


NEXT, BACK, DONE = Action.tap(0.75, 0.5), Action.tap(0.25, 0.5), Action.key(ActionType.STATUS_TASK_COMPLETE)
MOVES = (NEXT, BACK, DONE)
TASKS = {"train": ["toy/train/0", "toy/train/1", "toy/train/2"], "test": ["toy/test/0", "toy/test/1"]}


def target(task_id: str, length: int) -> int:
    return 1 + int(task_id.rsplit("/", 1)[1]) % length


def optimal(page: int, goal: int) -> Action:
    return NEXT if page < goal else BACK if page > goal else DONE


class ToyEnv:
    name = "toy"

    def __init__(self, config: ToyConfig) -> None:
        self.config = config
        self.task = ""
        self.page = self.steps = 0

    def task_instances(self, split: str, num: int, seed: int) -> list[TaskInstance]:
        order = np.random.default_rng(seed).permutation(len(TASKS[split]))
        return [TaskInstance(TASKS[split][int(order[i % len(order)])]) for i in range(num)]

    def _obs(self) -> Observation:
        img = Image.new("RGB", (64, 96), (40 * self.page % 256, 90, 160))
        draw = ImageDraw.Draw(img)
        draw.rectangle((4, 4, 60, 44), fill=(200, 60, 60))  # Back
        draw.rectangle((4, 52, 60, 92), fill=(60, 200, 60))  # Next
        draw.text((26, 40), str(self.page), fill=(255, 255, 255))
        goal = f"Go to page {target(self.task, self.config.length)} and press done"
        return Observation(img, goal, {"state_key": f"{self.task}|{self.page}", "page": self.page})

    def reset(self, instance: TaskInstance) -> Observation:
        self.task, self.page, self.steps = instance.task_id, 0, 0
        return self._obs()

    def step(self, action: Action) -> StepResult:
        self.steps += 1
        if action.type is ActionType.STATUS_TASK_COMPLETE:
            return StepResult(self._obs(), float(self.page == target(self.task, self.config.length)), True)
        if action.is_tap:
            self.page = (
                min(self.page + 1, self.config.length) if action.touch[0] > 0.5 else max(self.page - 1, 0)
            )
        return StepResult(self._obs(), 0.0, self.steps >= 2 * self.config.length + 2)

    def close(self) -> None:
        pass


def _draw(rng: np.random.Generator, key: str, p: float, length: int) -> Action:
    task, page = key.split("|")
    return optimal(int(page), target(task, length)) if rng.random() < p else MOVES[int(rng.integers(3))]


def _stream(store: dict, b: dict, key: list[int]) -> np.random.Generator:
    if b["step"] == 0:
        store[b["episode"]] = np.random.default_rng([*key, b["episode"]])
    return store[b["episode"]]


def toy_plan(config: ToyConfig, behaviour, split: str, num: int, seed: int):
    acts: dict = {}
    cands: dict = {}
    instances = ToyEnv(config).task_instances(split, num, seed)
    return (
        instances,
        lambda batch: [
            _draw(_stream(acts, b, [seed, 1]), b["state_key"], config.p_optimal, config.length) for b in batch
        ],
        lambda batch, n: [
            [
                _draw(
                    _stream(cands, b, [seed, 2]), b["state_key"], config.p_optimal_candidates, config.length
                )
                for _ in range(n)
            ]
            for b in batch
        ],
    )


def toy_policy(config: ToyConfig, behaviour, name: str, seed: int):
    p = {"behaviour": config.p_optimal, "optimal": 1.0, "random": 0.0}[name]
    rngs: dict = {}
    return lambda batch: [_draw(_stream(rngs, b, [seed, 1]), b["state_key"], p, config.length) for b in batch]


def toy_candidates(config: ToyConfig, behaviour, actions, state_keys, n: int, seed: int) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    return [
        [a, *(_draw(rng, k, config.p_optimal_candidates, config.length).render() for _ in range(n - 1))]
        for a, k in zip(actions, state_keys)
    ]


def toy_spec(name: str, lockstep: bool) -> EnvSpec:
    return EnvSpec(
        name=name,
        config_cls=ToyConfig,
        make=lambda config, num: [ToyEnv(config) for _ in range(num)],
        plan=toy_plan,
        scripted_policy=toy_policy,
        lockstep=lockstep,
        candidates=toy_candidates,
    )


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def toy():
    """``toy`` (lock-step: collected in memory) and ``toy-live`` (worker threads, sharded collection)."""
    specs = [register_env(toy_spec("toy", True)), register_env(toy_spec("toy-live", False))]
    yield specs
    for s in specs:
        unregister_env(s.name)


def digiq(*argv: str) -> None:
    assert main(list(argv)) == 0, argv


def replay(ds, length: int) -> list[tuple[int, bool]]:
    """(steps, success) per trajectory, by stepping a fresh toy with the stored actions: the rewards, ends and
    next states the dataset says must be the toy's own."""
    out = []
    for t in sorted(set(ds["traj_id"])):
        rows = [r for r in ds.remove_columns(["screenshot", "next_screenshot"]) if r["traj_id"] == t]
        task = rows[0]["state_key"].split("|")[0]
        env = ToyEnv(ToyConfig(length=length))
        env.reset(TaskInstance(task))
        for i, r in enumerate(rows):
            assert r["step_id"] == i and r["state_key"] == f"{task}|{env.page}"
            res = env.step(parse_action(r["action"]))
            assert (r["reward"], r["done"]) == (res.reward, res.done), (t, i)
        assert rows[-1]["done"]
        out.append((len(rows), rows[-1]["reward"] == 1.0))
    return out


def test_a_registered_toy_collects_samples_candidates_and_evaluates(toy, tmp_path: Path) -> None:
    cfg = ["env_config.length=4", "env_config.p_optimal=0.6", "seed=3"]
    digiq(
        "collect", "env=toy", f"output_dir={tmp_path / 'c'}", "num_trajectories=8", "num_candidates=3", *cfg
    )
    ds = load_dataset(tmp_path / "c")
    info = dataset_info(tmp_path / "c")
    episodes = replay(ds, 4)
    assert len(episodes) == 8 and len(ds) == sum(n for n, _ in episodes)
    assert info["source"] == "toy" and info["env_config"]["length"] == 4
    assert info["success_rate"] == pytest.approx(np.mean([s for _, s in episodes]))
    assert 0 < info["success_rate"] < 1  # a noisy demonstrator: some of both
    # Live candidates: the dataset action first, then two of the toy's three moves.
    moves = {m.render() for m in MOVES}
    assert all(
        len(c) == 3 and c[0] == a and set(c[1:]) <= moves for a, c in zip(ds["action"], ds["candidates"])
    )

    # The same plan through worker threads and shards: the same rows, written the other way.
    digiq(
        "collect",
        "env=toy-live",
        f"output_dir={tmp_path / 'live'}",
        "num_trajectories=8",
        "num_candidates=3",
        "num_workers=2",
        "shard_size=3",
        *cfg,
    )
    live = load_dataset(tmp_path / "live")
    cols = ["traj_id", "step_id", "task", "action", "reward", "done", "state_key", "candidates"]
    assert live.select_columns(cols).to_dict() == ds.select_columns(cols).to_dict()

    # Offline candidates from the rows' state keys: with p_optimal_candidates=1 each is the optimal move of
    # the row's page for its goal.
    digiq(
        "candidates",
        f"dataset={tmp_path / 'c'}",
        f"output_dir={tmp_path / 'k'}",
        "source=toy",
        "num_candidates=4",
        "env_config.length=4",
        "env_config.p_optimal_candidates=1.0",
    )
    k = load_dataset(tmp_path / "k")
    assert len(k) == len(ds)
    for a, key, c in zip(k["action"], k["state_key"], k["candidates"]):
        task, page = key.split("|")
        assert len(c) == 4 and c[0] == a and c[1:] == [optimal(int(page), target(task, 4)).render()] * 3

    # Evaluation: the optimal policy succeeds on every test goal, in (goal page + 1) steps.
    digiq("evaluate", "env=toy", "policy=optimal", "num_episodes=6", f"output_dir={tmp_path / 'e'}", *cfg)
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    instances = ToyEnv(ToyConfig(length=4)).task_instances("test", 6, 3)
    assert m["env"] == "toy" and m["success_rate"] == 1.0 and m["num_episodes"] == 6
    assert m["mean_steps"] == pytest.approx(np.mean([target(i.task_id, 4) + 1 for i in instances]))
    assert m["per_task"] == {
        t: [n, n] for t, n in zip(*np.unique([i.task_id for i in instances], return_counts=True))
    }
    # The random policy (no optimal move on purpose) mostly fails: success is judged by the toy's own goal.
    digiq("evaluate", "env=toy-live", "policy=random", "num_episodes=6", f"output_dir={tmp_path / 'r'}", *cfg)
    r = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert r["env"] == "toy-live" and r["success_rate"] < 1.0 and r["num_episodes"] == 6


@pytest.mark.slow
def test_a_policy_folder_evaluates_on_the_toy(toy, tmp_path: Path) -> None:
    """A pixel policy (the shipped GUI-pretrained tiny model) reads the toy's screenshots and goal."""
    from digiq.models.shipped import GUI_TINY, resolve_model_folder

    model = resolve_model_folder(GUI_TINY)
    digiq(
        "evaluate",
        "env=toy",
        f"policy={model}",
        "num_episodes=2",
        "device=cpu",
        f"output_dir={tmp_path / 'e'}",
    )
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["env"] == "toy" and m["num_episodes"] == 2 and sum(v[1] for v in m["per_task"].values()) == 2


def test_env_names_and_settings_are_checked_against_the_registry(toy) -> None:
    from digiq.stages import candidates, collect, evaluate, pipeline

    assert registered()[:2] == ["sim", "miniwob"] and {"toy", "toy-live"} <= set(registered())
    collect.Config(env="toy").validate()  # a registered toy passes validation
    for cfg in (
        collect.Config(env="android"),
        evaluate.Config(env="android"),
        pipeline.Config(env="android"),
    ):
        with pytest.raises(
            ConfigError, match="unknown environment 'android'; choose one of sim, miniwob, toy"
        ):
            cfg.validate()
    with pytest.raises(ConfigError, match="unknown environment 'android'"):
        candidates.Config(source="android").validate()
    with pytest.raises(DigiqError, match="unknown environment 'android'"):
        get_env("android")
    with pytest.raises(ConfigError, match="unknown config key 'env_config.lenght'"):
        collect.Config(env="toy", env_config={"lenght": 2}).validate()
    with pytest.raises(ConfigError, match="env_config.length must be >= 1"):
        evaluate.Config(env="toy", env_config={"length": 0}).validate()
    # Capabilities, not names: the toy has no exact Q* to trace with, and MiniWoB++ no offline sampler.
    with pytest.raises(ConfigError, match="trace needs an exact Q"):
        evaluate.Config(env="toy", trace=True).validate()
    with pytest.raises(ConfigError, match="no offline candidate sampler"):
        candidates.Config(source="miniwob").validate()
    with pytest.raises(ConfigError, match="resume is for environments collected in shards"):
        collect.Config(env="toy", resume=True).validate()
    collect.Config(env="toy-live", resume=True).validate()
    with pytest.raises(DigiqError, match="already registered"):
        register_env(toy_spec("toy", True))


def test_miniwob_registers_without_its_browser_stack() -> None:
    code = (
        "import sys, digiq, digiq.envs, digiq.stages.collect, digiq.stages.evaluate, digiq.stages.pipeline\n"
        "from digiq.envs.registry import get_env\n"
        "assert get_env('miniwob').lockstep is False\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'selenium', 'miniwob', 'gymnasium'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
