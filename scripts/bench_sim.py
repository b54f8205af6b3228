"""Measure the simulated device: behaviour / optimal / random success over 200 episodes per split,
collection time and size for 500 trajectories, state counts and the Stage-1 label balance.

    python scripts/bench_sim.py [--out /tmp/bench_sim]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

from digiq.envs import evaluate_policy
from digiq.envs.sim import sim_policy_fn as builtin_policy_fn
from digiq.sim.phone import SimPhone
from digiq.stages import collect


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/bench_sim")
    ap.add_argument("--episodes", type=int, default=200)
    args = ap.parse_args()
    phone = SimPhone()
    report: dict = {}
    for policy in ("behaviour", "optimal", "random"):
        for split in ("train", "test"):
            res = evaluate_policy(builtin_policy_fn(policy, phone, seed=0), split, args.episodes, 0, phone)
            res.pop("per_task")
            report[f"{policy}/{split}"] = res
            print(
                f"{policy:9s} {split:5s} success {res['success_rate']:.3f} "
                f"[{res['ci_low']:.3f}, {res['ci_high']:.3f}] mean steps {res['mean_steps']:.2f}"
            )
    tasks = phone.tasks("train") + phone.tasks("test")
    report["tasks"] = {"train": len(phone.tasks("train")), "test": len(phone.tasks("test"))}
    report["states_per_task"] = sorted({phone.num_states(t) for t in tasks})
    report["states_total"] = sum(phone.num_states(t) for t in tasks)
    out = Path(args.out) / "data"
    t0 = time.perf_counter()
    stats = collect.run(collect.Config(output_dir=str(out), num_trajectories=500))
    report["collect_500"] = {**stats, "wall_s": time.perf_counter() - t0}
    report["collect_500"]["disk"] = subprocess.run(
        ["du", "-sh", str(out)], capture_output=True, text=True
    ).stdout.split()[0]
    print(json.dumps({k: v for k, v in report.items() if "/" not in k}, indent=1))


if __name__ == "__main__":
    main()
