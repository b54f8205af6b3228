"""The simulated device: exact values, dynamics, rendering, behaviour policy, rollouts."""

from __future__ import annotations

import collections
import io

import numpy as np
import pytest
from PIL import Image

from digiq.actions import Action, ActionType, parse_action
from digiq.envs import evaluate_policy
from digiq.envs.sim import sim_policy_fn as builtin_policy_fn
from digiq.errors import DigiqError
from digiq.sim import layout as L
from digiq.sim.behaviour import BehaviourPolicy
from digiq.sim.phone import SimConfig, SimPhone
from digiq.stages.collect import CHANGE_THRESHOLD, screen_change
from digiq.utils.stats import wilson_interval

GAMMA = 0.9


@pytest.fixture(scope="module")
def phone() -> SimPhone:
    return SimPhone()


def _all_tasks(phone: SimPhone) -> list:
    return phone.tasks("train") + phone.tasks("test")


def test_catalogue_is_fixed_and_splits_disjoint(phone: SimPhone) -> None:
    train, test = phone.tasks("train"), phone.tasks("test")
    assert len(train) > 40 and len(test) > 20
    assert not {t.goal for t in train} & {t.goal for t in test}
    assert not {t.task_id for t in train} & {t.task_id for t in test}
    # compositional split: no (shop, query) pair in both, but every test shop and query is seen in training
    pairs = {
        split: {(t.shop, t.query) for t in ts if t.query} for split, ts in (("train", train), ("test", test))
    }
    assert pairs["train"].isdisjoint(pairs["test"]) and pairs["test"]
    assert {q for _, q in pairs["test"]} <= {q for _, q in pairs["train"]}
    assert {s for s, _ in pairs["test"]} <= {s for s, _ in pairs["train"]}
    assert [t.task_id for t in SimPhone().tasks("train")] == [t.task_id for t in train]
    shop = [t for t in train if t.query]
    assert all(t.max_steps == 20 for t in shop) and all(t.max_steps == 10 for t in train if not t.query)
    assert any(
        t.goal == 'Go to buynow.com, search for "usb cable", and select the first entry' for t in train
    )
    assert any(t.goal == "Turn on wifi" for t in train)
    with pytest.raises(DigiqError, match="unknown sim split"):
        phone.tasks("val")


def _bfs_distance(phone: SimPhone, task) -> dict[str, int]:
    """Shortest number of actions to the goal, from each graph state (an independent check of V*)."""
    g = phone._graph(task)
    preds = collections.defaultdict(list)
    goal = phone._goal_mask(task, g)
    for i in range(len(g.keys)):
        for k in range(g.next.shape[1]):
            if g.valid[i, k] and not g.status[i, k]:
                preds[int(g.next[i, k])].append(i)
    dist = {}
    frontier = [i for i in range(len(g.keys)) if goal[i]]
    depth = 0
    seen = set(frontier)
    while frontier:
        depth += 1
        nxt = []
        for j in frontier:
            for i in preds[j]:
                if i not in seen and not goal[i]:
                    seen.add(i)
                    dist[g.keys[i]] = depth
                    nxt.append(i)
        frontier = nxt
    return dist


def test_values_equal_closed_form_on_every_task(phone: SimPhone) -> None:
    """V*(s) = gamma^(d(s)-1) (d = BFS distance to the goal; 0 if unreachable) for every state of every task."""
    for task in _all_tasks(phone):
        g = phone._graph(task)
        v = phone.values(task, GAMMA)
        dist = _bfs_distance(phone, task)
        expected = np.array([GAMMA ** (dist[k] - 1) if k in dist else 0.0 for k in g.keys])
        np.testing.assert_allclose(v, expected, atol=1e-9, err_msg=task.task_id)
        assert v[g.index[phone.reset(task).abstract_key]] > 0  # every task is solvable from its start


def test_bellman_consistency_every_state_every_canonical_action(phone: SimPhone) -> None:
    by_kind = {}
    for task in _all_tasks(phone):
        by_kind.setdefault((task.kind, task.split), task)  # the dynamics are shared; goals differ by kind
    for task in by_kind.values():
        g = phone._graph(task)
        v = phone.values(task, GAMMA)
        for i, abstract in enumerate(g.keys):
            s = L.state_from_key(f"{task.task_id}|{abstract}")
            if phone.is_goal(s):
                assert v[i] == 0.0
                continue
            acts = phone.canonical_actions(s)
            q = phone.q_star(s.key, acts, GAMMA)
            backup = []
            for a in acts:
                nxt, r, term = phone.transition(s, a)
                backup.append(r + GAMMA * (1 - term) * phone.v_star(nxt.key, GAMMA) if not term else r)
            np.testing.assert_allclose(q, backup, atol=1e-6)
            assert abs(q.max() - v[i]) < 1e-6


