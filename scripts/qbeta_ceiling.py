"""Where does the critic's ranking error come from: the algorithm or the function approximation?

Digi-Q's critic backs V up from the dataset action (a SARSA-style in-sample backup), so a perfect critic
converges to the behaviour policy's own Q^beta, not to Q*. On the simulated device both are exact
(:class:`digiq.sim.behaviour.BehaviourValues`, :meth:`digiq.sim.phone.SimPhone.q_star`), which splits the
critic's top-1 agreement with argmax Q* into two parts on the critic's validation states:

* **algorithm**: argmax_i Q^beta(s, a_i) against the Q*-optimal candidates (a perfect Digi-Q critic);
* **approximation**: each trained critic's argmax against argmax Q^beta (its own target) and against Q*.

With ``--ns`` it also scores Best-of-N's imitation targets per N (the first N candidates, advantage
threshold as extract-policy): the fraction of states kept and the fraction of kept targets that are
Q*-optimal actions of the state (precision), for each critic and for Q^beta itself.

    PYTHONPATH=. python scripts/qbeta_ceiling.py --dataset runs/pipeline/data_candidates \\
        --critic runs/pipeline/critic/critic --features runs/pipeline/features

Simulated data only (it needs ``state_key``). Q^beta is estimated by sampling ``--samples`` behaviour
actions per state of each task's graph (about a minute per 10 tasks at 100 samples on 2 cores).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import numpy as np
import torch

from digiq.actions import parse_action
from digiq.data.features import FeatureCache
from digiq.data.schema import split_by_trajectory
from digiq.data.transitions import load_transitions
from digiq.models.critic import load_critic
from digiq.models.policy import best_of_n
from digiq.sim import layout as L
from digiq.sim.behaviour import BehaviourValues
from digiq.sim.phone import SimPhone
from digiq.training.critic_metrics import candidate_ranking


def ranking(scores: np.ndarray, reference: np.ndarray) -> tuple[dict[str, float], np.ndarray]:
    """train-critic's Q* ranking metrics of ``scores`` against ``reference`` (all candidates valid)."""
    return candidate_ranking(scores.astype(np.float64), reference.astype(np.float64))


def targets(
    name: str, q: torch.Tensor, v: torch.Tensor, qs: np.ndarray, vstar: np.ndarray, n: int, threshold: float
) -> dict[str, float]:
    """Best-of-N over the first ``n`` candidates scored by (q, v): kept fraction and target precision."""
    valid = torch.ones(q.shape[0], n, dtype=torch.bool)
    index, _, keep = best_of_n(q[:, :n].float(), v.float(), valid, threshold)
    k = keep.numpy()
    chosen = qs[np.arange(len(qs)), index.numpy()]
    optimal = chosen >= vstar - 1e-6
    return {
        f"{name}: N={n} kept": float(k.mean()),
        f"{name}: N={n} kept targets Q*-optimal (precision)": float(optimal[k].mean()) if k.any() else 0.0,
        f"{name}: N={n} states with an optimal target (recall)": float((k & optimal).mean()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True, help="a simulated dataset with candidates")
    ap.add_argument("--critic", nargs="*", default=[], help="trained critic folders (<train-critic>/critic)")
    ap.add_argument("--features", nargs="*", default=[], help="the feature cache of each --critic")
    ap.add_argument("--val-fraction", type=float, default=0.2, help="as train-critic (last 20%% validate)")
    ap.add_argument("--gamma", type=float, default=0.95)
    ap.add_argument("--samples", type=int, default=100, help="behaviour actions sampled per graph state")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ns", type=int, nargs="*", default=[], help="Best-of-N target precision at these N")
    ap.add_argument("--threshold", type=float, default=0.10, help="extract-policy's advantage threshold")
    ap.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = ap.parse_args()
    if len(args.critic) != len(args.features):
        ap.error("give one --features cache per --critic")

    tr, ds = load_transitions(args.dataset, args.gamma)
    _, val = split_by_trajectory(ds, args.val_fraction)
    rows = [r for r in val.tolist() if tr.state_key[r] and len(tr.candidates[r]) >= 2]
    if not rows:
        raise SystemExit(f"{args.dataset}: no simulated validation states with candidates")
    phone = SimPhone()
    bv = BehaviourValues(phone, args.gamma, samples=args.samples, seed=args.seed)
    qs = np.stack([phone.q_star(tr.state_key[r], list(tr.candidates[r]), args.gamma) for r in rows])
    qb = np.stack([bv.q(tr.state_key[r], list(tr.candidates[r])) for r in rows])
    data_m, _ = ranking(qb, qs)
    out: dict[str, float] = {
        "states": len(rows),
        "dataset_action_top1_vs_qstar": data_m["val/qstar_dataset_action_optimal"],
        "random_candidate_top1_vs_qstar": data_m["val/qstar_random_optimal"],
        "qbeta_top1_vs_qstar": data_m["val/qstar_top1_agreement"],
        "qbeta_spearman_vs_qstar": data_m["val/qstar_spearman"],
    }
    vstar = np.array([phone.v_star(tr.state_key[r], args.gamma) for r in rows])
    vb = np.array([bv.v(tr.state_key[r]) for r in rows])
    for n in args.ns:
        out.update(targets("Q^beta", torch.as_tensor(qb), torch.as_tensor(vb), qs, vstar, n, args.threshold))
    for critic_dir, feats in zip(args.critic, args.features):
        critic, cache = load_critic(critic_dir), FeatureCache.open(feats)
        with torch.no_grad():
            q = critic.q(cache.actions[rows].float()).numpy()
            v = critic.v(cache.state[rows].float())
        for n in args.ns:
            out.update(targets(critic_dir, torch.as_tensor(q), v, qs, vstar, n, args.threshold))
        m_star, ok = ranking(q, qs)
        m_beta, _ = ranking(q, qb)
        out[f"{critic_dir}: top1_vs_qstar"] = m_star["val/qstar_top1_agreement"]
        out[f"{critic_dir}: top1_vs_qbeta"] = m_beta["val/qstar_top1_agreement"]
        out[f"{critic_dir}: spearman_vs_qbeta"] = m_beta["val/qstar_spearman"]
        # Where the misses are: screen of the state, and what the critic's choice hits.
        misses: Counter[str] = Counter()
        for j, r in enumerate(rows):
            if not ok[j]:
                s = phone.state_from_key(tr.state_key[r])
                act = parse_action(tr.candidates[r][int(q[j].argmax())])
                what = act.type.name
                if act.is_tap and act.touch is not None:
                    what = "tap on a widget" if L.hit(s, act.touch) is not None else "tap on nothing"
                misses[f"{s.screen} / {what}"] += 1
        for k, n in misses.most_common(6):
            out[f"{critic_dir}: misses on {k}"] = n / len(rows)
    for k, v in out.items():
        print(f"{k:60s} {v:.3f}" if isinstance(v, float) else f"{k:60s} {v}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
