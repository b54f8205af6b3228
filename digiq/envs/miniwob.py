"""MiniWoB++ (Liu et al. 2018; the ``miniwob`` package, Farama) in headless Chromium, behind the
:class:`~digiq.envs.base.Env` interface.

Install: ``pip install -e ".[miniwob]"`` plus Debian's ``chromium chromium-driver`` (``scripts/setup.sh
--miniwob``). Everything runs offline: the task pages ship inside the wheel, and with
``MINIWOB_CHROME_BINARY`` / ``MINIWOB_CHROMEDRIVER`` set (we set them from :class:`MiniWoBConfig`) Selenium
never tries its driver download.

The AitW action space on a page (screenshot pixels: x in [0, width), y in [0, height)):

* tap -> a click at the pixel; swipe -> a scroll (mostly vertical) or a drag (mouse down, move, up);
* TYPE -> the text typed into the focused element (in chunks of 64, MiniWoB's limit); PRESS_ENTER -> Enter;
* PRESS_BACK / PRESS_HOME / INVALID -> a step that does nothing (a page has no back or home button);
* STATUS_TASK_COMPLETE / STATUS_TASK_IMPOSSIBLE -> the episode ends, judged by the task. A MiniWoB task
  ends itself the moment it is solved or failed, so an episode still running is not solved: reward 0.

Rewards are the task's raw +-1 mapped to {1, 0} (``info["raw_reward"]``, not the time-discounted reward), and
the task's 10-second timer is lifted: an episode ends after ``max_steps`` actions instead, so the reward does
not depend on how fast a CPU runs the policy. Before each reset the pointer moves to a corner, or a hover
style from the last click would leak into the next episode's first screenshot.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from digiq.actions import Action, ActionType
from digiq.config import check
from digiq.envs.base import EnvCrashed, Observation, StepResult, TaskInstance
from digiq.errors import DigiqError

# The task list: the click / type / form kinds the scripted behaviour policy covers.
DEFAULT_TASKS = (
    "click-button",
    "click-link",
    "click-tab",
    "click-dialog",
    "click-checkboxes",
    "focus-text",
    "enter-text",
    "login-user",
    "click-option",
    "enter-password",
    "click-button-sequence",
    "navigate-tree",
)
# Each split has its own page-seed range, so no two splits share a page: train (collection), test (reported
# evaluation), val (where defaults are chosen) and demo (the behaviour model's demonstrations). Train and test
# are the ranges of earlier releases, unchanged; val and demo were added above them.
SEED_BLOCK = 1_000_000
TEST_OFFSET = 1_000_000_000
VAL_OFFSET = 2_000_000_000
DEMO_OFFSET = 3_000_000_000
SPLIT_OFFSETS = {"train": 0, "test": TEST_OFFSET, "val": VAL_OFFSET, "demo": DEMO_OFFSET}
# Seeds below this keep every split inside its own range (seed * SEED_BLOCK < TEST_OFFSET).
MAX_SEED = TEST_OFFSET // SEED_BLOCK
TYPE_CHUNK = 64
# Chromium launches read the environment; two launching at once must not swap each other's folders.
_LAUNCH_LOCK = threading.Lock()
_SERIAL = itertools.count()


@dataclasses.dataclass
class MiniWoBConfig:
    # MiniWoB++ task names (``miniwob/<name>-v1``).
    tasks: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_TASKS))
    # An episode ends after this many actions (the task's own 10 s timer is lifted; see the module doc).
    max_steps: int = 10
    # Debian's chromium and its driver; both are needed, or Selenium tries to download a driver.
    chrome_binary: str = "/usr/bin/chromium"
    chromedriver: str = "/usr/bin/chromedriver"
    # Chromium's temp and cache folders, never the user's home or /tmp ("" = <cwd>/.digiq-browser); each browser
    # gets its own subfolder, removed on close. Keep it short: Chromium's socket path limit is 107 bytes.
    scratch_dir: str = ""

    def validate(self, where: str = "miniwob") -> None:
        check(len(self.tasks) > 0, f"{where}.tasks must name at least one task")
        check(self.max_steps > 0, f"{where}.max_steps must be > 0")


def require_miniwob(config: MiniWoBConfig) -> None:
    """A clear error, before any browser starts, for what is missing."""
    missing = [p for p in (config.chrome_binary, config.chromedriver) if not Path(p).exists()]
    if missing:
        raise DigiqError(
            f"MiniWoB++ needs {' and '.join(missing)}: install Debian's chromium and chromium-driver "
            "(`bash scripts/setup.sh --miniwob`), or set miniwob.chrome_binary / miniwob.chromedriver"
        )
    try:
        import miniwob  # noqa: F401
    except ImportError as e:
        raise DigiqError('MiniWoB++ needs the miniwob package: pip install -e ".[miniwob]"') from e
    import gymnasium

    known = {k.split("/", 1)[1].rsplit("-v", 1)[0] for k in gymnasium.registry if k.startswith("miniwob/")}
    unknown = [t for t in config.tasks if t not in known]
    if unknown:
        raise DigiqError(
            f"unknown MiniWoB++ task(s) {unknown}; the package has {len(known)}, e.g. click-button"
        )


def task_instances(tasks: list[str], split: str, num: int, seed: int) -> list[TaskInstance]:
    """``num`` instances cycling through ``tasks`` in a seeded order, each with its own page seed.

    Page seeds are ``seed * SEED_BLOCK + i`` plus the split's offset (``SPLIT_OFFSETS``: train 0, test
    10^9, val 2 * 10^9, demo 3 * 10^9): no two splits share a page, so collection never sees an evaluation
    page and the demonstrations never see a page of the others. The task order depends on ``seed`` only."""
    check(split in SPLIT_OFFSETS, f"split must be one of {', '.join(SPLIT_OFFSETS)}, got {split!r}")
    check(num < SEED_BLOCK, f"at most {SEED_BLOCK - 1} instances per seed")
    check(0 <= seed < MAX_SEED, f"seed must be in [0, {MAX_SEED}) (each split's page range), got {seed}")
    order = np.random.default_rng(seed).permutation(len(tasks))
    base = seed * SEED_BLOCK + SPLIT_OFFSETS[split]
    return [TaskInstance(tasks[int(order[i % len(tasks)])], base + i) for i in range(num)]


class BrowserCrashed(EnvCrashed):
    """The browser or its driver died mid-episode; the episode is lost, the environment can be reset."""


class MiniWoBEnv:
    """One headless Chromium. ``reset`` switches task when asked (a fresh page, ~1-2 s), so callers that can
    order their instances by task (collection does) pay that once per task."""

    name = "miniwob"

    def __init__(self, config: MiniWoBConfig | None = None) -> None:
        self.config = config or MiniWoBConfig()
        self.config.validate()
        require_miniwob(self.config)
        self._gym: Any = None
        self._task: str | None = None
        self._steps = 0
        self._done = True
        self._goal = ""
        root = Path(self.config.scratch_dir or Path.cwd() / ".digiq-browser").absolute()
        self._scratch = root / f"{os.getpid()}-{next(_SERIAL)}"
        # Chromium puts a Unix socket in its temp profile (TMPDIR/org.chromium.Chromium.XXXXXX/SingletonSocket);
        # socket paths are limited to 107 bytes, and past that Chromium exits at launch with no useful message.
        if len(str(self._scratch / "t")) + 48 > 107:
            raise DigiqError(
                f"miniwob.scratch_dir {root} is too deep for Chromium's socket path limit (107 bytes): "
                "choose a shorter folder"
            )

    def task_instances(self, split: str, num: int, seed: int) -> list[TaskInstance]:
        return task_instances(self.config.tasks, split, num, seed)

    # -- browser life cycle ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _launch_environment(self) -> Iterator[None]:
        keys = (
            "MINIWOB_CHROME_BINARY",
            "MINIWOB_CHROMEDRIVER",
            "TMPDIR",
            "XDG_CACHE_HOME",
            "XDG_CONFIG_HOME",
        )
        values = (
            self.config.chrome_binary,
            self.config.chromedriver,
            str(self._scratch / "t"),
            str(self._scratch / "c"),
            str(self._scratch / "g"),
        )
        for v in values[2:]:
            Path(v).mkdir(parents=True, exist_ok=True)
        with _LAUNCH_LOCK:
            old = {k: os.environ.get(k) for k in keys}
            os.environ.update(dict(zip(keys, values)))
            try:
                yield
            finally:
                for k, v in old.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v

    def _open(self, task: str) -> None:
        import gymnasium
        import miniwob  # noqa: F401  (registers the miniwob/* ids)

        self._close_browser()
        with self._launch_environment():
            try:
                self._gym = gymnasium.make(f"miniwob/{task}-v1", render_mode=None)
                self._gym.reset(seed=0)  # the driver starts on the first reset (a throwaway episode)
            except Exception as e:
                self._close_browser()
                raise BrowserCrashed(f"could not start Chromium for {task}: {e}") from e
        self._task = task

    def _switch(self, task: str) -> None:
        """Load another task's page in the running browser (~0.1 s; a new browser costs 1-2 s of CPU, and with
        several workers sharing two cores that cost decided the throughput). Pinned to miniwob 1.1.0's
        SeleniumInstance (its ``url``, ``field_extractor`` and ``instance_kwargs``); the flight tasks, served over HTTP, and any
        failure fall back to a fresh browser."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as EC
        from selenium.webdriver.support.ui import WebDriverWait

        inst = self._gym.unwrapped.instance
        if task.startswith("flight.") or not inst.url.startswith("file://") or not inst.url.endswith(".html"):
            self._open(task)
            return
        url = inst.url.rsplit("/", 1)[0] + f"/{task}.html"

        def load(driver: Any) -> None:
            driver.get(url)
            WebDriverWait(driver, 5).until(EC.element_to_be_clickable((By.ID, inst.SYNC_SCREEN_ID)))

        try:
            self._run(load)
        except Exception:  # noqa: BLE001  (a fresh browser is the safe answer to anything here)
            self._open(task)
            return
        from miniwob.fields import get_field_extractor

        inst.url = url
        inst.field_extractor = get_field_extractor(task)  # the goal parser is per task
        self._gym.unwrapped.instance_kwargs["subdomain"] = task  # what a hard reset would reopen
        self._gym.unwrapped.subdomain = task
        self._task = task
        # The first episode after a page load draws 2 pixels differently (the right edge): one throwaway
        # episode, as a fresh browser's first reset is, keeps "same seed, same screenshot" true.
        self._gym.reset(seed=0)

    def _run(self, fn: Any) -> Any:
        """Run ``fn(driver)`` on the instance's own thread (Selenium drivers are not thread-safe)."""
        inst = self._gym.unwrapped.instance
        box: list[Any] = [None, None]

        def call() -> None:
            # The instance thread logs and swallows exceptions (and marks itself dead): carry them back here.
            try:
                box[0] = fn(inst.driver)
            except Exception as e:  # noqa: BLE001
                box[1] = e

        inst.call(call)
        inst.wait()
        if box[1] is not None:
            raise box[1]
        return box[0]

    def _close_browser(self) -> None:
        if self._gym is not None:
            with contextlib.suppress(Exception):
                self._gym.close()
        self._gym, self._task, self._done = None, None, True

    def close(self) -> None:
        self._close_browser()
        shutil.rmtree(self._scratch, ignore_errors=True)

    # -- episodes ----------------------------------------------------------------------------------
    def _observation(self, obs: dict) -> Observation:
        shot = Image.fromarray(np.asarray(obs["screenshot"], dtype=np.uint8))
        dom = [
            {
                k: (float(np.asarray(v).reshape(-1)[0]) if k in ("left", "top", "width", "height") else v)
                for k, v in e.items()
            }
            for e in obs["dom_elements"]
        ]
        info = {
            "task": self._task,
            "utterance": obs["utterance"],
            "fields": tuple(tuple(f) for f in obs["fields"]),
            "dom_elements": dom,
            "screen_size": shot.size,
            "step": self._steps,
        }
        return Observation(screenshot=shot, goal=obs["utterance"], info=info)

    def reset(self, instance: TaskInstance) -> Observation:
        from miniwob.selenium_actions import execute_move_coords

        try:
            if self._gym is None:
                self._open(instance.task_id)
            elif self._task != instance.task_id:
                self._switch(instance.task_id)
            self._run(
                lambda d: (execute_move_coords(1, 1, d), d.execute_script("core.EPISODE_MAX_TIME = 3600000;"))
            )
            obs, _ = self._gym.reset(seed=int(instance.seed))
        except BrowserCrashed:
            raise
        except Exception as e:  # a dead driver raises Selenium's or urllib3's errors
            self._close_browser()
            raise BrowserCrashed(f"{instance.task_id} seed {instance.seed}: {type(e).__name__}: {e}") from e
        self._steps, self._done = 0, False
        self._last = self._observation(obs)
        self._goal = self._last.goal
        return self._last

    def _miniwob_actions(self, action: Action, width: int, height: int) -> list[Any]:
        from miniwob.action import ActionTypes

        make = self._gym.unwrapped.create_action

        def px(p: tuple[float, float]) -> np.ndarray:
            y, x = p
            return np.float32([min(max(x, 0.0), 1.0) * (width - 1), min(max(y, 0.0), 1.0) * (height - 1)])

        if action.type is ActionType.DUAL_POINT and action.touch is not None and action.lift is not None:
            if action.is_tap:
                return [make(ActionTypes.CLICK_COORDS, coords=px(action.touch))]
            dy, dx = action.lift[0] - action.touch[0], action.lift[1] - action.touch[1]
            if abs(dy) >= abs(dx):  # finger up = content scrolls down, as on a phone
                kind = ActionTypes.SCROLL_DOWN_COORDS if dy < 0 else ActionTypes.SCROLL_UP_COORDS
                return [make(kind, coords=px(action.touch))]
            return [
                make(ActionTypes.MOUSEDOWN_COORDS, coords=px(action.touch)),
                make(ActionTypes.MOVE_COORDS, coords=px(action.lift)),
                make(ActionTypes.MOUSEUP_COORDS, coords=px(action.lift)),
            ]
        if action.type is ActionType.TYPE and action.text:
            text = action.text
            return [
                make(ActionTypes.TYPE_TEXT, text=text[i : i + TYPE_CHUNK])
                for i in range(0, len(text), TYPE_CHUNK)
            ]
        if action.type is ActionType.PRESS_ENTER:
            return [make(ActionTypes.PRESS_KEY, key="<Enter>")]
        return [make(ActionTypes.NONE)]

    def step(self, action: Action) -> StepResult:
        if self._gym is None or self._done:
            raise DigiqError("MiniWoBEnv.step before reset (or after the episode ended)")
        self._steps += 1
        if action.type in (ActionType.STATUS_TASK_COMPLETE, ActionType.STATUS_TASK_IMPOSSIBLE):
            # Judged by the task: had it been solved, the task would have ended the episode already.
            self._done = True
            return StepResult(self._last, 0.0, True, {"reason": action.type.value})
        width, height = self._last.screenshot.size
        try:
            for a in self._miniwob_actions(action, width, height):
                obs, _, terminated, _, info = self._gym.step(a)
                if terminated:
                    break
        except Exception as e:
            self._close_browser()
            raise BrowserCrashed(f"{self._task} step {self._steps}: {type(e).__name__}: {e}") from e
        if terminated:
            self._done = True
            reward = 1.0 if float(info.get("raw_reward", 0.0)) > 0 else 0.0
            # MiniWoB blanks the page when a task ends; the last screen is the best stand-in for s_{t+1}.
            return StepResult(self._last, reward, True, {"reason": info.get("reason")})
        self._last = self._observation(obs)
        self._done = self._steps >= self.config.max_steps
        return StepResult(self._last, 0.0, self._done, {"reason": "max_steps" if self._done else None})


