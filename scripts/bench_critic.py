"""Critic training throughput: samples/s and achieved matmul FLOP/s vs the machine's own torch.mm speed.

    python scripts/bench_critic.py                         # defaults: Digi-Q-sized features, CPU
    python scripts/bench_critic.py --device cuda --dtype bf16 --batch 4096 --feat 4096 --hidden 2048 2048

Runs the real training step of ``digiq train-critic`` (``train_step``: TD loss, backward, grad clipping,
foreach Adam, target EMA) on random features held in memory, then times ``torch.mm`` alone at every GEMM
shape that step performs and reports achieved / measured.

FLOP count per step (T twins, batch B, layer l with shape in_l x out_l, one multiply-add = 2 FLOPs):
- online Q on f(s,a) and online V on f(s): forward 2*B*in*out per layer; backward computes grad-weight
  (2*B*in*out) for every layer and grad-input (2*B*in*out) for every layer but the first (its input is a
  feature, no gradient) -> 6*B*in*out per hidden/output layer, 4*B*in*out for the first layer;
- target V on f(s') and target Q on f(s,a'): forward only, 2*B*in*out per layer.
Bias adds, LayerNorm, ReLU, the loss and Adam are elementwise and not counted (they are reported as the
gap between the matmul-only time and the step time).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from digiq.models.critic import Critic, CriticArch, make_target
from digiq.stages import train_critic as tc


def layer_shapes(in_dim: int, hidden: list[int]) -> list[tuple[int, int]]:
    dims = [in_dim, *hidden, 1]
    return list(zip(dims[:-1], dims[1:]))


def step_gemms(B: int, T: int, q_shapes, v_shapes) -> list[tuple[int, int, int, str]]:
    """Every GEMM (m, k, n, role) of one training step, per twin (repeat T times)."""
    gemms = []
    for shapes in (q_shapes, v_shapes):
        for i, (d_in, d_out) in enumerate(shapes):
            gemms.append((B, d_in, d_out, "fwd"))  # online forward
            gemms.append((d_in, B, d_out, "bwd-weight"))  # grad W = x^T @ grad_out
            if i > 0:
                gemms.append((B, d_out, d_in, "bwd-input"))  # grad x = grad_out @ W^T
            gemms.append((B, d_in, d_out, "target-fwd"))  # target forward (V on s', Q on a')
    return [g for g in gemms for _ in range(T)]


def gemm_flops(gemms) -> int:
    return sum(2 * m * k * n for m, k, n, _ in gemms)


def time_fn(fn, device: str, iters: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def measure_mm(gemms, device: str, dtype: torch.dtype, iters: int) -> float:
    """Seconds torch.mm needs for the step's GEMM list (each distinct shape timed once, then summed)."""
    per_shape: dict[tuple[int, int, int], float] = {}
    for m, k, n, _ in gemms:
        if (m, k, n) in per_shape:
            continue
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        out = torch.empty(m, n, device=device, dtype=dtype)
        per_shape[(m, k, n)] = time_fn(lambda a=a, b=b, out=out: torch.mm(a, b, out=out), device, iters)
    return sum(per_shape[(m, k, n)] for m, k, n, _ in gemms), per_shape


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast for the heads")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--feat", type=int, default=1024, help="feature width of f(s) and f(s,a)")
    ap.add_argument("--hidden", type=int, nargs="+", default=[1024, 1024])
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating step / mm timing rounds (best kept)")
    ap.add_argument("--no-layer-norm", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = leave)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)

    R, N, D, B = args.rows, args.candidates, args.feat, args.batch
    data = tc.DeviceData(
        state=torch.randn(R, D, device=dev),
        actions=torch.randn(R, N, D, device=dev),
        valid=None,
        reward=(torch.rand(R, device=dev) < 0.1).float(),
        done=(torch.rand(R, device=dev) < 0.1).float(),
        mc_return=torch.rand(R, device=dev),
        next_idx=torch.randint(R, (R,), device=dev),
    )
    arch = CriticArch(D, D, tuple(args.hidden), tuple(args.hidden), layer_norm=not args.no_layer_norm)
    critic = Critic(arch).to(dev)
    target = make_target(critic)
    cfg = tc.Config(dataset="x", features="x", batch_size=B)
    opt = torch.optim.Adam(critic.parameters(), lr=1e-4, foreach=True, fused=None)
    autocast = (lambda: torch.autocast(dev, dtype=torch.bfloat16)) if args.dtype == "bf16" else None

    gen = torch.Generator(device=dev).manual_seed(0)
    idxs = [torch.randint(R, (B,), device=dev, generator=gen) for _ in range(8)]
    state = {"i": 0}

    def step() -> None:
        idx = idxs[state["i"] % len(idxs)]
        state["i"] += 1
        kw = {"autocast": autocast} if autocast else {}
        tc.train_step(critic, critic, target, opt, data, idx, cfg, None, **kw)

    T = arch.num_twins
    gemms = step_gemms(B, T, layer_shapes(D, args.hidden), layer_shapes(D, args.hidden))
    flops = gemm_flops(gemms)
    # Interleave the two measurements and keep the best round of each: on a shared machine the load
    # changes between seconds, and a ratio of two timings taken minutes apart would mostly measure that.
    step_s, mm_s, per_shape = float("inf"), float("inf"), {}
    for _ in range(args.rounds):
        step_s = min(step_s, time_fn(step, dev, args.steps, warmup=2))
        t, shapes = measure_mm(gemms, dev, dtype, 3)
        if t < mm_s:
            mm_s, per_shape = t, shapes
    params = sum(p.numel() for p in critic.parameters())
    achieved, mm_rate = flops / step_s, flops / mm_s
    res = {
        "device": dev if dev == "cpu" else torch.cuda.get_device_name(),
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "batch": B,
        "feat": D,
        "hidden": args.hidden,
        "params": params,
        "step_ms": step_s * 1e3,
        "samples_per_s": B / step_s,
        "flops_per_sample": flops / B,
        "flops_per_sample_over_params": flops / B / params,
        "achieved_tflops": achieved / 1e12,
        "mm_only_ms": mm_s * 1e3,
        "mm_tflops_at_step_shapes": mm_rate / 1e12,
        "fraction_of_mm_throughput": achieved / mm_rate,
    }
    print(
        f"device {res['device']} ({res['threads']} threads), {args.dtype}, batch {B}, feat {D}, hidden {args.hidden}"
    )
    print(f"  critic params {params / 1e6:.2f}M (2 Q + 2 V twins), {flops / B / 1e6:.1f} MFLOP/sample "
          f"= {flops / B / params:.2f} x params")  # fmt: skip
    print(f"  train step {step_s * 1e3:.2f} ms -> {B / step_s:,.0f} samples/s, {achieved / 1e12:.3f} TFLOP/s")
    print(f"  torch.mm alone at the same GEMMs: {mm_s * 1e3:.2f} ms -> {mm_rate / 1e12:.3f} TFLOP/s")
    print(f"  fraction of measured matmul throughput: {achieved / mm_rate:.1%}")
    for (m, k, n), t in sorted(per_shape.items()):
        print(f"    mm {m}x{k} @ {k}x{n}: {2 * m * k * n / t / 1e12:.3f} TFLOP/s")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
