"""Peak RSS of ``digiq train-critic`` on a feature cache the size of the official Web Shopping release.

Official Web Shopping: 1296 trajectories x 20 steps, 1 state + 16 candidate features of 4096 dims in fp16
(~3.6 GB). This script synthesises a cache of that shape (random fp16, written shard by shard so the script
itself never holds it) plus the matching dataset columns (1x1 screenshots), runs ``digiq train-critic`` in a
subprocess for a few steps and reports the child's peak RSS (VmHWM of its own address space, plus /proc polling for a
timeline) relative to the feature bytes. Target: peak RSS < 1.5x the feature bytes.

    python scripts/bench_memory.py --scale 0.125        # quick check (~450 MB of features)
    python scripts/bench_memory.py                      # full size (~3.6 GB on disk and in RAM)
    python scripts/bench_memory.py --meta               # 7B VLMs on the meta device: counts, FSDP classes,
                                                        # per-GPU memory estimate of every stage (no data)

The fixed interpreter overhead (torch + datasets imported, ~0.4-0.5 GB) is measured separately and reported
so that small-scale ratios can be read: ``(peak - baseline) / feature_bytes`` is the part that scales.

Measured on the 2-core CPU dev machine (10 steps, batch 128, default 1024-wide heads):

| run | features | peak RSS | peak / features |
|---|---|---|---|
| 1/8 scale, before the fixes | 0.45 GB | 3.66 GB | 8.1x |
| 1/8 scale, after | 0.45 GB | 1.46 GB | 3.2x (0.34 GB interpreter + ~0.45 GB critic/Adam/target fixed) |
| full scale, after (4096-row shards) | 3.61 GB | 4.82 GB | 1.34x (target < 1.5x met) |

Before, ``train_critic.feature_stats`` gathered 4096 rows of (16, 4096) action features and upcast them to
float64 twice (value and square: ~4.8 GB at once); ``FeatureCache.open`` also held a whole shard copy from
``safetensors.load_file`` plus a shard-sized bool mask next to the preallocated cache.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from digiq.actions import Action
from digiq.data.features import write_manifest, write_shard
from digiq.data.schema import FEATURES, discounted_returns, save_dataset
from digiq.utils.io import staged_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRAJ, STEPS, CANDS, DIM = 1296, 20, 16, 4096


def make_dataset(path: Path, num_traj: int, steps: int, cands: int) -> int:
    from datasets import Dataset
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    png = {"bytes": buf.getvalue(), "path": None}
    acts = [Action.tap(0.1 + 0.05 * i, 0.5).render() for i in range(cands)]
    cols: dict[str, list] = {k: [] for k in FEATURES}
    for t in range(num_traj):
        rewards = [0.0] * (steps - 1) + [float(t % 2)]
        for s in range(steps):
            cols["traj_id"].append(t)
            cols["step_id"].append(s)
            cols["task"].append("Go to shop")
            cols["observation"].append("Previous Actions: Goal: Go to shop</s>")
            cols["screenshot"].append(png)
            cols["next_screenshot"].append(png)
            cols["action"].append(acts[0])
            cols["reward"].append(rewards[s])
            cols["done"].append(s == steps - 1)
            cols["candidates"].append(acts)
            cols["state_key"].append("")
        cols["mc_return"].extend(float(x) for x in discounted_returns(rewards, 0.95))
    save_dataset(Dataset.from_dict(cols, features=FEATURES), path, {"source": "bench_memory"})
    return len(cols["traj_id"])


def make_cache(path: Path, rows: int, cands: int, dim: int, shard_rows: int) -> int:
    """Random fp16 features written shard by shard; returns the feature bytes (state + actions)."""
    import torch

    g = torch.Generator().manual_seed(0)
    with staged_dir(path, overwrite=True) as tmp:
        shards = []
        for i, start in enumerate(range(0, rows, shard_rows)):
            n = min(shard_rows, rows - start)
            # Sampled in fp16 directly: no fp32 copy of a shard, and ~10x faster than randn().half().
            state = torch.empty(n, dim, dtype=torch.float16).normal_(generator=g)
            actions = torch.empty(n, cands, dim, dtype=torch.float16).normal_(generator=g)
            shards.append(write_shard(tmp, i, start, state, actions))
            del state, actions
        meta = {"num_rows": rows, "num_candidates": cands, "state_dim": dim, "action_dim": dim,
                "dtype": "float16", "dataset": "", "dataset_fingerprint": "", "model": "synthetic",
                "layer": -1, "rendering": "text", "shards": shards}  # fmt: skip
        write_manifest(tmp, meta)
    return rows * (1 + cands) * dim * 2


def _poll(pid: int, samples: list[tuple[float, int]], stop: threading.Event) -> None:
    t0 = time.perf_counter()
    while not stop.is_set():
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        samples.append((time.perf_counter() - t0, int(line.split()[1]) * 1024))
        except OSError:
            return
        time.sleep(0.05)


# Runs a module as ``python -m`` would and, at exit, writes this process's VmHWM (peak RSS of its own
# address space) to $DIGIQ_BENCH_HWM. ru_maxrss is not used as the measure: on Linux it carries the RSS the
# forked child inherited from this (larger) benchmark process over exec, which inflates small numbers.
WRAPPER = """
import atexit, os, runpy, sys
def _hwm():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            open(os.environ['DIGIQ_BENCH_HWM'], 'w').write(str(int(line.split()[1]) * 1024))
atexit.register(_hwm)
mod = sys.argv[1]
sys.argv = sys.argv[1:]
if mod != '-':
    runpy.run_module(mod, run_name='__main__', alter_sys=True)