# --------------------------------------------------------------------------------------------------
# Registration (env=miniwob): the browser stack loads when the first browser starts, not here.
# --------------------------------------------------------------------------------------------------


def _make(config: MiniWoBConfig, num: int) -> list[MiniWoBEnv]:
    envs: list[MiniWoBEnv] = []
    try:
        for _ in range(num):
            envs.append(MiniWoBEnv(config))
    except BaseException:
        for e in envs:
            e.close()
        raise
    return envs


def _episode_stream(store: dict, b: dict, key: list[int]) -> np.random.Generator:
    """The random stream of ``b``'s episode (``[*key, episode]``), restarted with the episode: worker
    scheduling and browser restarts do not change what a policy does."""
    if b["step"] == 0 or b["episode"] not in store:
        store[b["episode"]] = np.random.default_rng([*key, b["episode"]])
    return store[b["episode"]]


def collect_plan(config: MiniWoBConfig, behaviour: Any, split: str, num: int, seed: int) -> Any:
    """Per-episode random streams (actions: ``[seed, 1, episode]``, candidates: ``[seed, 2, episode]``), so an
    episode does the same whichever worker runs it, whenever, and after a browser restart."""
    from digiq.envs.miniwob_policy import MiniWoBBehaviour

    pi = MiniWoBBehaviour(behaviour)
    act_rngs: dict[int, np.random.Generator] = {}
    cand_rngs: dict[int, np.random.Generator] = {}
    return (
        task_instances(config.tasks, split, num, seed),
        lambda batch: [pi.act(b["info"], _episode_stream(act_rngs, b, [seed, 1])) for b in batch],
        lambda batch, n: [
            pi.sample_candidates(b["info"], n, _episode_stream(cand_rngs, b, [seed, 2])) for b in batch
        ],
    )


