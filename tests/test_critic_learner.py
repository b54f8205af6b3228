"""CriticLearner on its own: each objective against numbers worked out by hand, the update (parameters move,
the target follows the EMA rule), state_dict round trips, and bitwise equality with a plain re-statement of
the update train-critic made before the learner existed."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from digiq.models.critic import Critic, CriticArch, aggregate_twins
from digiq.training.critic_data import SampledBatch, StagedTensors
from digiq.training.critic_learner import (
    CriticLearner,
    Objective,
    backup_targets,
    mc_objective,
    noop_objective,
    td_objective,
)

GAMMA = 0.9
T = torch.tensor


# ---- the objectives, on hand-made numbers --------------------------------------------------------------


def test_backup_targets_pairing() -> None:
    v_next, q_back = T([[1.0, 3.0], [2.0, -1.0]]), T([[0.5, 0.25], [4.0, 5.0]])
    v, q = backup_targets(v_next, q_back, "per_head", "min")  # head i from target head i
    assert torch.equal(v, v_next) and torch.equal(q, q_back)
    v, q = backup_targets(v_next, q_back, "aggregate", "min")
    assert v.tolist() == [[1.0, 1.0], [-1.0, -1.0]] and q.tolist() == [[0.25, 0.25], [4.0, 4.0]]
    v, q = backup_targets(v_next, q_back, "aggregate", "max")
    assert v.tolist() == [[3.0, 3.0], [2.0, 2.0]] and q.tolist() == [[0.5, 0.5], [5.0, 5.0]]
    v, _ = backup_targets(v_next, q_back, "aggregate", "mean")
    assert v.tolist() == [[2.0, 2.0], [0.5, 0.5]]
    with pytest.raises(ValueError, match="target_pairing"):
        backup_targets(v_next, q_back, "pairs", "min")


# Two transitions, two twins: row 0 terminal with reward 1, row 1 non-terminal without reward.
Q, V = T([[1.0, 2.0], [0.0, 0.5]]), T([[0.5, 0.0], [1.0, 1.0]])
R, D = T([1.0, 0.0]), T([1.0, 0.0])
V_NEXT, Q_BACK = T([[3.0, 3.0], [2.0, 4.0]]), T([[0.2, 0.4], [1.0, 2.0]])


def test_td_objective_by_hand() -> None:
    # y = r + 0.9 (1 - d) V_targ(s'): row 0 -> (1, 1), row 1 -> (1.8, 3.6)
    # J_Q = mean over rows of the sum over twins: ((1-1)^2 + (2-1)^2 + (0-1.8)^2 + (0.5-3.6)^2) / 2
    # J_V = ((0.5-0.2)^2 + (0-0.4)^2 + (1-1)^2 + (1-2)^2) / 2
    lq, lv = td_objective(Q, V, R, D, V_NEXT, Q_BACK, GAMMA)
    assert lq.item() == pytest.approx((1 + 3.24 + 9.61) / 2)
    assert lv.item() == pytest.approx((0.09 + 0.16 + 1) / 2)
    # dueling: V regresses on y as well, ((0.5-1)^2 + (0-1)^2 + (1-1.8)^2 + (1-3.6)^2) / 2
    lq_d, lv_d = td_objective(Q, V, R, D, V_NEXT, Q_BACK, GAMMA, dueling=True)
    assert lq_d.item() == pytest.approx(lq.item())
    assert lv_d.item() == pytest.approx((0.25 + 1 + 0.64 + 6.76) / 2)


def test_td_objective_targets_carry_no_gradient() -> None:
    q, v, vn, qb = (x.clone().requires_grad_(True) for x in (Q, V, V_NEXT, Q_BACK))
    lq, lv = td_objective(q, v, R, D, vn, qb, GAMMA)
    (lq + lv).backward()
    assert vn.grad is None and qb.grad is None
    # d J_Q / d Q = 2 (Q - y) / B
    assert torch.allclose(q.grad, T([[0.0, 1.0], [-1.8, -3.1]]))


def test_mc_objective_by_hand() -> None:
    g = T([1.0, 0.5])
    lq, lv = mc_objective(Q, V, g)
    assert lq.item() == pytest.approx((0 + 1 + 0.25 + 0) / 2)
    assert lv.item() == pytest.approx((0.25 + 1 + 0.25 + 0.25) / 2)


def test_noop_objective_by_hand() -> None:
    q_noop, v_s, w = T([[1.0, 2.0], [0.0, 0.0]]), T([[1.0, 3.0], [2.0, 2.0]]), T([1.0, 0.0])
    # per head: target 0.9 V_targ_i(s) = (0.9, 2.7); row 1 has no no-op (weight 0)
    assert noop_objective(q_noop, v_s, w, GAMMA, "per_head", "min").item() == pytest.approx((0.01 + 0.49) / 2)
    # aggregate min: both heads regress on 0.9 * 1
    assert noop_objective(q_noop, v_s, w, GAMMA, "aggregate", "min").item() == pytest.approx(
        (0.01 + 1.21) / 2
    )


# ---- the learner ----------------------------------------------------------------------------------------

ROWS, N = 6, 3


def _data() -> StagedTensors:
    g = torch.Generator().manual_seed(3)
    return StagedTensors(
        state=torch.randn(ROWS, 3, generator=g),
        actions=torch.randn(ROWS, N, 4, generator=g),
        # two candidates failed to parse; only the conservative term reads the mask (the batches are given)
        valid=T([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 1], [1, 0, 1], [1, 1, 1]]).bool(),
        reward=T([0.0, 0.0, 1.0, 0.0, 0.0, 1.0]),
        done=T([0.0, 0.0, 1.0, 0.0, 0.0, 1.0]),
        mc_return=T([0.81, 0.9, 1.0, 0.81, 0.9, 1.0]),
        next_idx=T([1, 2, 2, 4, 5, 5]),
        noop=T([[0, 1, 0], [0, 0, 1], [0, 0, 0], [0, 1, 1], [0, 0, 0], [0, 1, 0]]),
    )


IDX = T([0, 1, 2, 3, 4, 5, 0, 3])
BACKUP_COL = T([1, 2, 0, 1, 2, 0, 0, 2])
NOOP_COL = T([1, 2, 0, 1, 0, 1, 1, 2])

CONSERVATIVE = {"conservative_weight": 0.5, "conservative_temperature": 0.7}
# name: (objective overrides, arch overrides, backup column, no-op column)
ARMS = {
    "td": ({}, {}, None, None),
    "td_per_head_max": ({"target_pairing": "per_head", "aggregate": "max"}, {"aggregate": "max"}, None, None),
    "td_candidate_mean": ({"aggregate": "mean"}, {"aggregate": "mean"}, BACKUP_COL, None),
    "mc": ({"loss": "mc"}, {}, None, None),
    "td_dueling_noop": ({}, {"q_param": "dueling", "q_input": "state_action"}, None, NOOP_COL),
    "mc_dueling_noop": ({"loss": "mc"}, {"q_param": "dueling"}, None, NOOP_COL),
    "td_conservative": (CONSERVATIVE, {}, None, None),
    "td_conservative_noop": (CONSERVATIVE, {"q_input": "state_action"}, BACKUP_COL, NOOP_COL),
    "mc_conservative": ({"loss": "mc", **CONSERVATIVE}, {}, None, None),
}
# The conservative term's columns (the dataset action first) where an arm draws a subset (num_candidates=2).
CONSERVATIVE_COLS = {
    "td_conservative_noop": T([[0, 2], [0, 1], [0, 1], [0, 2], [0, 2], [0, 1], [0, 1], [0, 2]])
}


def _learner(arm: str, init_seed: int = 1) -> CriticLearner:
    obj_kw, arch_kw, _, _ = ARMS[arm]
    arch = CriticArch(state_dim=3, action_dim=4, q_hidden=(5,), v_hidden=(6,), **arch_kw)
    torch.manual_seed(init_seed)
    critic = Critic(arch)
    critic.set_normalization(T([0.1, -0.2, 0.0]), T([1.5, 0.5, 1.0]), torch.zeros(4), torch.full((4,), 2.0))
    return CriticLearner.create(critic, Objective(gamma=GAMMA, tau=0.25, **obj_kw), lr=1e-2)


def _step(learner: CriticLearner, data: StagedTensors, arm: str) -> tuple[torch.Tensor, dict]:
    _, _, col, ncol = ARMS[arm]
    return learner.step(data, SampledBatch(IDX, col, ncol, CONSERVATIVE_COLS.get(arm)))


def test_learner_needs_target_heads_for_td() -> None:
    critic = Critic(CriticArch(state_dim=3, action_dim=4, q_hidden=(5,), v_hidden=(6,)))
    opt = torch.optim.Adam(critic.parameters())
    with pytest.raises(ValueError, match="target"):
        CriticLearner(critic, Objective(loss="td"), opt)
    assert CriticLearner.create(critic, Objective(loss="mc"), lr=1e-3).target is None


@pytest.mark.parametrize("arm", ["td", "td_dueling_noop"])
def test_step_moves_parameters_and_the_target_by_the_ema_rule(arm: str) -> None:
    learner, data = _learner(arm), _data()
    before = {k: v.clone() for k, v in learner.critic.named_parameters()}
    target_before = {k: v.clone() for k, v in learner.target.named_parameters()}
    assert all(torch.equal(before[k], target_before[k]) for k in before)  # the target starts as a copy
    loss, parts = _step(learner, data, arm)
    assert loss.requires_grad is False and set(parts) >= {"loss_q", "loss_v", "q_mean"}
    assert ("loss_noop" in parts) == (arm == "td_dueling_noop")
    after = dict(learner.critic.named_parameters())
    for k in ("q_net.weights.0", "q_net.weights.1", "v_net.weights.0", "v_net.weights.1"):
        assert not torch.equal(after[k], before[k]), k
    tau = learner.objective.tau
    for k, p in learner.target.named_parameters():
        # theta_targ <- theta_targ + tau (theta - theta_targ), with theta the critic after the step
        assert torch.allclose(
            p, target_before[k] + tau * (after[k].detach() - target_before[k]), atol=1e-7
        ), k
        assert not p.requires_grad
    for (k, b), (_, s) in zip(learner.target.named_buffers(), learner.critic.named_buffers()):
        assert torch.equal(b, s), k


def _state_equal(a: dict, b: dict) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_state_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("arm", ["td_dueling_noop", "mc"])
def test_state_dict_round_trips_bitwise(arm: str) -> None:
    data = _data()
    a = _learner(arm)
    for _ in range(2):
        _step(a, data, arm)
    state = copy.deepcopy(a.state_dict())
    b = _learner(arm, init_seed=7)  # other weights, an optimiser that never stepped
    assert not _state_equal(b.state_dict(), state)
    b.load_state_dict(state)
    assert _state_equal(b.state_dict(), a.state_dict())
    # ... and the restored learner continues exactly as the original
    la, _ = _step(a, data, arm)
    lb, _ = _step(b, data, arm)
    assert torch.equal(la, lb) and _state_equal(a.state_dict(), b.state_dict())


def test_load_state_dict_refuses_a_state_without_target_heads() -> None:
    mc_state = _learner("mc").state_dict()
    with pytest.raises(ValueError, match="target"):
        _learner("td").load_state_dict(mc_state)


# ---- bitwise equality with the update as train-critic wrote it before the learner -------------------------


def _reference_step(
    critic: Critic, target: Critic | None, opt: torch.optim.Optimizer, data: StagedTensors, obj: Objective,
    col: torch.Tensor | None, ncol: torch.Tensor | None, ccols: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """The update spelled out with tensor ops: every formula written out, no digiq.losses and no learner."""
    i = IDX
    s, a = data.state[i], data.actions[i, 0]
    if obj.conservative_weight > 0:
        cand = data.actions[i] if ccols is None else data.actions[i.unsqueeze(1), ccols]
        if ncol is not None:
            cand = torch.cat([cand, data.actions[i, ncol].unsqueeze(1)], 1)
        qc, v = critic(s, cand)  # (B, K[+1], T): the dataset action first, the no-op candidate last
        if ncol is not None:
            qc, q_noop = qc[:, :-1], qc[:, -1]
        q = qc[:, 0]
    elif ncol is None:
        q, v = critic(s, a)
    else:
        q2, v = critic(s, torch.stack([a, data.actions[i, ncol]], dim=1))
        q, q_noop = q2[:, 0], q2[:, 1]
    B, Tw = q.shape
    r, d = data.reward[i].unsqueeze(-1).expand(-1, Tw), data.done[i].unsqueeze(-1).expand(-1, Tw)

    def paired(x: torch.Tensor, pairing: str) -> torch.Tensor:
        return x if pairing == "per_head" else aggregate_twins(x, obj.aggregate).unsqueeze(-1).expand(-1, Tw)

    if obj.loss == "mc":
        g = data.mc_return[i].unsqueeze(-1).expand(-1, Tw)
        lq, lv = ((q - g) ** 2).sum() / B, ((v - g) ** 2).sum() / B
    else:
        with torch.no_grad():
            v_next = paired(target.v_all(data.state[data.next_idx[i]]).float(), obj.target_pairing)
            a_back = a if col is None else data.actions[i, col]
            q_back = paired(target.q_all(a_back, s).float(), obj.target_pairing)
        y = r + GAMMA * (1.0 - d) * v_next
        lq = ((q.float() - y) ** 2).sum() / B
        v_target = y if critic.arch.q_param == "dueling" else q_back
        lv = ((v.float() - v_target) ** 2).sum() / B
    loss = lq + lv
    if ncol is not None:
        with torch.no_grad():
            if target is None:
                v_s = paired(v.detach().float(), "aggregate")
            else:
                v_s = paired(target.v_all(s).float(), obj.target_pairing)
        w = data.noop[i, ncol].unsqueeze(-1).expand(-1, Tw)
        loss = loss + obj.noop_weight * ((w * (q_noop.float() - GAMMA * v_s) ** 2).sum() / B)
    if obj.conservative_weight > 0:
        tau_c = obj.conservative_temperature
        ok = (data.valid[i] if ccols is None else data.valid[i.unsqueeze(1), ccols]).clone()
        ok[:, 0] = True
        scaled = (qc.float() / tau_c).masked_fill(~ok.unsqueeze(-1), float("-inf"))
        soft_max = tau_c * torch.logsumexp(scaled, dim=1)
        loss = loss + obj.conservative_weight * ((soft_max - q.float()).sum() / B)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(critic.parameters()), obj.max_grad_norm, foreach=True)
    opt.step()
    if target is not None:
        with torch.no_grad():
            torch._foreach_lerp_(list(target.parameters()), list(critic.parameters()), obj.tau)
    return loss.detach()


@pytest.mark.parametrize("arm", list(ARMS))
def test_learner_equals_the_spelled_out_update_bitwise(arm: str) -> None:
    data = _data()
    learner = _learner(arm)
    ref = _learner(arm)  # same seed: the same initial weights
    _, _, col, ncol = ARMS[arm]
    for _ in range(3):
        ccols = CONSERVATIVE_COLS.get(arm)
        loss, _ = learner.step(data, SampledBatch(IDX, col, ncol, ccols))
        ref_loss = _reference_step(
            ref.critic, ref.target, ref.optimizer, data, ref.objective, col, ncol, ccols
        )
        assert torch.equal(loss, ref_loss)
    assert _state_equal(learner.state_dict(), ref.state_dict())


# The losses of three steps and the parameter sum after them, computed once with train-critic's
# train_step as it was before the learner existed (same tiny batch); a tolerance absorbs the floating
# point of other CPUs, a change of objective moves them far more.
PINNED: dict[str, tuple[list[float], float]] = {
    "td": ([3.8411133, 3.3438056, 2.8492253], 24.18331529),
    "td_per_head_max": ([7.0929022, 6.156786, 5.181469], 24.34457084),
    "td_candidate_mean": ([3.0166378, 2.5571916, 2.1387277], 24.24416116),
    "mc": ([4.9795942, 4.3773451, 3.8334146], 24.12719776),
    "td_dueling_noop": ([2.5847354, 1.7094948, 1.5290971], 26.40953576),
    "mc_dueling_noop": ([17.819395, 13.138433, 9.6535931], 23.5710499),
}


@pytest.mark.parametrize("arm", list(PINNED))
def test_pinned_pre_learner_values(arm: str) -> None:
    data = _data()
    learner = _learner(arm)
    losses = [_step(learner, data, arm)[0].item() for _ in range(3)]
    total = sum(p.double().sum().item() for p in learner.critic.parameters())
    want_losses, want_total = PINNED[arm]
    assert losses == pytest.approx(want_losses, rel=1e-5, abs=1e-6)
    assert total == pytest.approx(want_total, rel=1e-5, abs=1e-6)


def test_objective_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Objective().gamma = 0.5  # type: ignore[misc]


# ---- the row sampler's draw for the conservative term --------------------------------------------------


def test_sampler_draws_the_dataset_action_and_distinct_valid_others() -> None:
    from digiq.training.critic_data import RowSampler

    data = _data()
    data.actions, data.noop = torch.zeros(ROWS, 5, 4), None
    data.valid = T([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 1, 1, 0]] * 2).bool()
    rows = torch.arange(ROWS).numpy()
    sampler = RowSampler(rows, 64, data, False, seed=3, rank=0, conservative_candidates=3)
    sampler.start_epoch(0)
    b = sampler.draw("cpu")
    cols = b.conservative_cols
    assert cols.shape == (64, 3) and (cols[:, 0] == 0).all()
    assert all(len(set(r[1:].tolist())) == 2 and 0 not in r[1:].tolist() for r in cols)
    for r, c in zip(b.idx.tolist(), cols.tolist()):
        valid_others = int(data.valid[r, 1:].sum())
        # a row draws its valid candidates before any invalid one
        assert int(data.valid[r, c[1:]].sum()) == min(2, valid_others)
    # the same (seed, rank, epoch) replays the same draw (a resumed epoch), and without the term none is drawn
    again = RowSampler(rows, 64, data, False, seed=3, rank=0, conservative_candidates=3)
    again.start_epoch(0)
    assert torch.equal(again.draw("cpu").conservative_cols, cols)
    plain = RowSampler(rows, 64, data, False, seed=3, rank=0)
    plain.start_epoch(0)
    pb = plain.draw("cpu")
    assert pb.conservative_cols is None and torch.equal(pb.idx, b.idx)  # rows drawn first, unchanged
