"""Throughput of ``digiq import`` on a synthetic file shaped like the released Digi-Q data.

    python scripts/bench_import.py --trajs 50 --horizon 10 --candidates 16 --dim 4096

Writes a raw-collection-style .pt (``<path_to_images>`` paths to the NEXT screen, ``"<split>"``-joined
action_list, list-of-arrays q_rep_out_list) plus PNG screens into a temp dir, then times the import with
and without ``features_output``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from digiq.actions import Action, make_observation
from digiq.data.importer import Config, run


def build(root: Path, trajs: int, horizon: int, n_cand: int, dim: int, size: tuple[int, int]) -> Path:
    rng = np.random.default_rng(0)
    img_dir = root / "images"
    img_dir.mkdir(parents=True)
    data = []
    for i in range(trajs):
        for k in range(horizon + 1):
            arr = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
            Image.fromarray(arr).resize(size, Image.NEAREST).save(img_dir / f"{i}_{k}.png")
        steps = []
        for t in range(horizon):
            action = Action.tap(rng.random(), rng.random()).render()
            cands = [action] + [Action.tap(rng.random(), rng.random()).render() for _ in range(n_cand - 1)]
            steps.append(
                {
                    "observation": make_observation(f"task {i}", None),
                    "image_path": f"<path_to_images>/{i}_{t + 1}.png",
                    "image_features": rng.standard_normal(1408).astype(np.float32),
                    "task": f"task {i}",
                    "reward": np.array(int(t == horizon - 1 and i % 2 == 0)),
                    "done": np.array(t == horizon - 1),
                    "action": action,
                    "action_list": "<split>".join(cands),
                    "q_rep_out_list": list(rng.standard_normal((n_cand, dim)).astype(np.float32)),
                }
            )
        data.append(steps)
    pt = root / "bench.pt"
    torch.save(data, pt)
    return pt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trajs", type=int, default=50)
    ap.add_argument("--horizon", type=int, default=10)
    ap.add_argument("--candidates", type=int, default=16)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--width", type=int, default=270)
    ap.add_argument("--height", type=int, default=600)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        pt = build(root, args.trajs, args.horizon, args.candidates, args.dim, (args.width, args.height))
        print(f"built {pt.stat().st_size / 2**20:.1f} MiB .pt in {time.perf_counter() - t0:.1f}s")
        steps = args.trajs * args.horizon
        for feats in ("", str(root / "feats")):
            t0 = time.perf_counter()
            run(
                Config(
                    inputs=(str(pt),),
                    output=str(root / "ds"),
                    image_root=str(root / "images"),
                    overwrite=True,
                    features_output=feats,
                )
            )
            dt = time.perf_counter() - t0
            label = "dataset + features" if feats else "dataset only"
            print(f"{label}: {steps} steps in {dt:.2f}s = {steps / dt:.0f} steps/s")


if __name__ == "__main__":
    main()