def scripted_policy(config: MiniWoBConfig, behaviour: Any, name: str, seed: int) -> Any:
    """``behaviour`` (the collection policy), ``optimal`` (the DOM expert) or ``random`` (its mistakes
    only)."""
    from digiq.envs.miniwob_policy import MiniWoBBehaviour

    pi = MiniWoBBehaviour(behaviour)
    p = {"behaviour": None, "optimal": 1.0, "random": 0.0}[name]
    rngs: dict[int, np.random.Generator] = {}
    return lambda batch: [pi.act(b["info"], _episode_stream(rngs, b, [seed, 1]), p_optimal=p) for b in batch]


def _register() -> None:
    from digiq.envs.miniwob_policy import MiniWoBBehaviourConfig
    from digiq.envs.registry import EnvSpec, register_env

    register_env(
        EnvSpec(
            name="miniwob",
            config_cls=MiniWoBConfig,
            behaviour_cls=MiniWoBBehaviourConfig,
            section="miniwob",
            behaviour_section="miniwob_behaviour",
            make=_make,
            plan=collect_plan,
            scripted_policy=scripted_policy,
            lockstep=False,
            fresh_episodes=True,  # task_instances: one page seed per episode
            volatile=("scratch_dir",),
            check=lambda config, behaviour: behaviour.check_tasks(config.tasks),
        )
    )


_register()