def test_q_star_of_arbitrary_action_strings_matches_step(phone: SimPhone) -> None:
    rng = np.random.default_rng(0)
    pi = BehaviourPolicy(phone, seed=3)
    for task in phone.tasks("train")[:12]:
        s = phone.reset(task)
        for _ in range(6):
            actions = [pi.act(s).render() for _ in range(5)]
            actions += [
                Action.tap(rng.uniform(), rng.uniform()).render(),
                "garbage that is not an action",
                Action.swipe((0.2, 0.5), (0.9, 0.5)).render(),
            ]
            q = phone.q_star(phone.state_key(s), actions, GAMMA)
            for a, qa in zip(actions, q):
                nxt, r, done = phone.step(s, a)
                _, _, terminal = phone.transition(s, a)
                want = r + GAMMA * (1 - terminal) * phone.v_star(phone.state_key(nxt), GAMMA)
                assert qa == pytest.approx(want, abs=1e-9)
            s, _, done = phone.step(s, actions[0])
            if done:
                break


def test_state_key_round_trip_fresh_device(phone: SimPhone) -> None:
    pi = BehaviourPolicy(phone, seed=1)
    for task in phone.tasks("test")[:10]:
        s = phone.reset(task)
        for _ in range(5):
            key = phone.state_key(s)
            fresh = SimPhone()
            s2 = fresh.state_from_key(key)
            assert s2 == s and fresh.state_key(s2) == key
            assert fresh.render_png(s2) == phone.render_png(s)
            s, _, done = phone.step(s, pi.act(s))
            if done:
                break
    with pytest.raises(DigiqError):
        phone.state_from_key("nope|home")
    with pytest.raises(DigiqError, match="unknown sim task"):
        phone.state_from_key("no/such/task|home|-1|0|0|0|0|100")


def test_optimal_policy_succeeds_on_every_task_within_horizon(phone: SimPhone) -> None:
    for task in _all_tasks(phone):
        s = phone.reset(task)
        for _ in range(task.max_steps):
            s, r, done = phone.step(s, phone.optimal_actions(s)[0])
            if done:
                break
        assert r == 1.0 and done, task.task_id
        assert s.steps <= task.max_steps // 2  # the horizon never binds for the optimal policy


def _png_image(phone: SimPhone, s) -> Image.Image:
    return Image.open(io.BytesIO(phone.render_png(s)))


@pytest.mark.parametrize("size", [(180, 320), (112, 200)])
def test_noop_taps_leave_screen_unchanged_and_widget_taps_change_it(size: tuple[int, int]) -> None:
    """Stage-1 label property: empty-space taps give change 0, widget taps change > 30 (0.25 scale)."""
    phone = SimPhone(SimConfig(width=size[0], height=size[1]))
    rng = np.random.default_rng(0)
    checked_widgets = checked_noops = 0
    seen = set()
    pi = BehaviourPolicy(phone, seed=5)
    for task in _all_tasks(phone)[::4]:
        s = phone.reset(task)
        for _ in range(15):
            if s.key not in seen:
                seen.add(s.key)
                for w in phone.widgets(s):
                    y = rng.uniform(w.box[0], w.box[2])
                    x = rng.uniform(w.box[1], w.box[3])
                    nxt, _, _ = phone.transition(s, Action.tap(y, x))
                    if nxt == s:  # e.g. "submit" with an empty query is a no-op by design
                        continue
                    assert screen_change(phone.render_png(s), phone.render_png(nxt)) > CHANGE_THRESHOLD, (
                        s.key,
                        w,
                    )
                    checked_widgets += 1
                if s.screen == L.SEARCH:  # typing a different query is a visible change too
                    for text in (task.query, task.decoy, ""):
                        nxt, _, _ = phone.transition(s, Action.type_text(text))
                        if nxt != s:
                            assert (
                                screen_change(phone.render_png(s), phone.render_png(nxt)) > CHANGE_THRESHOLD
                            )
                for _ in range(10):
                    y, x = rng.uniform(), rng.uniform()
                    if L.hit(s, (y, x)) is None:
                        nxt, r, _ = phone.transition(s, Action.tap(y, x))
                        assert nxt == s and r == 0.0
                        assert phone.render_png(nxt) == phone.render_png(s)
                        checked_noops += 1
            s, _, done = phone.step(s, pi.act(s, p_optimal=0.7))
            if done:
                break
    assert checked_widgets > 50 and checked_noops > 50
    # the renderer has no clock: a fresh render of the same state is pixel-identical
    s = phone.reset(phone.tasks("train")[0])
    a = np.asarray(SimPhone(phone.config).render(s))
    b = np.asarray(phone.render(s))
    assert a.shape == (size[1], size[0], 3) and np.array_equal(a, b)


