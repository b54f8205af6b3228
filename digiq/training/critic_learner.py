"""The critic as a learner: twin Q/V heads, their EMA target heads, one Adam, and the objectives they train on.

:class:`CriticLearner` owns the online critic, its target copy and the optimiser, and makes one update
(:meth:`CriticLearner.step`: forward, loss, backward, clip, Adam, Polyak update of the target). The
objectives are pure functions of the heads' outputs (built on :mod:`digiq.losses`), so each can be checked
against a hand computation:

* :func:`td_objective`: Digi-Q's Bellman backup (DigiRL-agent/digiq @ 8181379, ``trainer.py:133-176``),
  ``J_Q = (Q_i(s,a) - r - gamma (1-d) V_targ(s'))^2`` and ``J_V = (V_i(s) - Q_targ(s,a'))^2``; with the
  dueling Q (beyond the paper) V backs up ``r + gamma (1-d) V_targ(s')`` instead;
* :func:`mc_objective`: both heads regress on the discounted return (the paper's ablation);
* :func:`backup_targets`: which target head backs up which online head (per-head or twin-aggregated);
* :func:`noop_objective`: the no-op backup ``(Q(s, a) - gamma V_targ(s))^2`` (beyond the paper);
* :func:`digiq.losses.conservative_penalty`: CQL's regulariser over the stored candidates (beyond the paper).

The stage (``digiq train-critic``) is the recipe around it: data, model set-up, loop, checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import torch

from digiq.losses import conservative_penalty, mc_loss, noop_q_loss, td_q_loss, td_target, td_v_loss
from digiq.models.critic import Critic, aggregate_twins, make_target, soft_update
from digiq.models.critic_text import gather
from digiq.training.critic_data import SampledBatch, StagedTensors


@dataclasses.dataclass(frozen=True)
class Objective:
    """What the learner optimises (train-critic's settings of the same names)."""

    # td = Digi-Q's Bellman backup; mc = regression on the discounted return (the paper's ablation).
    loss: Literal["td", "mc"] = "td"
    gamma: float = 0.95
    # EMA rate of the target heads after every optimiser step (official tau = 0.10 per step).
    tau: float = 0.1
    # 'aggregate': both heads backed up from the twin-aggregated target; 'per_head': head i from target i.
    target_pairing: Literal["aggregate", "per_head"] = "aggregate"
    aggregate: Literal["min", "max", "mean"] = "min"
    # Weight of the no-op term against J_Q (used when a batch carries no-op candidates).
    noop_weight: float = 10.0
    # Weight of CQL's regulariser over the stored candidates (0 = off, the paper's critic) and its softmax
    # temperature.
    conservative_weight: float = 0.0
    conservative_temperature: float = 1.0
    # Gradient clipping over the trainable parameters (0 = none).
    max_grad_norm: float = 1.0


def _twins(x: torch.Tensor, num: int) -> torch.Tensor:
    """(B,) -> (B, T) as an explicit expand, so the losses' exact-shape checks hold (no broadcasting)."""
    return x.unsqueeze(-1).expand(-1, num)


def backup_targets(
    v_next_all: torch.Tensor, q_back_all: torch.Tensor, pairing: str, how: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-twin TD targets (B, T) for the online heads from the target heads' (B, T) outputs.

    ``per_head``: twin i gets target twin i's value, unchanged (official ``trainer.py:148-152``);
    ``aggregate``: every twin gets the twin-aggregate (``how``) of the target heads.
    """
    if pairing == "per_head":
        return v_next_all, q_back_all
    if pairing != "aggregate":
        raise ValueError(f"unknown target_pairing {pairing!r}; use per_head or aggregate")
    T = v_next_all.shape[-1]
    v = aggregate_twins(v_next_all, how).unsqueeze(-1).expand(-1, T)
    q = aggregate_twins(q_back_all, how).unsqueeze(-1).expand(-1, T)
    return v, q


def td_objective(
    q: torch.Tensor,
    v: torch.Tensor,
    reward: torch.Tensor,
    done: torch.Tensor,
    v_next: torch.Tensor,
    q_back: torch.Tensor,
    gamma: float,
    dueling: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(J_Q, J_V) for online Q, V (B, T), rewards and done flags (B,) and the paired targets (B, T) of
    :func:`backup_targets`: V_targ(s') and Q_targ(s, a').

    ``dueling``: Q_targ(s, a') = V_targ(s) + A_targ(s, a') would regress V on itself (no anchor), so V
    regresses on its own TD target r + gamma (1-d) V_targ(s'); its fixed point V^beta is that of
    E_{a'~beta} Q^beta(s, a') in the paper's J_V.
    """
    T = q.shape[-1]
    lq = td_q_loss(q.float(), _twins(reward, T), _twins(done, T), v_next, gamma)
    if dueling:
        lv = td_v_loss(v.float(), td_target(_twins(reward, T), _twins(done, T), v_next, gamma))
    else:
        lv = td_v_loss(v.float(), q_back)
    return lq, lv


def mc_objective(
    q: torch.Tensor, v: torch.Tensor, mc_return: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(J_Q, J_V): both twin heads (B, T) regress on the discounted return (B,)."""
    g = _twins(mc_return, q.shape[-1])
    return mc_loss(q, g), mc_loss(v, g)


def noop_objective(
    q_noop: torch.Tensor, v_state: torch.Tensor, weight: torch.Tensor, gamma: float, pairing: str, how: str
) -> torch.Tensor:
    """The no-op backup: Q (B, T) of a candidate that leaves the screen as it was regresses on gamma V(s)
    (the same state again, no reward), V (B, T) paired with the online heads as J_Q's backup; ``weight``
    (B,) is 0 for rows without such a candidate."""
    T = q_noop.shape[-1]
    v_s, _ = backup_targets(v_state, v_state, pairing, how)
    return noop_q_loss(q_noop.float(), v_s, gamma, _twins(weight, T))


class CriticLearner:
    """The online critic, its EMA target (TD only), the optimiser, and the update that ties them.

    ``model`` is what the forward pass calls: the critic itself or a DistributedDataParallel around it.
    ``autocast`` returns the context the forward runs in (mixed precision); backward runs outside it.
    """

    def __init__(
        self,
        critic: Critic,
        objective: Objective,
        optimizer: torch.optim.Optimizer,
        target: Critic | None = None,
        model: torch.nn.Module | None = None,
        autocast: Callable[[], Any] = contextlib.nullcontext,
    ) -> None:
        if objective.loss == "td" and target is None:
            raise ValueError("a TD learner needs target heads (make_target(critic))")
        self.critic, self.objective, self.optimizer = critic, objective, optimizer
        self.target = target
        self.model = critic if model is None else model
        self.autocast = autocast

    @classmethod
    def create(
        cls,
        critic: Critic,
        objective: Objective,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
    ) -> CriticLearner:
        """A learner with one Adam over the trainable parameters (heads and, when fine-tuned, the text
        encoders: official trainer.py:54-55) and, for TD, target heads copied from ``critic``."""
        opt = torch.optim.Adam(
            [p for p in critic.parameters() if p.requires_grad],
            lr=lr,
            betas=tuple(betas),
            weight_decay=weight_decay,
            foreach=True,
        )
        return cls(critic, objective, opt, make_target(critic) if objective.loss == "td" else None)

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.critic.parameters() if p.requires_grad]

    def loss(self, data: StagedTensors, batch: SampledBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The objective on ``batch``'s rows of ``data``, one forward through ``model`` (DDP sees every head).

        ``batch.backup_col`` (B,): the candidate a' of V's TD target (None: the dataset action).
        ``batch.noop_col`` (B,): one candidate per row to back up as a no-op (its weight is ``data.noop``),
        scored in the same forward as the dataset action.
        ``batch.conservative_cols`` (B, K): the candidates the conservative term scores (None: all of them).
        """
        obj, target = self.objective, self.target
        idx, backup_col, noop_col = batch.idx, batch.backup_col, batch.noop_col
        inputs = data.critic_inputs()
        b = gather(inputs, idx, 0, self.critic.text)  # a fine-tuned encoder: one pass per encoder, with grads
        conservative = obj.conservative_weight > 0
        q_cands = None
        if conservative:
            # The term's candidates (all stored ones, or the drawn subset; column 0 is the dataset action) in
            # the one forward, the no-op candidate appended to it; no text inputs (the stage refuses them).
            ccols = batch.conservative_cols
            cand = inputs.actions[idx] if ccols is None else inputs.actions[idx.unsqueeze(1), ccols]
            if noop_col is not None:  # the no-op candidate rides in the same forward, as the last column
                cand = torch.cat([cand, inputs.actions[idx, noop_col].unsqueeze(1)], 1)
            qc, v = self.model(b.state, cand, b.state_text, None)  # (B, K[+1], T), (B, T)
            if noop_col is not None:
                qc, q_noop = qc[:, :-1], qc[:, -1]
            q, q_cands = qc[:, 0], qc
        elif noop_col is None:
            q, v = self.model(b.state, b.action, b.state_text, b.action_text)  # (B, T) each
        else:
            pair = torch.stack([b.action, inputs.actions[idx, noop_col]], dim=1)  # (B, 2, Da)
            q2, v = self.model(b.state, pair, b.state_text, None)  # (B, 2, T), (B, T); no text with no-ops
            q, q_noop = q2[:, 0], q2[:, 1]
        if obj.loss == "mc":
            lq, lv = mc_objective(q, v, data.mc_return[idx])
        else:
            assert target is not None
            with torch.no_grad():
                nb = gather(inputs, data.next_idx[idx], None, target.text)
                # The online batch's inputs serve the target too unless the target has its own (fine-tuned)
                # encoders or backs up another candidate.
                same = backup_col is None and (inputs.texts is None or inputs.tables is not None)
                tb = b if same else gather(inputs, idx, 0 if backup_col is None else backup_col, target.text)
                v_next, q_back = backup_targets(
                    target.v_all(nb.state, nb.state_text).float(),
                    target.q_all(tb.action, tb.state, tb.state_text, tb.action_text).float(),
                    obj.target_pairing,
                    obj.aggregate,
                )
            dueling = self.critic.arch.q_param == "dueling"
            lq, lv = td_objective(q, v, data.reward[idx], data.done[idx], v_next, q_back, obj.gamma, dueling)
        parts = {"loss_q": lq.detach(), "loss_v": lv.detach(), "q_mean": q.detach().mean()}
        loss = lq + lv
        if noop_col is not None:
            assert data.noop is not None
            with torch.no_grad():
                # TD: the target heads' V(s). MC has no target heads: its own V(s), a regression on the
                # observed returns from s, stopped, and aggregated over the twins.
                if target is not None:
                    v_s, pairing = target.v_all(b.state, b.state_text).float(), obj.target_pairing
                else:
                    v_s, pairing = v.detach().float(), "aggregate"
            ln = noop_objective(q_noop, v_s, data.noop[idx, noop_col], obj.gamma, pairing, obj.aggregate)
            loss = loss + obj.noop_weight * ln
            parts["loss_noop"] = ln.detach()
        if q_cands is not None:
            valid = None
            if data.valid is not None:
                valid = (
                    data.valid[idx]
                    if batch.conservative_cols is None
                    else data.valid[idx.unsqueeze(1), batch.conservative_cols]
                )
                valid = valid.clone()
                valid[:, 0] = True  # the executed action always counts (and keeps the logsumexp finite)
            lc = conservative_penalty(q_cands.float(), q.float(), valid, obj.conservative_temperature)
            loss = loss + obj.conservative_weight * lc
            parts["loss_conservative"] = lc.detach()
        return loss, parts

    def step(self, data: StagedTensors, batch: SampledBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One update: loss, backward, clip, Adam, target EMA. Returns detached tensors (no host sync here:
        the caller decides when to read them)."""
        with self.autocast():  # forward only; backward runs outside autocast as torch recommends
            loss, parts = self.loss(data, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.objective.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable(), self.objective.max_grad_norm, foreach=True)
        self.optimizer.step()
        if self.target is not None:
            soft_update(self.target, self.critic, self.objective.tau)
        return loss.detach(), parts

    def state_dict(self) -> dict[str, Any]:
        """Online critic, target (TD) and optimiser state; :meth:`load_state_dict` restores them bitwise."""
        sd: dict[str, Any] = {"critic": self.critic.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.target is not None:
            sd["target"] = self.target.state_dict()
        return sd

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (self.target is not None) != ("target" in state):
            raise ValueError(
                f"learner state {'has' if 'target' in state else 'lacks'} target heads but this "
                f"{self.objective.loss} learner {'has' if self.target is not None else 'has none'}"
            )
        self.critic.load_state_dict(state["critic"])
        if self.target is not None:
            self.target.load_state_dict(state["target"])
        self.optimizer.load_state_dict(state["optimizer"])
