"""Critic losses: hand-computed values and the shape checks that stop the official broadcast bug."""

from __future__ import annotations

import math

import pytest
import torch

from digiq.losses import (
    ShapeError,
    conservative_penalty,
    mc_loss,
    noop_q_loss,
    td_q_loss,
    td_target,
    td_v_loss,
)


def test_td_q_loss_hand_computed() -> None:
    q = torch.tensor([1.0, 0.5, 2.0])
    r = torch.tensor([0.0, 1.0, 0.0])
    d = torch.tensor([0.0, 1.0, 0.0])
    v_next = torch.tensor([2.0, 5.0, 1.0])
    # targets: 0 + .9*2 = 1.8 ; 1 (done) ; 0 + .9*1 = 0.9
    assert torch.allclose(td_target(r, d, v_next, 0.9), torch.tensor([1.8, 1.0, 0.9]))
    expected = ((1.0 - 1.8) ** 2 + (0.5 - 1.0) ** 2 + (2.0 - 0.9) ** 2) / 3
    assert td_q_loss(q, r, d, v_next, 0.9).item() == pytest.approx(expected, rel=1e-6)
    # bool done works the same
    assert td_q_loss(q, r, d.bool(), v_next, 0.9).item() == pytest.approx(expected, rel=1e-6)


def test_twin_reduction_is_sum_of_per_head_mse() -> None:
    torch.manual_seed(0)
    q = torch.randn(5, 2)
    target = torch.randn(5, 2)
    per_head = sum(((q[:, i] - target[:, i]) ** 2).mean() for i in range(2))
    assert td_v_loss(q, target).item() == pytest.approx(per_head.item(), rel=1e-6)
    assert mc_loss(q, target).item() == pytest.approx(per_head.item(), rel=1e-6)


def test_td_v_and_mc_hand_computed() -> None:
    v = torch.tensor([0.0, 2.0])
    assert td_v_loss(v, torch.tensor([1.0, 0.0])).item() == pytest.approx((1 + 4) / 2)
    assert mc_loss(v, torch.tensor([0.5, 2.5])).item() == pytest.approx((0.25 + 0.25) / 2)


def test_targets_carry_no_gradient() -> None:
    q = torch.tensor([1.0, 2.0], requires_grad=True)
    v_next = torch.tensor([0.5, 0.5], requires_grad=True)
    td_q_loss(q, torch.zeros(2), torch.zeros(2), v_next, 0.9).backward()
    assert q.grad is not None and v_next.grad is None


def test_official_broadcast_bug_cannot_recur() -> None:
    """MSE((B,1), (B,)) broadcasts to (B,B) in the official MC ablation; here it raises."""
    pred = torch.randn(4, 1)
    ret = torch.randn(4)
    with pytest.raises(ShapeError, match=r"\(4,\).*\(4, 1\)"):
        mc_loss(pred, ret)
    with pytest.raises(ShapeError):
        td_v_loss(pred, ret)
    with pytest.raises(ShapeError):
        td_q_loss(pred, ret, ret, ret, 0.9)
    with pytest.raises(ShapeError):
        td_q_loss(ret, ret, ret, pred, 0.9)
    with pytest.raises(ShapeError):
        mc_loss(torch.tensor(1.0), torch.tensor(1.0))
    # what the official bug computes is different from the correct loss (so the check matters)
    buggy = torch.nn.functional.mse_loss(pred, ret)  # the broadcasting call, with its warning
    assert not torch.isclose(buggy, mc_loss(pred.squeeze(1), ret))


def test_noop_q_loss_hand_computed_and_weighted() -> None:
    q = torch.tensor([[1.0, 0.5], [0.2, 0.4], [0.9, 0.9]], requires_grad=True)
    v = torch.tensor([[1.0, 1.0], [0.0, 2.0], [5.0, 5.0]])
    w = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]])  # the last row has no no-op: no contribution
    got = noop_q_loss(q, v, 0.9, w)
    want = ((1.0 - 0.9) ** 2 + (0.5 - 0.9) ** 2 + 0.2**2 + (0.4 - 1.8) ** 2) / 3
    assert got.item() == pytest.approx(want)
    got.backward()
    assert q.grad[2].abs().sum() == 0  # weight 0 rows get no gradient
    with pytest.raises(ShapeError):
        noop_q_loss(q, v[:, :1], 0.9, w)


def test_conservative_penalty_hand_computed() -> None:
    # row 0: log(e^1 + e^0) - 1 = log(1 + e^-1); row 1: log(2 e^2) - 2 = log 2
    q = torch.tensor([[1.0, 0.0], [2.0, 2.0]], requires_grad=True)
    got = conservative_penalty(q, q[:, 0], None, 1.0)
    assert got.item() == pytest.approx((math.log(1 + math.exp(-1)) + math.log(2)) / 2)
    # the gradient lowers the candidates by their softmax weight and raises the dataset action by 1 - its weight
    got.backward()
    w0 = math.exp(1) / (math.exp(1) + 1)
    assert torch.allclose(q.grad, torch.tensor([[(w0 - 1) / 2, (1 - w0) / 2], [-0.25, 0.25]]))
    # a masked candidate drops out: row 1 scores its dataset action alone (penalty 0)
    valid = torch.tensor([[True, True], [True, False]])
    got = conservative_penalty(q.detach(), q.detach()[:, 0], valid, 1.0)
    assert got.item() == pytest.approx(math.log(1 + math.exp(-1)) / 2)
    # temperature 0.5: 0.5 log(e^2 + 1) - 1 and 0.5 log 2
    got = conservative_penalty(q.detach(), q.detach()[:, 0], None, 0.5)
    assert got.item() == pytest.approx((0.5 * math.log(1 + math.exp(-2)) + 0.5 * math.log(2)) / 2)


def test_conservative_penalty_twins_sum_and_shape_checks() -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(5, 4, 2, generator=g)  # (B, N, T)
    both = conservative_penalty(q, q[:, 0], None, 1.0)
    per = [conservative_penalty(q[..., t], q[:, 0, t], None, 1.0) for t in range(2)]
    assert both.item() == pytest.approx(sum(p.item() for p in per))
    assert conservative_penalty(q, q[:, 0], None, 1.0).item() >= 0  # logsumexp >= any member
    with pytest.raises(ShapeError):
        conservative_penalty(q, q[:, 0, 0], None, 1.0)  # (B,) against (B, T) twins
    with pytest.raises(ShapeError):
        conservative_penalty(q, q[:, 0], torch.ones(5, 3, dtype=torch.bool), 1.0)
    with pytest.raises(ValueError, match="temperature"):
        conservative_penalty(q, q[:, 0], None, 0.0)
