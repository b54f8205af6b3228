"""Time the policy candidate sampler (``digiq candidates source=policy``): ``generate`` (the old path) against
the custom KV-cached decoding loop (digiq.models.policy.decode_from_prefill), in one run on the same states.

    python scripts/bench_sampling.py [--dataset DIR | --trajectories 40] [--policy data/pretrained/gui-tiny]
        [--rows 64] [--batch 16] [--num-candidates 16] [--threads 0] [--repeats 1]

Without --dataset it collects a small simulated-device dataset (default screens) in a temporary folder.
Prints JSON: seconds of each path (best of --repeats), the ratio, seconds per state, the fraction of valid
and distinct candidates of each path, the machine's measured float32 matmul rate and the thread count.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from accelerate import Accelerator

import digiq.models.policy as P
from digiq.actions import parse_action
from digiq.data.schema import load_dataset
from digiq.stages import candidates, collect
from digiq.utils.machine import matmul_gflops


def _collect(out: Path, trajectories: int) -> Path:
    cfg = collect.Config(output_dir=str(out), num_trajectories=trajectories, seed=0)
    collect.run(cfg)
    return out


def _stats(cands: list[list[str]]) -> dict[str, float]:
    extra = [c[1:] for c in cands]
    valid = np.array([[parse_action(x).is_valid for x in row] for row in extra], dtype=bool)
    distinct = np.array([len(set(c)) / len(c) for c in cands])
    return {
        "valid_fraction": round(float(valid.mean()), 4),
        "distinct_fraction": round(float(distinct.mean()), 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="")
    ap.add_argument("--trajectories", type=int, default=40)
    ap.add_argument("--policy", default="data/pretrained/gui-tiny")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--num-candidates", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory()
    dataset = args.dataset or str(_collect(Path(tmp.name) / "sim", args.trajectories))
    ds = load_dataset(dataset)
    ds = ds.select(range(min(args.rows, len(ds))))
    cfg = candidates.Config(
        dataset=dataset,
        output_dir=str(Path(tmp.name) / "unused"),
        policy=args.policy,
        num_candidates=args.num_candidates,
        batch_size=args.batch,
        device="cpu",
    )
    accelerator = Accelerator(cpu=True)
    gflops = matmul_gflops()

    def timed() -> tuple[float, list[list[str]]]:
        best, out = float("inf"), []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out, _ = candidates.policy_candidates(ds, cfg, accelerator)
            best = min(best, time.perf_counter() - t0)
        return best, out

    # Warm-up (imports, first calls of each kernel) outside the timed runs, both paths.
    warm = dataclasses.replace(cfg, batch_size=2)
    with mock.patch.object(P, "fast_decoding_applies", lambda *a, **k: False):
        candidates.policy_candidates(ds.select(range(2)), warm, accelerator)
    candidates.policy_candidates(ds.select(range(2)), warm, accelerator)
    # The old path: every family decodes with `generate` (k samples share one prefill; re-samples run
    # their states' prompts again), as before the custom loop.
    with mock.patch.object(P, "fast_decoding_applies", lambda *a, **k: False):
        old_s, old = timed()
    new_s, new = timed()
    print(
        json.dumps(
            {
                "policy": args.policy,
                "states": len(ds),
                "num_candidates": args.num_candidates,
                "batch": args.batch,
                "threads": torch.get_num_threads(),
                "matmul_gflops": round(gflops, 1),
                "generate_s": round(old_s, 3),
                "custom_loop_s": round(new_s, 3),
                "speedup": round(old_s / new_s, 2),
                "generate_s_per_state": round(old_s / len(ds), 5),
                "custom_loop_s_per_state": round(new_s / len(ds), 5),
                "generate": _stats(old),
                "custom_loop": _stats(new),
                "matmul_gflops_after": round(matmul_gflops(), 1),
            },
            indent=1,
        )
    )
    tmp.cleanup()


if __name__ == "__main__":
    main()
