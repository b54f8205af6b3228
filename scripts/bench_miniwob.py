"""MiniWoB++ throughput with 1 and 2 browser workers, measured side by side.

    python scripts/bench_miniwob.py [--episodes 48] [--rounds 2] [--out /tmp/bench_miniwob.json]

Collection = the scripted behaviour policy with 16 candidates per step and every transition recorded (what
`digiq collect env=miniwob` does, without writing shards); evaluation = the same policy, nothing recorded.
The arms alternate (1, 2, 1, 2, ...) on the same episodes, so drift in the machine's load hits both. Steps/s
counts environment steps (actions); browsers start before the clock does.
"""

from __future__ import annotations

import argparse
import json
import time

from digiq.envs import builtin_policy_fn, make_envs
from digiq.envs.miniwob import DEFAULT_TASKS, MiniWoBConfig, task_instances
from digiq.envs.miniwob_policy import MiniWoBBehaviour, MiniWoBBehaviourConfig
from digiq.envs.rollout import run_episodes
from digiq.utils.machine import describe


def one(workers: int, episodes: int, record: bool, seed: int) -> dict:
    envs = make_envs("miniwob", workers, miniwob=MiniWoBConfig())
    try:
        inst = task_instances(list(DEFAULT_TASKS), "train", episodes, seed)
        pi = MiniWoBBehaviour(MiniWoBBehaviourConfig())
        import numpy as np

        def cands(batch: list[dict], n: int) -> list:
            return [
                pi.sample_candidates(b["info"], n, np.random.default_rng([seed, 2, b["episode"], b["step"]]))
                for b in batch
            ]

        # warm-up: every browser opens its first page outside the clock
        run_episodes(envs, inst[: len(envs)], builtin_policy_fn("miniwob", "behaviour", seed), threads=True)
        t0 = time.perf_counter()
        eps = run_episodes(
            envs,
            inst,
            builtin_policy_fn("miniwob", "behaviour", seed),
            candidates=cands if record else None,
            num_candidates=15 if record else 0,
            record=record,
            threads=True,
            group_by_task=True,
        )
        dt = time.perf_counter() - t0
    finally:
        for e in envs:
            e.close()
    steps = sum(e.steps for e in eps)
    return {
        "workers": workers,
        "episodes": len(eps),
        "steps": steps,
        "seconds": dt,
        "steps_per_s": steps / dt,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--episodes", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="/tmp/bench_miniwob.json")
    args = ap.parse_args()
    report: dict = {"machine": describe(), "runs": []}
    for mode in ("collect", "evaluate"):
        for r in range(args.rounds):
            for w in (1, 2):
                res = one(w, args.episodes, mode == "collect", seed=r)
                res.update(mode=mode, round=r)
                report["runs"].append(res)
                print(json.dumps(res), flush=True)
    for mode in ("collect", "evaluate"):
        rate = {
            w: [x["steps_per_s"] for x in report["runs"] if x["mode"] == mode and x["workers"] == w]
            for w in (1, 2)
        }
        mean = {w: sum(v) / len(v) for w, v in rate.items()}
        report[f"{mode}_steps_per_s"] = mean
        report[f"{mode}_ratio_2_vs_1"] = mean[2] / mean[1]
        print(
            f"{mode}: 1 worker {mean[1]:.1f} steps/s, 2 workers {mean[2]:.1f} steps/s, ratio {mean[2] / mean[1]:.2f}"
        )
    print(f"machine: {report['machine']}")
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