def test_actions_semantics(phone: SimPhone) -> None:
    task = next(t for t in phone.tasks("train") if t.kind == "search" and t.shop == 1)
    s = phone.reset(task)
    # TYPE on the home screen does nothing; STATUS_TASK_COMPLETE ends with no reward
    assert phone.step(s, Action.type_text(task.query))[0] == s
    _, r, done = phone.step(s, Action.key(ActionType.STATUS_TASK_COMPLETE))
    assert done and r == 0.0
    s, _, _ = phone.step(s, Action.tap(*_centre(L.home_icon_box(1))))
    assert s.screen == L.SHOP and s.shop == 1
    s, _, _ = phone.step(s, Action.tap(*_centre(L.SEARCH_BAR)))
    assert s.screen == L.SEARCH
    assert phone.step(s, Action.type_text("something else"))[0].query == L.Q_BAD
    s, _, _ = phone.step(s, Action.type_text(task.query.upper()))  # matching ignores case
    assert s.query == L.Q_OK
    s, r, done = phone.step(s, parse_action(Action.key(ActionType.PRESS_ENTER).render()))
    assert s.screen == L.RESULTS and r == 1.0 and done
    # horizon truncation
    s = phone.reset(task)
    for _ in range(task.max_steps):
        s, r, done = phone.step(s, Action.tap(0.95, 0.02))
    assert done and r == 0.0 and s.steps == task.max_steps


def test_scrolling_results(phone: SimPhone) -> None:
    task = next(t for t in phone.tasks("train") if t.kind == "select")
    s = L.State(task.task_id, L.RESULTS, shop=task.shop, query=L.Q_BAD, toggles=task.initial_toggles)
    up = phone.step(s, Action.swipe((0.8, 0.5), (0.3, 0.5)))[0]
    assert up.scroll == 1 and screen_change(phone.render_png(s), phone.render_png(up)) > CHANGE_THRESHOLD
    assert phone.step(s, Action.swipe((0.3, 0.5), (0.8, 0.5)))[0] == s  # already at the top
    assert phone.step(s, Action.swipe((0.5, 0.9), (0.5, 0.1)))[0] == s  # sideways
    top = L.State(task.task_id, L.RESULTS, shop=task.shop, query=L.Q_BAD, scroll=L.MAX_SCROLL)
    assert phone.step(top, Action.swipe((0.8, 0.5), (0.3, 0.5)))[0] == top


def _centre(box: L.Box) -> tuple[float, float]:
    return ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)


def test_render_size_configurable() -> None:
    small = SimPhone(SimConfig(width=90, height=160))
    img = small.render(small.reset(small.tasks("test")[0]))
    assert img.size == (90, 160) and img.mode == "RGB"


def test_behaviour_deterministic_and_candidates(phone: SimPhone) -> None:
    s = phone.reset(phone.tasks("train")[2])
    a = [BehaviourPolicy(phone, seed=7).act(s).render() for _ in range(3)]
    p1, p2 = BehaviourPolicy(phone, seed=7), BehaviourPolicy(phone, seed=7)
    assert [p1.act(s).render() for _ in range(20)] == [p2.act(s).render() for _ in range(20)]
    assert len(set(a)) == 1
    cands = BehaviourPolicy(phone, seed=1).sample_candidates(s, 16)
    assert len(cands) == 16 and len({c.render() for c in cands}) > 4
    q = phone.q_star(s, cands, 0.95)
    assert q.max() > q.min()  # a candidate set mixes good and bad actions


@pytest.mark.slow
@pytest.mark.parametrize("split", ["train", "test"])
def test_behaviour_success_in_autoui_range(phone: SimPhone, split: str) -> None:
    fn = builtin_policy_fn("behaviour", phone, seed=0)
    res = evaluate_policy(fn, split=split, num_episodes=200, seed=0, phone=phone)
    assert 0.17 <= res["success_rate"] <= 0.38, res["success_rate"]
    assert res["ci_low"] < res["success_rate"] < res["ci_high"]
    assert sum(v[1] for v in res["per_task"].values()) == 200


def test_evaluate_policy_builtins_and_contract(phone: SimPhone) -> None:
    seen: list[dict] = []

    def spy(batch: list[dict]) -> list[str]:
        seen.extend(batch)
        return builtin_policy_fn("optimal", phone)(batch)

    res = evaluate_policy(spy, split="test", num_episodes=40, seed=1, phone=phone, batch_size=16)
    assert res["success_rate"] == 1.0 and res["num_episodes"] == 40
    assert set(res) >= {"success_rate", "ci_low", "ci_high", "num_episodes", "mean_steps"}
    item = seen[0]
    assert isinstance(item["screenshot"], Image.Image) and item["observation"].endswith("</s>")
    assert item["task"] in item["observation"] and phone.state_from_key(item["state_key"]).steps == 0
    rnd = evaluate_policy(builtin_policy_fn("random", phone, seed=0), "test", 40, 0, phone)
    assert rnd["success_rate"] < 0.5
    bad = evaluate_policy(lambda b: ["not an action"] * len(b), "test", 8, 0, phone)
    assert bad["success_rate"] == 0.0 and bad["mean_steps"] >= 10  # INVALID = no-op until the horizon


def test_wilson_interval_reference() -> None:
    lo, hi = wilson_interval(20, 100)
    # reference values (e.g. statsmodels proportion_confint(20, 100, method="wilson"))
    assert lo == pytest.approx(0.1333, abs=1e-4) and hi == pytest.approx(0.2888, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
