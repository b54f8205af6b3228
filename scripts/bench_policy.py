"""Time one behaviour-cloning step of the tiny policy: per-step encoding (decode + processor + tokenise, the
old loop) vs rows encoded once (digiq.stages.train_bc.encode_examples), for a model spec and thread count.

    OMP_NUM_THREADS=1 python scripts/bench_policy.py --dataset data/sim [--model tiny:idefics3@image_size=128,patch=16]
        [--batch 32] [--steps 10] [--threads 1]

Prints JSON: seconds per step of each path (median over --steps after one warm-up step) and the split of the
old path into decode / processor / forward+backward.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from digiq.config import ModelConfig
from digiq.data.schema import load_dataset
from digiq.models.policy import (
    PolicySpec,
    build_training_batch,
    collate_encoded,
    format_action,
    policy_logits,
    weighted_nll,
)
from digiq.models.vlm import load_vlm
from digiq.training.policy_loop import PolicyExamples, encode_examples


def main() -> None:

    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="data/sim")
    ap.add_argument("--model", default="tiny:idefics3@image_size=128,patch=16")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, processor = load_vlm(ModelConfig(name_or_path=args.model), for_training=True)
    spec = PolicySpec(family=processor.digiq_family)
    ds = load_dataset(args.dataset)
    n = min(len(ds), args.batch * (args.steps + 1))
    view = ds.select_columns(["screenshot", "observation"])
    actions = ds["action"][:n]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(batch: dict) -> None:
        loss = weighted_nll(policy_logits(model, batch), batch["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad()

    old: dict[str, list[float]] = {"decode": [], "processor": [], "fwd_bwd": [], "total": []}
    for s in range(args.steps + 1):
        idx = list(range(s * args.batch, min(n, (s + 1) * args.batch)))
        t0 = time.perf_counter()
        got = view[idx]
        t1 = time.perf_counter()
        texts = [format_action(actions[i], spec.action_format, spec.precision) for i in idx]
        batch = build_training_batch(processor, got["screenshot"], got["observation"], texts, spec)
        t2 = time.perf_counter()
        step(batch)
        t3 = time.perf_counter()
        if s:
            for k, v in zip(old, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
                old[k].append(v)
    t0 = time.perf_counter()
    ex = PolicyExamples(view, np.arange(n, dtype=np.int64), actions)
    encoded = encode_examples(processor, ex, spec, progress=False)
    encode_s = time.perf_counter() - t0
    new: list[float] = []
    pad = processor.tokenizer.pad_token_id
    for s in range(args.steps + 1):
        t0 = time.perf_counter()
        step(collate_encoded(encoded[s * args.batch : (s + 1) * args.batch], pad))
        if s:
            new.append(time.perf_counter() - t0)
    med = statistics.median
    print(
        json.dumps(
            {
                "model": args.model,
                "batch": args.batch,
                "threads": args.threads,
                "per_step_encoding_s": {k: round(med(v), 4) for k, v in old.items()},
                "pre_encoded_step_s": round(med(new), 4),
                "encode_once_s_per_row": round(encode_s / n, 5),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
