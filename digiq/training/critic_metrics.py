"""train-critic's validation metrics: TD error and return correlations on the held-out rows, and, where the
dataset's environment has an exact Q* (the registry's ``q_star`` capability: the simulated device), how the
critic ranks each state's candidates against it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from digiq.data.transitions import Transitions
from digiq.envs.registry import EnvSpec
from digiq.errors import DigiqError
from digiq.models.critic import Critic
from digiq.models.critic_text import score
from digiq.training.critic_data import StagedTensors
from digiq.utils.logging import get_logger
from digiq.utils.stats import pearson, spearman

log = get_logger(__name__)

# q_star_fn(state_key, candidate_action_strings, gamma) -> exact Q* per candidate (np.ndarray (N,)).
QStarFn = Callable[[str, list[str], float], np.ndarray]


def q_star_table(
    tr: Transitions, rows: np.ndarray, num_candidates: int, gamma: float, q_star_fn: QStarFn
) -> tuple[np.ndarray, np.ndarray]:
    """Exact Q* for every candidate of the simulated rows among ``rows``: (row ids (M,), Q* (M, N))."""
    keep, table = [], []
    for r in rows.tolist():
        cands = tr.candidates[r]
        if not tr.state_key[r] or len(cands) != num_candidates or num_candidates < 2:
            continue
        table.append(np.asarray(q_star_fn(tr.state_key[r], list(cands), gamma), dtype=np.float64))
        keep.append(r)
    if not keep:
        return np.zeros(0, np.int64), np.zeros((0, num_candidates))
    return np.asarray(keep, dtype=np.int64), np.stack(table)


class QStarSet:
    """The validation rows that have an exact Q*, their Q* table and their screens."""

    def __init__(
        self, rows: np.ndarray | None = None, table: np.ndarray | None = None, groups: list[str] | None = None
    ) -> None:
        self.rows, self.table, self.groups = rows, table, groups

    @classmethod
    def build(
        cls,
        tr: Transitions,
        val_rows: np.ndarray,
        num_candidates: int,
        gamma: float,
        q_star_fn: QStarFn | None,
        env: EnvSpec,
    ) -> QStarSet:
        """Rows with a state key and all ``num_candidates`` candidates, scored by ``q_star_fn`` (None: the exact
        Q* of ``env``, the dataset's environment) and grouped by ``env``'s screens. Empty where no row
        qualifies, or there is no exact Q*, or the keys are not the environment's."""
        N = num_candidates
        sim_rows = [r for r in val_rows.tolist() if tr.state_key[r] and len(tr.candidates[r]) == N and N >= 2]
        if not sim_rows or (q_star_fn is None and env.q_star is None):
            return cls()
        try:
            world = env.open() if env.q_star is not None or env.screen is not None else None
            fn = q_star_fn or env.q_star(world)  # type: ignore[misc]
            rows, table = q_star_table(tr, np.asarray(sim_rows), N, gamma, fn)
            screen_of = env.screen(world) if env.screen is not None else None
            return cls(rows, table, screens(screen_of, [tr.state_key[int(r)] for r in rows]))
        except Exception as e:  # noqa: BLE001 - a metric source must not kill the training run
            log.warning("exact Q* unavailable for these state keys (%s): skipping the Q* metrics", e)
            return cls()


@torch.no_grad()
def validation_metrics(
    critic: Critic,
    data: StagedTensors,
    rows: np.ndarray,
    gamma: float,
    eval_batch_size: int,
    qstar: QStarSet | None = None,
) -> dict[str, float]:
    """Validation metrics on ``rows`` with the online critic (twin-aggregated); ``qstar`` adds the ranking
    against the exact Q* (:func:`qstar_metrics`), per screen where its rows are the simulator's."""
    critic.eval()
    out: dict[str, float] = {}
    if len(rows) == 0:
        return out
    q_sa, v_s, td = [], [], []
    inputs = data.critic_inputs()
    for i in range(0, len(rows), eval_batch_size):
        idx = torch.as_tensor(rows[i : i + eval_batch_size], device=data.state.device)
        q, v = score(critic, inputs, idx, 0)
        _, v_next = score(critic, inputs, data.next_idx[idx], 0)
        td.append(q - (data.reward[idx] + gamma * (1 - data.done[idx]) * v_next))
        q_sa.append(q)
        v_s.append(v)
    q_np = torch.cat(q_sa).cpu().double().numpy()
    v_np = torch.cat(v_s).cpu().double().numpy()
    td_np = torch.cat(td).cpu().double().numpy()
    mc = data.mc_return[torch.as_tensor(rows, device=data.mc_return.device)].cpu().double().numpy()
    out["val/td_error"] = float(np.mean(td_np**2))
    out["val/q_mc_mse"] = float(np.mean((q_np - mc) ** 2))
    out["val/q_mc_pearson"] = pearson(q_np, mc)
    out["val/v_mc_pearson"] = pearson(v_np, mc)
    out["val/q_mean"] = float(q_np.mean())
    out["val/mc_mean"] = float(mc.mean())
    if qstar is not None and qstar.rows is not None and qstar.table is not None and len(qstar.rows):
        out.update(qstar_metrics(critic, data, qstar.rows, qstar.table, eval_batch_size, qstar.groups))
    return out


@torch.no_grad()
def qstar_metrics(
    critic: Critic,
    data: StagedTensors,
    rows: np.ndarray,
    qstar: np.ndarray,
    eval_batch_size: int,
    groups: Sequence[str] | None = None,
) -> dict[str, float]:
    """Top-1 agreement of argmax_i Q(s, a_i) with the Q*-optimal set, and mean Spearman(Q, Q*) per state.

    Padding candidates (``valid`` False) are excluded. A state whose Q* (or Q) is constant over its
    candidates has no defined Spearman and is left out of that mean (its count is reported).
    """
    chunk = max(1, eval_batch_size // max(1, data.actions.shape[1]))
    qs = []
    for i in range(0, len(rows), chunk):
        idx = torch.as_tensor(rows[i : i + chunk], device=data.actions.device)
        qs.append(score(critic, data.critic_inputs(), idx, slice(None))[0].cpu())
    q = torch.cat(qs).double().numpy()  # (M, N)
    valid = (
        np.ones_like(q, dtype=bool)
        if data.valid is None
        else data.valid[torch.as_tensor(rows, device=data.valid.device)].cpu().numpy()
    )
    return candidate_ranking(q, qstar, valid, groups)[0]


def candidate_ranking(
    q: np.ndarray, qstar: np.ndarray, valid: np.ndarray | None = None, groups: Sequence[str] | None = None
) -> tuple[dict[str, float], np.ndarray]:
    """Ranking of scores ``q`` (M, N) against reference values ``qstar`` (M, N) over the valid candidates:
    the metrics of :func:`qstar_metrics` and, per state, whether argmax ``q`` is a (tied) maximiser of
    ``qstar`` (M,) bool. Index 0 is the dataset action. ``groups`` (M names) adds ``val/qstar_top1/<name>``:
    the top-1 agreement within each group (on the simulator, per screen: where the critic ranks badly)."""
    if valid is None:
        valid = np.ones_like(q, dtype=bool)
    agree, behaviour, chance, rhos = [], [], [], []
    for j in range(len(q)):
        m = valid[j]
        qj, sj = q[j][m], qstar[j][m]
        best = sj >= sj.max() - 1e-6
        agree.append(bool(best[int(np.argmax(qj))]))
        behaviour.append(bool(best[0]))  # index 0 = the dataset action
        chance.append(best.mean())
        rho = spearman(qj, sj)
        if not math.isnan(rho):
            rhos.append(rho)
    metrics = {
        "val/qstar_top1_agreement": float(np.mean(agree)),
        "val/qstar_spearman": float(np.mean(rhos)) if rhos else float("nan"),
        "val/qstar_states": float(len(q)),
        "val/qstar_spearman_states": float(len(rhos)),
        # Context: how often the dataset action / a uniformly random candidate is Q*-optimal.
        "val/qstar_dataset_action_optimal": float(np.mean(behaviour)),
        "val/qstar_random_optimal": float(np.mean(chance)),
    }
    if groups is not None:
        if len(groups) != len(q):
            raise ValueError(f"{len(groups)} group names for {len(q)} states")
        hits: dict[str, list[bool]] = {}
        for g, a in zip(groups, agree):
            hits.setdefault(g, []).append(a)
        metrics.update({f"val/qstar_top1/{g}": float(np.mean(v)) for g, v in sorted(hits.items())})
    return metrics, np.asarray(agree, dtype=bool)


def screens(screen_of: Callable[[str], str] | None, state_keys: Sequence[str]) -> list[str] | None:
    """The screen of each state key (``home``, ``search``, ...) by an environment's ``screen`` capability;
    None where there is none or a key is not the environment's (e.g. a hand-made MDP's)."""
    if screen_of is None:
        return None
    try:
        return [screen_of(k) for k in state_keys]
    except (ValueError, DigiqError):
        return None
