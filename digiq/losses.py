"""Critic losses as pure, shape-checked functions.

Every argument of a loss must have exactly the same shape: ``(B,)`` for one head, or ``(B, T)`` for T twin
heads (broadcast the per-transition reward / done / return to ``(B, T)`` explicitly at the call site). The
official MC ablation regressed ``(B, 1)`` outputs on ``(B,)`` returns, which broadcasts to a ``(B, B)``
error matrix and trains every prediction toward the batch-mean return (DigiRL-agent/digiq @ 8181379,
``digiq/algorithms/digiq/trainer.py:158-176``); these functions raise instead.

Reduction: mean over the batch (dim 0), **sum** over any trailing dims, so ``(B, 2)`` twin predictions give
the official total ``MSE(q1) + MSE(q2)`` (``trainer.py:189``) and ``(B,)`` gives a plain MSE.
"""

from __future__ import annotations

import torch


class ShapeError(ValueError):
    """Loss inputs whose shapes differ (would silently broadcast)."""


def _check(name: str, pred: torch.Tensor, **others: torch.Tensor) -> None:
    if pred.dim() == 0:
        raise ShapeError(f"{name}: predictions must have a batch dimension, got a scalar")
    for key, t in others.items():
        if tuple(t.shape) != tuple(pred.shape):
            raise ShapeError(
                f"{name}: {key} has shape {tuple(t.shape)} but the prediction has {tuple(pred.shape)}; "
                "shapes must match exactly (no broadcasting: a (B,1) vs (B,) pair would become (B,B))"
            )


def _reduce(sq: torch.Tensor) -> torch.Tensor:
    return sq.sum() / sq.shape[0]


def td_target(reward: torch.Tensor, done: torch.Tensor, v_next: torch.Tensor, gamma: float) -> torch.Tensor:
    """``r + gamma * (1 - d) * V(s')`` (same shapes in, same shape out)."""
    _check("td_target", reward, done=done, v_next=v_next)
    return reward + gamma * (1.0 - done.to(reward.dtype)) * v_next


def td_q_loss(
    q_pred: torch.Tensor, reward: torch.Tensor, done: torch.Tensor, v_next_target: torch.Tensor, gamma: float
) -> torch.Tensor:
    """J_Q = (Q(s,a) - r - gamma (1 - d) V_targ(s'))^2; the target carries no gradient."""
    _check("td_q_loss", q_pred, reward=reward, done=done, v_next_target=v_next_target)
    target = td_target(reward, done, v_next_target, gamma).detach()
    return _reduce((q_pred - target) ** 2)


def td_v_loss(v_pred: torch.Tensor, q_target: torch.Tensor) -> torch.Tensor:
    """J_V = (V(s) - Q_targ(s, a'))^2 with a' the backup action (in-sample, as the official code)."""
    _check("td_v_loss", v_pred, q_target=q_target)
    return _reduce((v_pred - q_target.detach()) ** 2)


def mc_loss(pred: torch.Tensor, mc_return: torch.Tensor) -> torch.Tensor:
    """(pred - sum_k gamma^k r_{t+k})^2: the MC-regression ablation, without the broadcast bug."""
    _check("mc_loss", pred, mc_return=mc_return)
    return _reduce((pred - mc_return.detach()) ** 2)


def noop_q_loss(
    q_pred: torch.Tensor, v_state_target: torch.Tensor, gamma: float, weight: torch.Tensor
) -> torch.Tensor:
    """(Q(s, a) - gamma V_targ(s))^2 for actions that leave the screen as it was (s' = s, r = 0), weighted
    per row by ``weight`` (0 = the row has no such action); mean over the batch, sum over twins."""
    _check("noop_q_loss", q_pred, v_state_target=v_state_target, weight=weight)
    return _reduce(weight * (q_pred - gamma * v_state_target.detach()) ** 2)


def conservative_penalty(
    q_candidates: torch.Tensor, q_data: torch.Tensor, valid: torch.Tensor | None, temperature: float
) -> torch.Tensor:
    """CQL's regulariser over a finite candidate set (Kumar et al. 2020, Eq. 4, with the sampled candidates as
    the action set): ``tau * logsumexp_j(Q(s, a_j) / tau) - Q(s, a_data)``, mean over the batch, summed over
    any twin dim.

    ``q_candidates`` (B, N) or (B, N, T) over every stored candidate of the row (the dataset action
    included), ``q_data`` (B,) or (B, T) the dataset action's, ``valid`` (B, N) bool or None (all valid).
    Minimising it lowers Q where no episode recorded an outcome and raises it on the executed action.
    """
    if q_candidates.dim() < 2:
        raise ShapeError(
            f"conservative_penalty: q_candidates must be (B, N[, T]), got {tuple(q_candidates.shape)}"
        )
    _check("conservative_penalty", q_data, q_candidates_column=q_candidates.select(1, 0))
    if temperature <= 0:
        raise ValueError(f"conservative_penalty: temperature must be > 0, got {temperature}")
    scaled = q_candidates / temperature
    if valid is not None:
        if tuple(valid.shape) != tuple(q_candidates.shape[:2]):
            raise ShapeError(
                f"conservative_penalty: valid has shape {tuple(valid.shape)}, expected {tuple(q_candidates.shape[:2])}"
            )
        mask = valid.reshape(*valid.shape, *([1] * (q_candidates.dim() - 2)))
        scaled = scaled.masked_fill(~mask, float("-inf"))
    soft_max = temperature * torch.logsumexp(scaled, dim=1)
    return _reduce(soft_max - q_data)
