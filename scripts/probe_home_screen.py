"""Can a policy read benchmark v2's shuffled home screen? The greedy first action of fresh episodes, scored
against the simulator's exact Q*.

A DIAGNOSTIC, not a method: it reads privileged simulator state (the start state's key, Q*, V*) to score
the policy's action; no stage of the pipeline may use it. Every v2 episode starts on the home screen, a 3 x 3
grid of the nine apps shuffled per episode, so one greedy action per episode tells apart:

- ``optimal``: the first action attains V* (on the home screen: a tap on the goal's app);
- ``on_app``: the tap opened *some* app (the screen changed), right or wrong; ``on_app - optimal`` is the
  share of confident taps on the wrong app (the grid is not read), ``1 - on_app`` the share of taps that
  missed every icon or were not taps (the action format or the geometry is not learnt);
- train versus val goals: reading the grid on train goals but not on val goals is a generalisation gap, not
  a reading failure; low on both with a low BC loss would mean the pixels do not carry the app's identity.

    PYTHONPATH=. python scripts/probe_home_screen.py runs/behaviour_model/bc/policy --episodes 200

Episodes are those of ``digiq evaluate`` at the same seed (``SimEnv.task_instances``), so the first actions
are the ones its greedy rollouts take. Prints one JSON object (and writes it to ``--out`` when given).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from digiq.actions import make_observation, parse_action
from digiq.envs.sim import TRACE_GAMMA, SimEnv
from digiq.models.policy import load_policy_fn
from digiq.sim.phone import SimConfig, SimPhone
from digiq.sim.v2.layout import episode, home_slot_box
from digiq.sim.v2.tasks import APPS


def probe(
    policy_fn: Callable[[list[dict]], list[str]],
    splits: tuple[str, ...] = ("train", "val"),
    episodes: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """Per split: the share of ``policy_fn``'s first actions that are Q*-optimal (``optimal``) and that open
    an app (``on_app``), over ``episodes`` v2 episodes of ``digiq evaluate``'s seeding, plus the screens the
    wrong apps opened. ``policy_fn`` is a rollout callable (batch dicts -> AutoUI strings)."""
    phone = SimPhone(SimConfig(benchmark="v2"))
    env = SimEnv(phone=phone)
    out: dict[str, Any] = {"seed": seed, "episodes": episodes}
    for split in splits:
        t0 = time.perf_counter()
        rows = []
        for inst in env.task_instances(split, episodes, seed):
            obs = env.reset(inst)
            rows.append(
                {
                    "screenshot": obs.screenshot,
                    "observation": make_observation(obs.goal, None),
                    "task": obs.goal,
                    "state_key": obs.info["state_key"],
                    "state": obs.info["state"],
                }
            )
        actions = policy_fn(rows)
        optimal = on_app = 0
        wrong: dict[str, int] = {}
        for row, text in zip(rows, actions):
            key, state = row["state_key"], row["state"]
            act = parse_action(text)
            q = float(phone.q_star(key, [act], TRACE_GAMMA)[0])
            is_opt = q >= phone.v_star(key, TRACE_GAMMA) - 1e-9
            nxt, _, _ = phone.step(state, act)
            opened = nxt.screen != state.screen
            optimal += is_opt
            on_app += opened
            if opened and not is_opt:
                wrong[nxt.screen] = wrong.get(nxt.screen, 0) + 1
        n = len(rows)
        out[split] = {
            "optimal": optimal / n,
            "on_app": on_app / n,
            "wrong_app_opened": dict(sorted(wrong.items(), key=lambda kv: -kv[1])),
            "seconds": round(time.perf_counter() - t0, 1),
        }
    return out


def ground(policy_fn: Callable[[list[dict]], list[str]], episodes: int = 40, seed: int = 0) -> float:
    """Zero-shot grounding of the home grid's labels: for each of ``episodes`` val home screens and each of the
    nine apps, the prompt 'Goal: Tap "<label>"' (the pretraining stream's ground skill, with the label as the
    screen shows it, CamelCase split), scored by whether the tap lands in that app's slot. Chance is 1/9."""
    phone = SimPhone(SimConfig(benchmark="v2"))
    env = SimEnv(phone=phone)
    rows, boxes = [], []
    for inst in env.task_instances("val", episodes, seed):
        obs = env.reset(inst)
        slot = episode(inst.task_id, inst.seed).app_slot
        for a, name in enumerate(APPS):
            label = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name)
            rows.append(
                {"screenshot": obs.screenshot, "observation": make_observation(f'Tap "{label}"', None)}
            )
            boxes.append(home_slot_box(slot[a]))
    hits = 0
    for text, (y0, x0, y1, x1) in zip(policy_fn(rows), boxes):
        act = parse_action(text)
        hits += act.touch is not None and y0 <= act.touch[0] <= y1 and x0 <= act.touch[1] <= x1
    return hits / len(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("policy", help="an exported policy folder (e.g. <work_dir>/bc/policy)")
    ap.add_argument("--episodes", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--splits", default="train,val", help="comma-separated (never test: defaults are chosen on val)"
    )
    ap.add_argument("--out", default="", help="also write the JSON here")
    ap.add_argument(
        "--ground", type=int, default=0, help="also zero-shot grounding on this many val home screens"
    )
    args = ap.parse_args(argv)
    fn = load_policy_fn(args.policy, temperature=0.0, batch_size=32, device="cpu")
    res = {"policy": args.policy, **probe(fn, tuple(args.splits.split(",")), args.episodes, args.seed)}
    if args.ground:
        res["ground"] = {"accuracy": ground(fn, args.ground, args.seed), "screens": args.ground}
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
