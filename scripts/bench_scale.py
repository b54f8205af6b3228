"""Import + critic training at the size of the released Web Shopping file: time and peak RSS per stage.

    python scripts/bench_scale.py --work /tmp/scale                    # 1296 x 20 steps, N = 16, 4096-d
    python scripts/bench_scale.py --work /tmp/scale --trajs 64         # a quick run of the same path

Writes an official-format ``.pt`` (the layout of DigiRL-agent/digiq @ 8181379 post-processed files: one
``(N, 4096)`` float32 ``q_rep_out_list`` and a 1408-d ``image_features`` per step; a few shared PNG screens,
since the images are not what this measures), then runs, each in its own child process (so each peak RSS
is that stage's own, read from ``wait4``):

1. ``digiq import FILE output=... features_output=...`` (float32 cache);
2. ``digiq train-critic`` on the import with the official inputs: frame-stacked ``[prev, cur]`` image
   features, Q reading the V input, a frozen text encoder (a tiny random RoBERTa, offline) on the goal and
   action strings; default head widths, ``--steps`` optimiser steps.

Feature bytes = what the stage holds as features: the ``q_rep_out_list`` arrays (import: as unpickled;
train-critic: the float32 cache tensor), plus the image features.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(path: Path, trajs: int, horizon: int, n: int, dim: int, img_dim: int, first: int = 0) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from digiq.actions import Action, make_observation

    rng = np.random.default_rng(first)
    shots = path.parent / "shots"
    shots.mkdir(parents=True, exist_ok=True)
    for k in range(horizon + 1):
        Image.new("RGB", (27, 60), (10 * k % 255, 80, 120)).save(shots / f"{k}.png")
    words = ["usb cable", "yoga mat", "desk lamp", "phone case"]
    data = []
    for i in range(first, first + trajs):
        goal = f'Go to shop{i % 200}.com, search for "{words[i % 4]}", and select the first entry'
        prev = None
        traj = []
        for t in range(horizon):
            acts = [Action.tap(float(rng.random()), float(rng.random())) for _ in range(n)]
            if t % 5 == 2:
                acts[0] = Action.type_text(words[(i + t) % 4])
            last = t == horizon - 1
            traj.append(
                {
                    "observation": make_observation(goal, prev),
                    "action": acts[0].render(),
                    "reward": int(last and i % 2 == 0),
                    "done": last,
                    "task": goal,
                    "image_path": f"shots/{t}.png",
                    "next_image_path": f"shots/{t + 1}.png",
                    "action_list": [a.render() for a in acts],
                    "image_features": rng.standard_normal(img_dim, dtype=np.float32),
                    "q_rep_out_list": rng.standard_normal((n, dim), dtype=np.float32),
                }
            )
            prev = acts[0]
        data.append(traj)
    torch.save(data, path)


def child(args: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS GB, exit code) of one child process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(args, env=env, cwd=ROOT)
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - t0, usage.ru_maxrss / 1024**2, p.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="scratch folder (needs ~2.2x the feature bytes of disk)")
    ap.add_argument("--trajs", type=int, default=1296)
    ap.add_argument("--horizon", type=int, default=20)
    ap.add_argument("--candidates", type=int, default=16)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--img-dim", type=int, default=1408)
    ap.add_argument("--steps", type=int, default=20, help="critic optimiser steps")
    ap.add_argument(
        "--parts",
        type=int,
        default=16,
        help="write the trajectories as this many .pt files "
        "(torch.save of numpy arrays peaks at ~8x their bytes; `digiq import` reads them all)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the files (default: delete them)")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}  # fmt: skip
    py = sys.executable
    per = -(-a.trajs // a.parts)
    parts = [
        (work / f"part-{k}.pt", k * per, min(per, a.trajs - k * per))
        for k in range(a.parts)
        if k * per < a.trajs
    ]
    res: dict = {"trajectories": a.trajs, "horizon": a.horizon, "candidates": a.candidates, "dim": a.dim}
    steps = a.trajs * a.horizon
    feat_bytes = steps * (a.candidates * a.dim + a.img_dim) * 4
    res["feature_gb"] = feat_bytes / 1024**3
    res["build_s"], res["build_rss_gb"] = 0.0, 0.0
    for pt, first, count in parts:
        code = (f"import sys; sys.path.insert(0, {str(ROOT / 'scripts')!r}); import bench_scale as b; "
                f"b.build(__import__('pathlib').Path({str(pt)!r}), {count}, {a.horizon}, {a.candidates}, {a.dim}, "
                f"{a.img_dim}, {first})")  # fmt: skip
        t, rss, rc = child([py, "-c", code], env)
        assert rc == 0, "building the file failed"
        res["build_s"] += t
        res["build_rss_gb"] = max(res["build_rss_gb"], rss)
    res["files"] = len(parts)
    res["file_gb"] = sum(pt.stat().st_size for pt, _, _ in parts) / 1024**3
    ds, feats = work / "ds", work / "feats"
    res["import_s"], res["import_rss_gb"], rc = child(
        [
            py,
            "-m",
            "digiq",
            "import",
            *[str(pt) for pt, _, _ in parts],
            f"output={ds}",
            f"features_output={feats}",
            "overwrite=true",
        ],
        env,
    )
    assert rc == 0, "import failed"
    enc = work / "tiny-roberta"
    subprocess.run([py, "-c", f"from digiq.models.tiny_text import save_tiny_text_encoder as s; s({str(enc)!r})"],
                   env=env, check=True, cwd=ROOT, capture_output=True)  # fmt: skip
    res["train_s"], res["train_rss_gb"], rc = child(
        [py, "-m", "digiq", "train-critic", f"dataset={ds}", f"features={feats}", f"output_dir={work / 'critic'}",
         "overwrite=true", "batch_size=128", f"steps_per_epoch={a.steps}", "epochs=1", "device=cpu",
         "critic.frame_stack=true", "critic.q_input=state_action", f"critic.text.encoder={enc}",
         "critic.text.separate=false", "wandb.mode=disabled", "q_star=skip"],
        env,
    )  # fmt: skip
    assert rc == 0, "train-critic failed"
    res["import_rss_over_features"] = res["import_rss_gb"] / res["feature_gb"]
    res["train_rss_over_features"] = res["train_rss_gb"] / res["feature_gb"]
    if not a.keep:
        import shutil

        for p in (*[pt for pt, _, _ in parts], ds, feats, work / "critic"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