"""


def run_child(
    args: list[str], env: dict[str, str], hwm_file: Path
) -> tuple[int, list[tuple[float, int]], float]:
    """Run ``python -m <args>`` (``args[0] == '-'``: just the imports); returns (peak RSS bytes, timeline, s)."""
    samples: list[tuple[float, int]] = []
    stop = threading.Event()
    env = {**env, "DIGIQ_BENCH_HWM": str(hwm_file)}
    imports = "import torch, datasets, accelerate, digiq.stages.train_critic\n"
    cmd = [sys.executable, "-c", imports + WRAPPER, *args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    th = threading.Thread(target=_poll, args=(proc.pid, samples, stop), daemon=True)
    th.start()
    _, err = proc.communicate()
    stop.set()
    th.join()
    secs = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}):\n{err[-3000:]}")
    peak = int(hwm_file.read_text())
    return peak, samples, secs


def meta_report() -> str:
    """Markdown: each real-size model's facts, the image tokens of phone screens (the processors' own resize),
    then each stage's per-GPU estimate by component, Qwen2-VL at its checkpoint's and at digiq's max_pixels."""
    from digiq.training.memory import QWEN2_VL_SHIPPED_MAX_PIXELS, REAL_MODELS, memory_table, model_facts

    lines = [
        "| model | parameters | vision + projector | FSDP wraps | LoRA r=128 params |",
        "|---|---|---|---|---|",
    ]
    for name in REAL_MODELS:
        f = model_facts(name)
        lines.append(
            f"| {name} | {f.params / 1e9:.3f}B | {f.vision_params / 1e6:.0f}M | {', '.join(f.wrap_classes)} "
            f"| {f.lora_params / 1e6:.0f}M |"
        )
    lines += [
        "",
        "| model | max_pixels | screen | image tokens (LM) | vision tokens (tower) |",
        "|---|---|---|---|---|",
    ]
    for name, m in REAL_MODELS.items():
        for max_pixels in (None, QWEN2_VL_SHIPPED_MAX_PIXELS) if name.startswith("qwen") else (None,):
            for screen in ((1080, 2400), (1440, 3120)):
                image, vision = m.tokens(*screen, max_pixels=max_pixels)
                budget = "checkpoint's" if max_pixels is None else f"{max_pixels:,}"
                lines.append(f"| {name} | {budget} | {screen[0]} x {screen[1]} | {image:,} | {vision:,} |")
    rows = memory_table() + memory_table(("qwen2-vl-7b",), max_pixels=QWEN2_VL_SHIPPED_MAX_PIXELS)
    skip = ("model", "stage", "total", "image_tokens")
    parts = list(dict.fromkeys(k for r in rows for k in r if k not in skip))
    lines += [
        "",
        "| model | image tokens | stage | " + " | ".join(parts) + " | total GiB / GPU |",
        "|---" * (len(parts) + 4) + "|",
    ]
    for r in rows:
        cells = " | ".join(f"{r[k]:.1f}" if k in r else "" for k in parts)
        lines.append(
            f"| {r['model']} | {r['image_tokens']:,} | {r['stage']} | {cells} | **{r['total']:.1f}** |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--scale", type=float, default=1.0, help="fraction of the 1296 trajectories (0.125 = 1/8)"
    )
    ap.add_argument("--workdir", default="/tmp/digiq_bench_memory", help="where the synthetic data goes")
    ap.add_argument("--steps", type=int, default=10, help="train-critic optimiser steps")
    ap.add_argument("--shard-rows", type=int, default=1024)
    ap.add_argument("--keep", action="store_true", help="keep the synthetic data (reuse with --reuse)")
    ap.add_argument("--reuse", action="store_true", help="reuse data already in --workdir")
    ap.add_argument("--json", default="", help="also write the result to this JSON file")
    ap.add_argument(
        "--meta",
        action="store_true",
        help="estimate 7B-model memory per stage instead (digiq.training.memory)",
    )
    args = ap.parse_args()
    if args.meta:
        print(meta_report())
        return

    work = Path(args.workdir)
    num_traj = max(2, round(TRAJ * args.scale))
    rows = num_traj * STEPS
    data, feats, out = work / "dataset", work / "features", work / "critic"
    t0 = time.perf_counter()
    if not (args.reuse and (feats / "_COMPLETE").exists() and (data / "_COMPLETE").exists()):
        make_dataset(data, num_traj, STEPS, CANDS)
        make_cache(feats, rows, CANDS, DIM, args.shard_rows)
    feature_bytes = rows * (1 + CANDS) * DIM * 2
    prep = time.perf_counter() - t0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}

    # Fixed overhead: the same interpreter with the same imports and no data.
    baseline, _, _ = run_child(["-"], env, work / "hwm_baseline")

    cmd = [
        "digiq", "train-critic", f"dataset={data}", f"features={feats}",
        f"output_dir={out}", "overwrite=true", "epochs=1", f"steps_per_epoch={args.steps}", "batch_size=128",
        "device=cpu", "wandb.mode=disabled", "log_every=5", "eval_batch_size=1024",
    ]  # fmt: skip
    peak, samples, secs = run_child(cmd, env, work / "hwm_train")
    res = {
        "scale": args.scale,
        "rows": rows,
        "feature_bytes": feature_bytes,
        "feature_gb": feature_bytes / 1e9,
        "peak_rss_gb": peak / 1e9,
        "baseline_rss_gb": baseline / 1e9,
        "peak_over_features": peak / feature_bytes,
        "peak_minus_baseline_over_features": (peak - baseline) / feature_bytes,
        "target_met": peak < 1.5 * feature_bytes,
        "train_critic_seconds": secs,
        "prepare_seconds": prep,
        "rss_timeline_gb": [
            (round(t, 1), round(s / 1e9, 3)) for t, s in samples[:: max(1, len(samples) // 40)]
        ],
    }
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
