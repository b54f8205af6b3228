"""The MiniWoB++ scripted expert and noisy behaviour policy (digiq.envs.miniwob_policy).

The unit tests run on hand-written DOMs (no browser); the ``miniwob`` tests drive real pages in headless
Chromium and skip where Chromium, its driver or the miniwob package is missing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from digiq.actions import Action, ActionType
from digiq.config import ConfigError
from digiq.envs.miniwob_policy import (
    TUNED_P_OPTIMAL,
    MiniWoBBehaviour,
    MiniWoBBehaviourConfig,
    expert_action,
    guess_kind,
)

W, H = 160, 210


def el(ref: int, parent: int, tag: str, box: tuple[float, float, float, float], **kw: Any) -> dict[str, Any]:
    """A DOM element as the adapter reports it (box = left, top, width, height in screenshot pixels)."""
    left, top, width, height = box
    flags = np.array([kw.pop("focused", 0), kw.pop("tampered", 0), 0, 1], dtype=np.int8)
    e = {"ref": ref, "parent": parent, "tag": tag, "left": left, "top": top, "width": width, "height": height}
    e.update({"text": "", "value": "", "id": "", "classes": "", "flags": flags})
    e.update(kw)
    return e


def page(task: str, utterance: str, fields: tuple, elements: list[dict], step: int = 0) -> dict[str, Any]:
    body = [el(1, 0, "body", (0, 0, W, H)), el(2, 1, "div", (0, 50, W, 150), id="area")]
    return {
        "task": task,
        "utterance": utterance,
        "fields": fields,
        "dom_elements": body + elements,
        "screen_size": (W, H),
        "step": step,
    }


def centre(e: dict) -> Action:
    return Action.tap(
        round((e["top"] + e["height"] / 2) / (H - 1), 4), round((e["left"] + e["width"] / 2) / (W - 1), 4)
    )


def inside(a: Action, e: dict) -> bool:
    assert a.touch is not None
    y, x = a.touch[0] * (H - 1), a.touch[1] * (W - 1)
    return e["left"] <= x <= e["left"] + e["width"] and e["top"] <= y <= e["top"] + e["height"]


# -- pages ---------------------------------------------------------------------------------------------
def click_button_page() -> tuple[dict, list[dict]]:
    bs = [
        el(3, 2, "button", (2, 63, 44, 21), text="okay"),
        el(4, 2, "button", (46, 63, 44, 21), text="Okay"),
        el(5, 2, "input_text", (2, 84, 150, 21)),
        el(6, 2, "button", (2, 105, 41, 21), text="next"),
        el(7, 2, "button", (50, 105, 41, 21), text="okay"),
    ]
    return page("click-button", 'Click on the "okay" button.', (("target", "okay"),), bs), bs


def login_page(user: str = "", pw: str = "", focus: str = "") -> tuple[dict, list[dict]]:
    es = [
        el(3, 2, "p", (2, 62, 156, 42)),
        el(4, 3, "label", (2, 62, 48, 11), text="Username"),
        el(5, 3, "input_text", (7, 78, 128, 21), id="username", value=user, focused=int(focus == "u")),
        el(6, 2, "p", (2, 114, 156, 42)),
        el(7, 6, "label", (2, 114, 47, 11), text="Password"),
        el(8, 6, "input_password", (7, 130, 108, 21), id="password", value=pw, focused=int(focus == "p")),
        el(9, 2, "button", (2, 166, 87, 31), text="Login", id="subbtn"),
    ]
    goal = 'Enter the username "karrie" and the password "AU" into the text fields and press login.'
    return page("login-user", goal, (("username", "karrie"), ("password", "AU")), es), es


def checkbox_page(checked: tuple[str, ...] = ()) -> tuple[dict, list[dict]]:
    es = []
    for i, name in enumerate(("AU", "HF2", "oB")):
        top = 55 + 19 * i
        es += [
            el(10 + 3 * i, 2, "label", (2, top + 4, 41, 11)),
            el(
                11 + 3 * i,
                10 + 3 * i,
                "input_checkbox",
                (6, top, 20, 13),
                value="True" if name in checked else "",
            ),
            el(-1 - i, 10 + 3 * i, "t", (29, top + 4, 14, 11), text=name),
        ]
    es.append(el(30, 2, "button", (2, 120, 95, 31), text="Submit", id="subbtn"))
    fields = (("target 0", "HF2"), ("target 1", "oB"), ("button", "submit"))
    return page("click-checkboxes", "Select HF2, oB and click Submit.", fields, es), es


# -- the expert ----------------------------------------------------------------------------------------
def test_expert_clicks_the_exact_text_at_its_centre() -> None:
    info, bs = click_button_page()
    assert expert_action(info) == centre(bs[0])  # "okay", not "Okay"


def test_expert_fills_a_form_field_by_field_then_submits() -> None:
    info, es = login_page()
    assert expert_action(info) == centre(es[2])  # tap the username field first
    assert expert_action(login_page(focus="u")[0]) == Action.type_text("karrie")
    assert expert_action(login_page(user="kar", focus="u")[0]) == Action.type_text("rie")
    assert expert_action(login_page(user="karrie", focus="u")[0]) == centre(es[5])
    assert expert_action(login_page(user="karrie", pw="AU", focus="p")[0]) == centre(es[6])
    # A wrong string cannot be deleted in this action space: the expert moves on and submits.
    assert expert_action(login_page(user="bob", pw="AU")[0]) == centre(es[6])


def test_expert_ticks_exactly_the_goal_boxes() -> None:
    info, es = checkbox_page()
    assert expert_action(info) == centre(es[4])  # HF2
    assert expert_action(checkbox_page(("HF2",))[0]) == centre(es[7])  # oB
    assert expert_action(checkbox_page(("HF2", "oB", "AU"))[0]) == centre(es[1])  # untick AU
    assert expert_action(checkbox_page(("HF2", "oB"))[0]) == centre(es[9])  # Submit


def test_expert_button_sequence_ignores_a_stale_flag() -> None:
    one = el(3, 2, "button", (4, 60, 40, 40), text="ONE", id="subbtn")
    goal = "Click button ONE, then click button TWO."

    def seq(step: int, t1: int, t2: int) -> dict:
        two = el(4, 2, "button", (69, 112, 40, 40), text="TWO", id="subbtn2", tampered=t2)
        return page("click-button-sequence", goal, (), [{**one, "flags": np.int8([0, t1, 0, 1])}, two], step)

    # The previous episode's last click leaves TWO flagged on the new page.
    assert inside(expert_action(seq(0, 0, 1)), one)
    assert not inside(expert_action(seq(1, 1, 1)), one)
    assert not inside(expert_action(seq(1, 1, 0)), one)
    assert inside(expert_action(seq(1, 0, 1)), one)


def test_expert_opens_folders_until_the_target_shows() -> None:
    es = [
        el(5, 2, "ul", (2, 52, 156, 60), classes="tree filetree treeview"),
        el(6, 5, "li", (2, 52, 156, 15), classes="expandable"),
        el(7, 6, "div", (2, 53, 16, 16), classes="hitarea expandable-hitarea"),
        el(8, 6, "span", (18, 53, 140, 13), text="Olin", classes="folder"),
        el(9, 5, "li", (2, 67, 156, 15)),
        el(10, 9, "span", (18, 68, 140, 13), text="Alan", classes="file"),
    ]
    goal = 'Navigate through the file tree. Find and click on the folder or file named "{}".'
    hidden = page("navigate-tree", goal.format("Annis"), (("target", "Annis"),), es)
    shown = page("navigate-tree", goal.format("Alan"), (("target", "Alan"),), es)
    assert expert_action(hidden) == centre(es[2])
    assert expert_action(shown) == centre(es[5])


def test_kind_of_an_unlisted_task_comes_from_the_goal() -> None:
    assert guess_kind({"task": "some-form", "utterance": 'Enter "x" into the text field.'}) == "fill"
    assert guess_kind({"task": "x", "utterance": "Select AB, CD and click Submit."}) == "select"
    assert guess_kind({"task": "x", "utterance": 'Close the dialog box by clicking the "x".'}) == "close"
    assert guess_kind({"task": "x", "utterance": 'Click on the "no" button.'}) == "click"


# -- the behaviour policy ------------------------------------------------------------------------------
def test_behaviour_at_p1_is_the_expert() -> None:
    info, bs = click_button_page()
    rng = np.random.default_rng(0)
    exact = MiniWoBBehaviour(MiniWoBBehaviourConfig(jitter=0.0))
    assert all(exact.act(info, rng, p_optimal=1.0) == expert_action(info) for _ in range(20))
    jittered = MiniWoBBehaviour()
    taps = [jittered.act(info, rng, p_optimal=1.0) for _ in range(50)]
    assert all(inside(a, bs[0]) for a in taps) and len(set(taps)) > 1
    typing = login_page(focus="u")[0]
    assert jittered.act(typing, rng, p_optimal=1.0) == Action.type_text("karrie")


def test_behaviour_at_p0_never_does_the_right_thing() -> None:
    info, bs = click_button_page()
    beh = MiniWoBBehaviour()
    rng = np.random.default_rng(1)
    acts = [beh.act(info, rng, p_optimal=0.0) for _ in range(400)]
    # Mistakes avoid every "okay" button (all three are right), and the mixture uses every kind.
    assert not any(a.is_tap and (inside(a, bs[0]) or inside(a, bs[4])) for a in acts)
    kinds = {a.type for a in acts}
    assert {ActionType.DUAL_POINT, ActionType.TYPE, ActionType.STATUS_TASK_COMPLETE} <= kinds
    assert {ActionType.PRESS_BACK, ActionType.PRESS_HOME} <= kinds
    typing = login_page(focus="u")[0]
    assert Action.type_text("karrie") not in [beh.act(typing, rng, p_optimal=0.0) for _ in range(200)]


def test_candidates_come_from_the_noisier_mixture() -> None:
    info, bs = click_button_page()
    cfg = MiniWoBBehaviourConfig(p_optimal_by_task={}, p_optimal=0.6, p_optimal_candidates=0.3)
    beh = MiniWoBBehaviour(cfg)
    cands = beh.sample_candidates(info, 2000, np.random.default_rng(2))
    assert len(cands) == 2000
    hit = np.mean([a.is_tap and inside(a, bs[0]) for a in cands])
    assert abs(hit - 0.3) < 0.04
    # Same Generator state, same actions: nothing depends on global or per-object randomness.
    again = MiniWoBBehaviour(cfg).sample_candidates(info, 50, np.random.default_rng(2))
    assert again == cands[:50]


def test_config_validates_and_scales_candidate_noise_per_task() -> None:
    cfg = MiniWoBBehaviourConfig()
    cfg.validate()
    assert set(TUNED_P_OPTIMAL) >= {"click-button", "login-user", "navigate-tree"}
    assert cfg.p_for("login-user") == TUNED_P_OPTIMAL["login-user"]
    ratio = cfg.p_optimal_candidates / cfg.p_optimal
    assert cfg.p_for("login-user", candidates=True) == pytest.approx(TUNED_P_OPTIMAL["login-user"] * ratio)
    assert cfg.p_for("unlisted-task", candidates=True) == cfg.p_optimal_candidates
    for bad in ({"p_optimal": 1.5}, {"mistakes": (0, 0, 0, 0, 0, 0)}, {"jitter": -0.1}, {"mistakes": (1.0,)}):
        with pytest.raises(ConfigError):
            MiniWoBBehaviourConfig(**bad).validate()  # type: ignore[arg-type]


def test_per_task_table_takes_overrides_by_task_name_and_refuses_unknown_tasks() -> None:
    from digiq.config import load_config
    from digiq.stages import collect, evaluate

    # The expert on every step of every task (the ceiling run of docs/miniwob.md): the whole table cleared.
    cfg = load_config(
        collect.Config,
        None,
        ["env=miniwob", "miniwob_behaviour.p_optimal=1", "miniwob_behaviour.p_optimal_by_task={}"],
    )
    assert cfg.miniwob_behaviour.p_optimal_by_task == {}
    assert all(cfg.miniwob_behaviour.p_for(t) == 1.0 for t in TUNED_P_OPTIMAL)
    # One task by its hyphenated name: that task's entry changes, the others keep the tuned values.
    cfg = load_config(
        collect.Config, None, ["env=miniwob", "miniwob_behaviour.p_optimal_by_task.click-button=1.0"]
    )
    assert cfg.miniwob_behaviour.p_for("click-button") == 1.0
    assert cfg.miniwob_behaviour.p_for("login-user") == TUNED_P_OPTIMAL["login-user"]
    assert "click_button" not in cfg.miniwob_behaviour.p_optimal_by_task
    # A task that is neither run nor tuned is a typo, refused before any browser starts.
    for cls in (collect.Config, evaluate.Config):
        with pytest.raises(ConfigError, match="click-buton.*did you mean 'click-button'"):
            load_config(cls, None, ["env=miniwob", "miniwob_behaviour.p_optimal_by_task.click-buton=1"])
    # A task of the run's own list is fine, tuned or not.
    load_config(
        collect.Config,
        None,
        ["env=miniwob", "miniwob.tasks=[book-flight]", "miniwob_behaviour.p_optimal_by_task.book-flight=0.5"],
    )


# -- real pages ----------------------------------------------------------------------------------------
HAVE_BROWSER = (
    Path("/usr/bin/chromium").exists()
    and Path("/usr/bin/chromedriver").exists()
    and importlib.util.find_spec("miniwob") is not None
)
# Not a module-level importorskip: the unit tests above need neither a browser nor the miniwob package.
browser = pytest.mark.skipif(
    not HAVE_BROWSER, reason="needs /usr/bin/chromium, /usr/bin/chromedriver and the miniwob package"
)


@pytest.fixture(scope="module")
def env():
    pytest.importorskip("miniwob")
    from digiq.envs.miniwob import DEFAULT_TASKS, MiniWoBConfig, MiniWoBEnv

    e = MiniWoBEnv(MiniWoBConfig(tasks=list(DEFAULT_TASKS), max_steps=10))
    yield e
    e.close()


def run_episode(env, task: str, seed: int, policy) -> float:
    from digiq.envs.base import TaskInstance

    obs = env.reset(TaskInstance(task, seed))
    while True:
        result = env.step(policy(obs.info))
        if result.done:
            return result.reward
        obs = result.observation


@pytest.mark.miniwob
@browser
def test_expert_and_p1_behaviour_solve_every_task(env) -> None:
    from digiq.envs.miniwob import DEFAULT_TASKS

    beh = MiniWoBBehaviour()
    rng = np.random.default_rng(0)
    failed = []
    for task in DEFAULT_TASKS:
        for seed in (7001, 7002):
            if run_episode(env, task, seed, expert_action) != 1.0:
                failed.append((task, seed, "expert"))
        if run_episode(env, task, 7003, lambda info: beh.act(info, rng, p_optimal=1.0)) != 1.0:
            failed.append((task, 7003, "behaviour p=1"))
    assert not failed


@pytest.mark.miniwob
@browser
def test_behaviour_at_p0_never_solves_click_button(env) -> None:
    beh = MiniWoBBehaviour()
    rewards = []
    for seed in range(10):
        rng = np.random.default_rng(seed)  # one Generator per episode, as collection keeps them
        rewards.append(
            run_episode(env, "click-button", 8000 + seed, lambda info, g=rng: beh.act(info, g, 0.0))
        )
    assert sum(rewards) == 0
