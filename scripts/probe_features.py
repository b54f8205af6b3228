"""How much candidate-ranking information do cached features hold? A supervised probe against exact Q*.

A TD or MC critic learns Q only from the dataset action of each state and must generalise to the other
N-1 candidates through the features. This probe is the optimistic view: the same twin MLP heads, trained
by regression on the simulator's *exact* Q*(s, a_i) of *every* candidate of the training states, scored
like the critic (top-1 agreement of argmax_i Q with the Q*-optimal set, Spearman per state) on the
validation states. If the probe itself ranks poorly, the features are the bottleneck, not TD vs MC.

Three losses:

* ``--loss mse`` (the default, the first probe): regression on the Q* values. Most of Q*'s variance lies
  *between* states, so the fit spends itself there; at its default budget (1,000 steps of 32 states) a TD
  critic has beaten its top-1 (docs/experiments/2026-12-07-sim-v1.md). Its Spearman is the steadier number.
* ``--loss advantage``: regression on Q* minus the mean Q* of the state's valid candidates, with the
  prediction centred the same way: the MSE of ``mse`` without its between-state part. It is what
  ``critic.q_param=dueling`` gives a TD critic (Q = V(s) + A(s, a)), measured with every label known.
* ``--loss listwise``: a softmax over each state's candidates, trained to put its mass on the Q*-optimal
  ones (-log sum_{i optimal} softmax(Q)_i). This asks exactly what top-1 measures, so it is the better
  view of whether the features *can* rank the candidates given a label for every one.

    PYTHONPATH=. python scripts/probe_features.py --dataset runs/pipeline/data_candidates \
        --features runs/pipeline/features runs/ablation/features_pre_stage1 --seeds 0 1 2
    PYTHONPATH=. python scripts/probe_features.py --loss listwise --steps 2000 --batch-size 64 --hidden 1024 \
        --dataset runs/pipeline/data_candidates --features runs/pipeline/features --seeds 0 1 2

Simulated data only (it needs ``state_key`` and the device's Q*).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from digiq.data.features import FeatureCache
from digiq.data.schema import split_by_trajectory
from digiq.data.transitions import load_transitions
from digiq.models.critic import Critic, CriticArch
from digiq.sim.phone import SimPhone
from digiq.training.critic_data import StagedTensors, feature_stats
from digiq.training.critic_metrics import q_star_table, qstar_metrics

LOSSES = ("mse", "advantage", "listwise")


def probe(
    state: torch.Tensor,
    actions: torch.Tensor,
    valid: torch.Tensor | None,
    qstar_train: tuple[np.ndarray, np.ndarray],
    qstar_val: tuple[np.ndarray, np.ndarray],
    steps: int = 1000,
    hidden: int = 512,
    batch_size: int = 32,
    lr: float = 3e-4,
    seed: int = 0,
    loss: str = "mse",
) -> dict[str, float]:
    """Fit twin Q heads on (features of candidate i) -> Q*(s, a_i) for the training states; score on val.

    A step fits all N candidates of ``batch_size`` states (32 x 16 = 512 pairs at the default N).
    ``loss``: ``mse`` (regression on Q*), ``advantage`` (regression on Q* centred per state, prediction
    centred alike) or ``listwise`` (softmax mass on each state's Q*-optimal set).

    ``qstar_*`` are ``(rows (M,), Q* (M, N))`` from :func:`digiq.training.critic_metrics.q_star_table`.
    """
    torch.manual_seed(seed)
    rows_t, q_t = qstar_train
    R, N, _ = actions.shape
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    target = torch.zeros(R, N)
    target[torch.as_tensor(rows_t)] = torch.as_tensor(q_t, dtype=torch.float32)
    mask = torch.ones(R, N, dtype=torch.bool) if valid is None else valid
    # The Q*-optimal valid candidates of each state (ties all count, as in the top-1 metric).
    best = target.masked_fill(~mask, float("-inf")).amax(1, keepdim=True)
    optimal = mask & (target >= best - 1e-6)
    arch = CriticArch(
        state_dim=state.shape[1], action_dim=actions.shape[2], q_hidden=(hidden, hidden), v_hidden=(16,)
    )
    critic = Critic(arch)
    train = torch.as_tensor(rows_t)
    critic.set_normalization(*feature_stats(state, train), *feature_stats(actions, train))
    opt = torch.optim.Adam(critic.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = train[torch.randint(len(train), (batch_size,), generator=g)]
        q = critic.q_all(actions[idx].float())  # (B, N, twins)
        if loss in ("mse", "advantage"):
            m = mask[idx].unsqueeze(-1).float()
            t = target[idx].unsqueeze(-1)
            if loss == "advantage":  # both sides minus their mean over the state's valid candidates
                count = m.sum(1, keepdim=True).clamp_min(1)
                t = t - (t * m).sum(1, keepdim=True) / count
                q = q - (q * m).sum(1, keepdim=True) / count
            value = ((q - t) ** 2 * m).sum() / m.sum().clamp_min(1) / q.shape[-1]
        else:
            m, o = mask[idx].unsqueeze(-1), optimal[idx].unsqueeze(-1)
            logp = torch.log_softmax(q.masked_fill(~m, float("-inf")), dim=1)
            value = -torch.logsumexp(logp.masked_fill(~o, float("-inf")), dim=1).mean()
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
    critic.eval()
    data = StagedTensors(
        state=state,
        actions=actions.float(),
        valid=valid,
        reward=torch.zeros(R),
        done=torch.ones(R),
        mc_return=torch.zeros(R),
        next_idx=torch.arange(R),
    )
    rows_v, q_v = qstar_val
    return qstar_metrics(critic, data, rows_v, q_v, eval_batch_size=4096)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True, help="dataset with candidates (digiq candidates output)")
    ap.add_argument("--features", nargs="+", required=True, help="one or more feature caches of that dataset")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--loss", choices=LOSSES, default="mse", help="see the module doc")
    ap.add_argument("--batch-size", type=int, default=32, help="states per step (all their candidates)")
    ap.add_argument("--hidden", type=int, default=512, help="width of the two hidden layers")
    ap.add_argument("--gamma", type=float, default=0.95)
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tr, ds = load_transitions(args.dataset, args.gamma)
    train_rows, val_rows = split_by_trajectory(ds, args.val_fraction)
    q_fn = SimPhone().q_star
    results = {}
    for path in args.features:
        cache = FeatureCache.open(path)
        N = cache.num_candidates
        qs_train = q_star_table(tr, train_rows, N, args.gamma, q_fn)
        qs_val = q_star_table(tr, val_rows, N, args.gamma, q_fn)
        runs = [
            probe(
                cache.state.float(),
                cache.actions,
                cache.valid,
                qs_train,
                qs_val,
                args.steps,
                hidden=args.hidden,
                batch_size=args.batch_size,
                seed=s,
                loss=args.loss,
            )
            for s in args.seeds
        ]
        t1 = np.array([r["val/qstar_top1_agreement"] for r in runs])
        sp = np.array([r["val/qstar_spearman"] for r in runs])
        results[path] = {
            "top1_mean": float(t1.mean()),
            "top1_std": float(t1.std()),
            "spearman_mean": float(sp.mean()),
            "spearman_std": float(sp.std()),
            "dataset_action_optimal": runs[0]["val/qstar_dataset_action_optimal"],
            "random_candidate_optimal": runs[0]["val/qstar_random_optimal"],
            "seeds": args.seeds,
            "loss": args.loss,
        }
        print(
            f"{path}: Q*-probe ({args.loss}) top-1 {t1.mean():.3f} +- {t1.std():.3f}, Spearman {sp.mean():.3f} +- {sp.std():.3f} "
            f"(dataset action optimal {runs[0]['val/qstar_dataset_action_optimal']:.3f}, random candidate "
            f"{runs[0]['val/qstar_random_optimal']:.3f})"
        )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
