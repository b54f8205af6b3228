"""Critic heads: twin ensemble equals per-twin MLPs, exact target init, exact EMA, save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from digiq.models.critic import (
    Critic,
    CriticArch,
    EnsembleMLP,
    aggregate_twins,
    load_critic,
    make_target,
    save_critic,
    soft_update,
)


def _reference_mlp(net: EnsembleMLP, x: torch.Tensor, twin: int) -> torch.Tensor:
    """The same MLP written as a plain per-twin loop of F.linear / layer_norm / relu."""
    h = x
    n = len(net.weights)
    for i in range(n):
        h = F.linear(h, net.weights[i][twin].T, net.biases[i][twin, 0])
        if i < n - 1:
            if net.layer_norm:
                h = F.layer_norm(h, h.shape[-1:], net.ln_weights[i][twin, 0], net.ln_biases[i][twin, 0])
            h = F.relu(h)
    return h.squeeze(-1)


@pytest.mark.parametrize("layer_norm", [True, False])
def test_ensemble_matches_per_twin_reference(layer_norm: bool) -> None:
    torch.manual_seed(0)
    net = EnsembleMLP(7, (16, 8), num=2, layer_norm=layer_norm)
    with torch.no_grad():  # non-trivial LayerNorm affine parameters
        for p in [*net.ln_weights, *net.ln_biases]:
            p.normal_()
    x = torch.randn(5, 3, 7)
    out = net(x)
    assert out.shape == (5, 3, 2)
    for t in range(2):
        assert torch.allclose(out[..., t], _reference_mlp(net, x, t), atol=1e-5)
    # twins are different random initialisations
    assert not torch.equal(net.weights[0][0], net.weights[0][1])


def test_q_v_shapes_aggregation_and_normalisation() -> None:
    torch.manual_seed(0)
    critic = Critic(CriticArch(state_dim=4, action_dim=6, q_hidden=(8,), v_hidden=(8,)))
    a = torch.randn(3, 5, 6)
    s = torch.randn(3, 4)
    q_all = critic.q_all(a)
    assert q_all.shape == (3, 5, 2) and critic.q(a).shape == (3, 5) and critic.v(s).shape == (3,)
    assert torch.equal(critic.q(a), q_all.min(-1).values)
    critic.arch.aggregate = "max"
    assert torch.equal(critic.q(a), q_all.max(-1).values)
    assert torch.allclose(critic.advantage(a, s), critic.q(a) - critic.v(s)[:, None])
    assert torch.equal(aggregate_twins(torch.tensor([[1.0, 3.0]]), "mean"), torch.tensor([2.0]))
    # normalisation: a critic with stats (m, sd) on x equals an identity-stats critic on (x - m) / sd
    m, sd = torch.randn(6), torch.rand(6) + 0.5
    normed = Critic(critic.arch)
    normed.load_state_dict(critic.state_dict())
    normed.set_normalization(torch.zeros(4), torch.ones(4), m, sd)
    assert torch.allclose(normed.q_all(a), critic.q_all((a - m) / sd), atol=1e-6)


def test_target_is_exact_copy_and_frozen() -> None:
    torch.manual_seed(0)
    critic = Critic(CriticArch(state_dim=4, action_dim=6, q_hidden=(8, 8), v_hidden=(8,)))
    critic.set_normalization(torch.randn(4), torch.rand(4) + 1, torch.randn(6), torch.rand(6) + 1)
    target = make_target(critic)
    for (k, a), (_, b) in zip(critic.state_dict().items(), target.state_dict().items()):
        assert torch.equal(a, b), k
        assert a.data_ptr() != b.data_ptr()  # a copy, not shared storage
    assert not any(p.requires_grad for p in target.parameters())
    assert all(p.requires_grad for p in critic.parameters())


def test_soft_update_exact() -> None:
    torch.manual_seed(0)
    critic = Critic(CriticArch(state_dim=4, action_dim=6, q_hidden=(8,), v_hidden=(8,)))
    target = make_target(critic)
    with torch.no_grad():
        for p in critic.parameters():
            p.add_(torch.randn_like(p))
        critic.state_mean.fill_(3.0)
    before = {k: v.clone() for k, v in target.named_parameters()}
    tau = 0.1
    soft_update(target, critic, tau)
    src = dict(critic.named_parameters())
    for k, v in target.named_parameters():
        manual = (1 - tau) * before[k] + tau * src[k]
        assert torch.allclose(v, manual, atol=1e-6, rtol=0), k
        assert not torch.equal(v, src[k])
    assert torch.equal(target.state_mean, critic.state_mean)  # buffers copied
    soft_update(target, critic, 1.0)
    for k, v in target.named_parameters():
        assert torch.equal(v, src[k])


def test_save_load_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    arch = CriticArch(
        state_dim=4, action_dim=6, q_hidden=(8, 4), v_hidden=(5,), layer_norm=False, aggregate="max"
    )
    critic = Critic(arch)
    critic.set_normalization(torch.randn(4), torch.rand(4) + 1, torch.randn(6), torch.rand(6) + 1)
    save_critic(critic, tmp_path / "critic", extra={"gamma": 0.95})
    critic.save(tmp_path / "critic2")
    assert torch.equal(load_critic(tmp_path / "critic2").q(torch.ones(1, 6)), critic.q(torch.ones(1, 6)))
    loaded = load_critic(tmp_path / "critic")
    assert loaded.arch == arch
    a, s = torch.randn(3, 6), torch.randn(3, 4)
    assert torch.equal(loaded.q(a), critic.q(a)) and torch.equal(loaded.v(s), critic.v(s))
    assert (tmp_path / "critic" / "_COMPLETE").exists()
    assert not list((tmp_path / "critic").glob("*.pt"))  # safetensors + json only


def test_dueling_q_adds_detached_state_value(tmp_path: Path) -> None:
    torch.manual_seed(0)
    arch = CriticArch(state_dim=4, action_dim=6, q_hidden=(8,), v_hidden=(8,), q_param="dueling")
    critic = Critic(arch)
    a, s = torch.randn(3, 5, 6), torch.randn(3, 4)
    q_all = critic.q_all(a, s)  # one state for 5 candidates
    assert q_all.shape == (3, 5, 2)
    assert torch.allclose(q_all, critic.v_all(s)[:, None] + critic.q_net(a), atol=1e-6)
    # the ranking of one state's candidates is the advantage head's: V only shifts the row
    assert torch.equal(q_all.argmax(1), critic.q_net(a).argmax(1))
    assert torch.allclose(critic.q_all(a[:, 0], s), q_all[:, 0], atol=1e-6)  # one action per state
    q_all.sum().backward()
    assert all(p.grad is None for p in critic.v_net.parameters())
    assert all(p.grad is not None for p in critic.q_net.parameters())
    with pytest.raises(ValueError, match="dueling"):
        critic.q_all(a)
    save_critic(critic, tmp_path / "duel")
    loaded = load_critic(tmp_path / "duel")
    assert loaded.arch.q_param == "dueling" and torch.equal(loaded.q_all(a, s), q_all.detach())
