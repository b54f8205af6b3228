"""digiq theory: the qualitative facts of each experiment, the maths pieces against references computed
another way, and the CLI (PNG + CSV, deterministic under a seed). Sizes are reduced where that keeps a fact."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from killresume import digiq_env

from digiq.config import ConfigError, load_config
from digiq.theory import chain as C
from digiq.theory import mlp
from digiq.theory import tabular as T
from digiq.theory.cli import Config, run_experiment
from digiq.theory.mdp import bellman_optimality, branching_mdp, chain_mdp, q_star, sample_step

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------ MDPs


def test_branching_mdp_shape_and_fixed_point() -> None:
    mdp = branching_mdp()
    assert mdp.n_states * mdp.n_actions == 10 and mdp.depth.max() == 2  # depth 3: three actions to the end
    qs = q_star(mdp, 0.9)
    np.testing.assert_allclose(bellman_optimality(mdp, qs, 0.9), qs, atol=1e-12)
    # hand-computed: s3 has only termination or staying, Q(s3, a0) = 0.72 + 0.9 * 0.2 * max Q(s3)
    assert qs[3, 0] == pytest.approx(0.72 / (1 - 0.18))


@pytest.mark.parametrize("depth, gamma", [(1, 0.9), (5, 0.9), (64, 0.999)])
def test_chain_q_star_closed_form(depth: int, gamma: float) -> None:
    np.testing.assert_allclose(q_star(chain_mdp(depth), gamma), C.chain_q_star(depth, gamma), atol=1e-9)


def test_sample_step_matches_model() -> None:
    mdp = branching_mdp()
    rng = np.random.default_rng(0)
    n = 200_000
    s, a = np.full(n, 1), np.full(n, 1)  # s1 -a1-> s3 / s4 / stay
    r, s_next, done = sample_step(mdp, rng, s, a)
    freq = np.bincount(s_next, minlength=mdp.n_states + 1) / n
    np.testing.assert_allclose(freq, mdp.p_full()[1, 1], atol=5e-3)
    s, a = np.full(n, 3), np.zeros(n, dtype=int)
    r, s_next, done = sample_step(mdp, rng, s, a)
    assert r.mean() == pytest.approx(mdp.R[3, 0], abs=5e-3) and np.all(r[~done] == 0)


# ------------------------------------------------------------------------------------------ 1-3


def test_value_iteration_below_contraction_bound() -> None:
    res = T.run_value_iteration(T.TabularConfig(gamma=0.9, vi_iters=40), seed=3)
    c = res.tables["value-iteration"]
    for init in ("zero", "random"):
        err, bound = c[f"error_{init}_init"], c[f"bound_{init}_init"]
        assert np.all(err <= bound + 1e-12), f"{init}: ||T^k Q0 - Q*|| above gamma^k ||Q0 - Q*||"
        assert err[0] > 0.3 and err[-1] < 1e-10  # and it really converged
        assert res.summary[f"empirical_rate_{init}"] <= 0.9


def test_backup_sweeps_move_one_state_per_sweep() -> None:
    D, g = 5, 0.9
    V = C.backup_sweeps(D, g)
    v_star = C.chain_q_star(D, g).max(-1)
    for k in range(D + 1):
        exact = np.arange(D) >= D - k
        np.testing.assert_allclose(V[k, exact], v_star[exact])
        assert np.all(V[k, ~exact] == 0)


def test_q_learning_per_visit_converges_others_do_not() -> None:
    res = T.run_q_learning(T.TabularConfig(steps=30_000, seeds=4), seed=0)
    s, c = res.summary, res.tables["q-learning"]
    assert c["visit_mean"][0] == pytest.approx(np.abs(q_star(branching_mdp(), 0.9)).max())
    assert s["final_error_visit_mean"] < 0.1  # from 0.88 at t = 0
    assert s["final_error_constant_mean"] > s["final_error_visit_mean"]  # noise ball of constant alpha
    assert s["final_error_global_mean"] > 0.5  # 1/(t+1) globally: rarely-visited pairs barely move


def test_one_hot_features_reduce_fa_to_tabular_q_learning() -> None:
    """Semi-gradient Q-learning with one-hot features IS tabular Q-learning (same RNG stream)."""
    mdp = branching_mdp()
    phi = np.eye(10).reshape(5, 2, 10)
    _, _, theta = T.semi_gradient_q_learning(mdp, phi, 0.9, 3000, runs=3, seed=7, alpha=0.1)
    _, _, Q = T.tabular_q_learning(mdp, 0.9, 3000, ["constant"] * 3, seed=7, constant_alpha=0.1)
    np.testing.assert_allclose(theta.reshape(3, 5, 2), Q, atol=1e-12)
    assert T.minimax_floor(phi, q_star(mdp, 0.9)) < 1e-12


def test_minimax_floor_is_the_optimum() -> None:
    mdp = branching_mdp()
    qs, phi = q_star(mdp, 0.9), T.cosine_features(mdp)
    floor = T.minimax_floor(phi, qs)
    ls_sup = np.abs(T.least_squares_projection(phi, qs) - qs).max()
    assert 0 < floor <= ls_sup
    X = phi.reshape(-1, 3)
    theta0, *_ = np.linalg.lstsq(X, qs.reshape(-1), rcond=None)
    thetas = theta0 + np.random.default_rng(0).uniform(-0.3, 0.3, (200_000, 3))
    sup = np.abs(thetas @ X.T - qs.reshape(-1)).max(1)
    assert sup.min() >= floor - 1e-12 and sup.min() < floor + 0.02


def test_function_approximation_stays_above_projection_floor() -> None:
    res = T.run_function_approximation(T.TabularConfig(steps=20_000, seeds=4), seed=0)
    s, c = res.summary, res.tables["function-approximation"]
    assert np.all(c["sup_error_min"] >= s["floor_minimax_sup"] - 1e-12)  # a theorem
    assert s["min_rms_error_over_training"] >= s["floor_l2_projection_rms"] - 1e-12  # a theorem
    assert s["final_sup_error_min"] > s["floor_l2_projection_sup"]  # what the experiment shows
    assert c["sup_error_mean"][-1] < c["sup_error_mean"][0]  # it did learn something


# ------------------------------------------------------------------------------------------ MLP


def test_mlp_has_257_params_and_torch_gradients() -> None:
    rng = np.random.default_rng(0)
    p = mlp.init_mlp(3, 2, 64, rng)
    assert mlp.n_params(p) == 257
    x, y = rng.normal(size=(3, 5, 2)), rng.normal(size=(3, 5))
    q, cache = mlp.forward(p, x)
    g = mlp.grad_mse(p, x, cache, (q - y) / 5)
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in p.items()}
    tx = torch.tensor(x)
    h = torch.relu(torch.einsum("rni,rih->rnh", tx, tp["W1"]) + tp["b1"][:, None])
    tq = torch.einsum("rnh,rh->rn", h, tp["W2"]) + tp["b2"][:, None]
    (0.5 * ((tq - torch.tensor(y)) ** 2).mean(1).sum()).backward()
    np.testing.assert_allclose(q, tq.detach().numpy(), atol=1e-12)
    for k in p:
        np.testing.assert_allclose(g[k], tp[k].grad.numpy(), atol=1e-10, err_msg=k)


def test_adam_matches_torch() -> None:
    rng = np.random.default_rng(1)
    p = mlp.init_mlp(2, 2, 8, rng)
    tp = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in p.items()}
    opt = torch.optim.Adam(tp.values(), lr=1e-2)
    adam = mlp.Adam(p, 1e-2)
    for _ in range(5):
        grads = {k: rng.normal(size=v.shape) for k, v in p.items()}
        adam.step_(p, grads)
        for k in tp:
            tp[k].grad = torch.tensor(grads[k])
        opt.step()
    for k in p:
        np.testing.assert_allclose(p[k], tp[k].detach().numpy(), atol=1e-10, err_msg=k)


# ------------------------------------------------------------------------------------------ 4-6


def _n_step_reference(r, d, n, g, v):
    out = []
    for i in range(len(n)):
        W = len(r[i])
        G, disc = 0.0, 1.0
        for k in range(W - n[i], W):
            G += disc * r[i][k]
            disc *= g[i]
            if d[i][k]:
                break
        else:
            G += disc * v[i]
        out.append(G)
    return np.array(out)


def test_n_step_targets_match_loop_reference() -> None:
    rng = np.random.default_rng(0)
    R, W = 64, 9
    r = rng.random((R, W))
    d = rng.random((R, W)) < 0.2
    n = rng.integers(1, W + 1, R)
    g = rng.uniform(0.5, 0.99, R)
    v = rng.normal(size=R)
    np.testing.assert_allclose(C.n_step_targets(r, d, n, g, v), _n_step_reference(r, d, n, g, v), atol=1e-12)


def test_chain_learning_reduces_error_and_changes_params() -> None:
    out = C.train_chain(np.array([8, 8]), np.array([0.9, 0.9]), 3000, seed=0)
    assert int(out["n_params"]) == 257
    assert np.all(out["errors"][-1] < 0.5 * out["errors"][0])


@pytest.mark.slow
def test_deeper_chains_give_larger_final_error() -> None:
    s = C.run_chain_depth(C.ChainConfig(), seed=0).summary  # the full experiment 4 (about 2 s)
    assert s["n_params"] == 257
    assert s["final_error_depth2"] < s["final_error_depth8"] < s["final_error_depth32"]
    assert s["final_error_depth32"] > 0.05


@pytest.mark.slow
def test_larger_gamma_gives_larger_error_from_bootstrapping() -> None:
    """gamma 0.99 -> 0.999: larger final error, and the part that bootstrapping adds (TD minus the same
    network regressed on Q*) grows. (gamma = 0.9 is fit-limited, not bootstrap-limited: see docs/theory.md.)"""
    s = C.run_discount(
        C.ChainConfig(discount_depth=32, discount_steps=15_000, discount_seeds=3), seed=0
    ).summary
    assert s["final_error_gamma0.999"] > s["final_error_gamma0.99"]
    assert s["final_start_error_gamma0.999"] > s["final_start_error_gamma0.99"]
    assert s["bootstrap_excess_gamma0.999"] > s["bootstrap_excess_gamma0.99"]
    assert s["bootstrap_excess_gamma0.999"] > 0.02


# ------------------------------------------------------------------------------------------ CLI


def _small(experiment: str, seed: int = 0) -> Config:
    return load_config(
        Config,
        None,
        [
            f"experiment={experiment}",
            f"seed={seed}",
            "tabular.steps=2000",
            "tabular.seeds=2",
            "chain.depth_steps=500",
            "chain.discount_steps=500",
            "chain.discount_seeds=1",
            "chain.discount_depth=8",
            "chain.nstep_steps=500",
            "chain.nstep_seeds=1",
            "chain.nstep_depth=8",
        ],
    )


@pytest.mark.parametrize(
    "name", ["q-learning", "function-approximation", "chain-depth", "discount", "n-step"]
)
def test_deterministic_under_seed(name: str) -> None:
    a, b = run_experiment(name, _small(name, 0)), run_experiment(name, _small(name, 0))
    c = run_experiment(name, _small(name, 1))
    for stem, cols in a.tables.items():
        for k, v in cols.items():
            np.testing.assert_array_equal(v, b.tables[stem][k], err_msg=f"{stem}.{k}")
    assert any(not np.array_equal(v, c.tables[name][k]) for k, v in a.tables[name].items() if k != "step")


def test_run_all_writes_every_png_and_csv(tmp_path: Path) -> None:
    from digiq.theory.cli import EXPERIMENTS, run

    cfg = _small("all")
    cfg.output_dir = str(tmp_path)
    run(cfg)
    for name in EXPERIMENTS:
        png = tmp_path / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        rows = list(csv.DictReader((tmp_path / f"{name}.csv").open()))
        assert len(rows) > 5 and all(v != "" for v in rows[-1].values())
        assert (tmp_path / f"{name}_summary.json").is_file()
    assert (tmp_path / "config.yaml").is_file()


def test_cli_positional_and_errors(tmp_path: Path) -> None:
    env = digiq_env()
    cmd = [sys.executable, "-m", "digiq", "theory"]
    p = subprocess.run(
        [*cmd, "value-iteration", f"output_dir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "value-iteration.png").is_file() and (tmp_path / "value-iteration.csv").is_file()
    assert "max_ratio_to_bound_zero" in p.stdout
    bad = subprocess.run([*cmd, "q-learnin"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "not one of" in bad.stderr


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="gamma"):
        load_config(Config, None, ["tabular.gamma=1.0"])
    with pytest.raises(ConfigError, match="discount"):
        load_config(Config, None, ["chain.gammas=[0.9, 1.5]"])


def _q_uniform_policy(depth: int, gamma: float) -> np.ndarray:
    """Q of the uniformly random policy on the chain, by solving the linear Bellman equation."""
    mdp = chain_mdp(depth)
    S = depth
    P = mdp.P.reshape(S * 2, S)  # (s, a) -> s'
    M = np.eye(S * 2) - gamma * P @ np.kron(np.eye(S), np.full((1, 2), 0.5))
    return np.linalg.solve(M, mdp.R.reshape(-1)).reshape(S, 2)


@pytest.mark.slow
def test_digiq_td_and_mc_evaluate_the_behaviour_policy() -> None:
    """With epsilon = 1 the data come from the uniform policy: Digi-Q's TD (V <- Q_targ(s, a_data)) and MC
    losses must learn Q^uniform (computed exactly), while max-backup Q-learning heads for Q*."""
    D, g = 4, 0.9
    out = C.train_chain(
        np.full(3, D),
        np.full(3, g),
        12_000,
        seed=0,
        n_steps=np.array([1, 64, 1]),
        epsilon=1.0,
        digiq_td=np.array([True, False, False]),
    )
    q_unif, q_opt = _q_uniform_policy(D, g), C.chain_q_star(D, g)
    assert np.abs(q_unif - q_opt).max() > 0.2
    for r, name in ((0, "digiq-td"), (1, "mc")):
        err = np.abs(out["q_final"][r] - q_unif).max()
        assert err < 0.07, f"{name}: {err}"
        assert np.abs(out["q_final"][r] - q_opt).max() > 0.15
    assert np.abs(out["q_final"][2] - q_opt).max() < 0.03
