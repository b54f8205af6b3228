"""How well can a *greedy* behaviour-cloned policy do at best? Perfect imitation of the behaviour policy,
decoded greedily.

pi_beta imitates the scripted behaviour policy (``digiq.sim.behaviour``) and is evaluated greedily. Even a
perfect imitation, decoded greedily token by token, first picks the most likely action *kind* (the first
token: tap, type, back, ...) and then the most likely action of that kind. This script computes that
policy exactly enough (``--samples`` behaviour draws per state) and rolls it out on the simulator: an upper
bound on pi_beta's greedy success that no amount of training can pass. It also reports, at states whose
optimal action is TYPE, how often the behaviour policy types versus taps.

    PYTHONPATH=. python scripts/bc_bound.py --samples 2000 --repeats 10
"""

from __future__ import annotations

import argparse
import collections
import json

from digiq.actions import ActionType
from digiq.sim.behaviour import BehaviourPolicy
from digiq.sim.phone import SimPhone
from digiq.utils.stats import wilson_interval


def kind(a) -> str:
    if a.type is ActionType.DUAL_POINT:
        return "tap" if a.is_tap else "swipe"
    return a.type.name


def greedy_action(phone: SimPhone, beta: BehaviourPolicy, state, samples: int):
    """The most likely kind, then the most likely effect (next screen) within it."""
    draws = [beta.act(state) for _ in range(samples)]
    kinds = collections.Counter(kind(a) for a in draws)
    top = kinds.most_common(1)[0][0]
    by_effect: dict[str, list] = collections.defaultdict(list)
    for a in draws:
        if kind(a) == top:
            nxt, _, term = phone.transition(state, a)
            key = "TERMINAL" if term and nxt == state else nxt.abstract_key
            if a.type is ActionType.TYPE:
                key = a.text.lower()
            by_effect[key].append(a)
    best = max(by_effect.values(), key=len)
    return best[0], kinds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=2000, help="behaviour draws per state")
    ap.add_argument("--repeats", type=int, default=10, help="episodes per task (each re-estimates the mode)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    phone = SimPhone()
    result = {}
    type_states = collections.Counter()
    for split in ("test", "train"):
        wins = n = 0
        for r in range(args.repeats):
            beta = BehaviourPolicy(phone, seed=1000 + r)
            for task in phone.tasks(split):
                s, done, reward = phone.reset(task), False, 0.0
                while not done:
                    a, kinds = greedy_action(phone, beta, s, args.samples)
                    if split == "test" and r == 0 and phone.optimal_actions(s)[0].type is ActionType.TYPE:
                        type_states.update({k: v / args.samples for k, v in kinds.items()})
                    s, reward, done = phone.step(s, a)
                wins += reward > 0
                n += 1
        lo, hi = wilson_interval(wins, n)
        result[split] = {"success": wins / n, "ci": [lo, hi], "episodes": n}
        print(f"{split}: greedy perfect imitation {wins / n:.3f} [{lo:.3f}, {hi:.3f}] ({n} episodes)")
    total = sum(type_states.values())
    share = {k: round(v / total, 3) for k, v in type_states.most_common()}
    print(f"behaviour action kinds at states whose optimal action is TYPE (test, first repeat): {share}")
    result["kinds_at_type_states"] = share
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
