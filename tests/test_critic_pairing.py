"""critic.target_pairing: per_head (the official backup) and aggregate, against a hand computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from aitw_helpers import ensemble_mlp_numpy

from digiq.config import load_config
from digiq.models.critic import Critic, CriticArch
from digiq.stages import train_critic as tc
from digiq.training.critic_data import SampledBatch, StagedTensors
from digiq.training.critic_learner import CriticLearner, backup_targets

GAMMA = 0.9


@pytest.fixture()
def batch():
    return _batch()


def _batch(q_param: str = "direct") -> tuple[Critic, Critic, StagedTensors]:
    arch = CriticArch(
        state_dim=3, action_dim=4, q_hidden=(5,), v_hidden=(6,), layer_norm=False, q_param=q_param
    )
    torch.manual_seed(1)
    critic = Critic(arch)
    torch.manual_seed(2)  # an independent target, so per-head and aggregated targets differ
    target = Critic(arch).requires_grad_(False)
    g = torch.Generator().manual_seed(3)
    R = 5
    data = StagedTensors(
        state=torch.randn(R, 3, generator=g),
        actions=torch.randn(R, 2, 4, generator=g),
        valid=None,
        reward=torch.tensor([0.0, 0.0, 1.0, 0.0, 1.0]),
        done=torch.tensor([0.0, 0.0, 1.0, 0.0, 1.0]),
        mc_return=torch.zeros(R),
        next_idx=torch.tensor([1, 2, 2, 4, 4]),
    )
    return critic, target, data


def _loss(critic: Critic, target: Critic, data: StagedTensors, idx: np.ndarray, cfg: tc.Config):
    """The learner's loss on rows ``idx`` with the objective train-critic builds from ``cfg``."""
    learner = CriticLearner(critic, tc.objective(cfg), torch.optim.Adam(critic.parameters()), target)
    return learner.loss(data, SampledBatch(torch.as_tensor(idx)))


def _hand(critic: Critic, target: Critic, data: StagedTensors, idx: np.ndarray, pairing: str, how: str):
    s = data.state.double().numpy()
    a = data.actions[:, 0].double().numpy()
    r, d = data.reward.double().numpy(), data.done.double().numpy()
    nxt = data.next_idx.numpy()
    q = ensemble_mlp_numpy(critic.q_net, a[idx])
    v = ensemble_mlp_numpy(critic.v_net, s[idx])
    vt = ensemble_mlp_numpy(target.v_net, s[nxt[idx]])  # (B, 2)
    qt = ensemble_mlp_numpy(target.q_net, a[idx])
    if pairing == "aggregate":
        agg = np.max if how == "max" else np.min
        vt = np.repeat(agg(vt, axis=1, keepdims=True), 2, axis=1)
        qt = np.repeat(agg(qt, axis=1, keepdims=True), 2, axis=1)
    y = r[idx, None] + GAMMA * (1 - d[idx, None]) * vt
    loss_q = sum(np.mean((q[:, i] - y[:, i]) ** 2) for i in range(2))
    loss_v = sum(np.mean((v[:, i] - qt[:, i]) ** 2) for i in range(2))
    return loss_q, loss_v


@pytest.mark.parametrize(
    ("pairing", "how"), [("per_head", "max"), ("aggregate", "max"), ("aggregate", "min")]
)
def test_backup_equals_hand_computation(batch, pairing: str, how: str) -> None:
    critic, target, data = batch
    cfg = load_config(
        tc.Config,
        None,
        [
            "dataset=x",
            "features=y",
            f"gamma={GAMMA}",
            f"critic.target_pairing={pairing}",
            f"critic.aggregate={how}",
        ],
    )
    idx = np.array([0, 1, 2, 3, 4, 0])
    loss, parts = _loss(critic, target, data, idx, cfg)
    hq, hv = _hand(critic, target, data, idx, pairing, how)
    assert parts["loss_q"].item() == pytest.approx(hq, abs=1e-6)
    assert parts["loss_v"].item() == pytest.approx(hv, abs=1e-6)
    assert loss.item() == pytest.approx(hq + hv, abs=1e-6)


def test_per_head_differs_from_aggregated_max(batch) -> None:
    """The official backup is not `aggregate: max`: on the same batch the two losses differ."""
    critic, target, data = batch
    idx = np.arange(5)
    per = _hand(critic, target, data, idx, "per_head", "max")
    agg = _hand(critic, target, data, idx, "aggregate", "max")
    assert abs(per[0] - agg[0]) > 1e-3 and abs(per[1] - agg[1]) > 1e-3


def test_pairing_is_validated() -> None:
    from digiq.config import ConfigError

    with pytest.raises(ConfigError, match="target_pairing"):
        load_config(tc.Config, None, ["dataset=x", "features=y", "critic.target_pairing=pairs"])
    with pytest.raises(ValueError, match="target_pairing"):
        backup_targets(torch.zeros(2, 2), torch.zeros(2, 2), "pairs", "min")


@pytest.mark.parametrize(("pairing", "how"), [("per_head", "max"), ("aggregate", "min")])
def test_dueling_backup_equals_hand_computation(pairing: str, how: str) -> None:
    """q_param=dueling: Q_i = sg[V_i(s)] + A_i(f(s, a)); both heads regress on r + gamma (1-d) V_targ(s')."""
    critic, target, data = _batch("dueling")
    over = ["dataset=x", "features=y", f"gamma={GAMMA}", "critic.q_param=dueling"]
    cfg = load_config(tc.Config, None, [*over, f"critic.target_pairing={pairing}", f"critic.aggregate={how}"])
    idx = np.array([0, 1, 2, 3, 4, 0])
    loss, parts = _loss(critic, target, data, idx, cfg)

    s, a = data.state.double().numpy(), data.actions[:, 0].double().numpy()
    r, d, nxt = data.reward.double().numpy(), data.done.double().numpy(), data.next_idx.numpy()
    v = ensemble_mlp_numpy(critic.v_net, s[idx])
    q = v + ensemble_mlp_numpy(critic.q_net, a[idx])
    vt = ensemble_mlp_numpy(target.v_net, s[nxt[idx]])
    if pairing == "aggregate":
        vt = np.repeat(vt.min(axis=1, keepdims=True), 2, axis=1)
    y = r[idx, None] + GAMMA * (1 - d[idx, None]) * vt
    hq = sum(np.mean((q[:, i] - y[:, i]) ** 2) for i in range(2))
    hv = sum(np.mean((v[:, i] - y[:, i]) ** 2) for i in range(2))
    assert parts["loss_q"].item() == pytest.approx(hq, abs=1e-6)
    assert parts["loss_v"].item() == pytest.approx(hv, abs=1e-6)
    # J_Q trains the advantage head only (V is detached inside Q): V's gradient is that of J_V alone
    loss.backward()
    full = [p.grad.clone() for p in critic.v_net.parameters()]
    critic.zero_grad()
    v_t = critic.v_all(data.state[torch.as_tensor(idx)])
    ((v_t - torch.as_tensor(y, dtype=torch.float32)) ** 2).mean(0).sum().backward()
    for g_full, p in zip(full, critic.v_net.parameters()):
        assert torch.allclose(g_full, p.grad, atol=1e-6)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in critic.v_net.parameters())
    from digiq.config import ConfigError

    with pytest.raises(ConfigError, match="dueling"):
        load_config(tc.Config, None, [*over, "backup_action=candidate"])
