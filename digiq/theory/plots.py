"""One matplotlib figure per experiment, drawn from the experiment's CSV tables (Agg backend, no display)."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from digiq.theory.common import Result  # noqa: E402
from digiq.utils.io import atomic_write_bytes  # noqa: E402

COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")


def _band(ax, x, cols, prefix, color, label, style="-", band=True):
    ax.plot(x, cols[f"{prefix}_mean"], style, color=color, label=label, lw=1.5)
    if band:
        ax.fill_between(x, cols[f"{prefix}_min"], cols[f"{prefix}_max"], color=color, alpha=0.18, lw=0)


def _value_iteration(res: Result, fig) -> None:
    c = res.tables["value-iteration"]
    ax = fig.add_subplot(1, 1, 1)
    for label, color in (("zero", COLORS[0]), ("random", COLORS[1])):
        err = np.maximum(c[f"error_{label}_init"], 1e-17)
        ax.semilogy(c["k"], err, "o-", ms=3, color=color, label=f"||T^k Q0 - Q*||, Q0 = {label}")
        ax.semilogy(
            c["k"], c[f"bound_{label}_init"], "--", color=color, label=f"gamma^k ||Q0 - Q*|| ({label})"
        )
    ax.set(
        xlabel="sweep k", ylabel="sup-norm error", title=f"Value iteration, gamma = {res.summary['gamma']}"
    )
    ax.legend(fontsize=8)


def _q_learning(res: Result, fig) -> None:
    c = res.tables["q-learning"]
    ax = fig.add_subplot(1, 1, 1)
    x = np.maximum(c["step"], 1)
    names = {"visit": "alpha = 1/(n(s,a)+1)", "global": "alpha = 1/(t+1)", "constant": "alpha constant"}
    for (k, lab), color in zip(names.items(), COLORS):
        _band(ax, x, c, k, color, lab)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set(xlabel="step t", ylabel="||Q_t - Q*||_inf", title="Tabular Q-learning (band: min-max over seeds)")
    ax.legend(fontsize=8)


def _function_approximation(res: Result, fig) -> None:
    c = res.tables["function-approximation"]
    s = res.summary
    ax = fig.add_subplot(1, 2, 1)
    x = np.maximum(c["step"], 1)
    _band(ax, x, c, "sup_error", COLORS[0], "semi-gradient Q-learning ||Q_theta - Q*||_inf")
    ax.axhline(s["floor_l2_projection_sup"], color="k", ls="--", label="||Pi Q* - Q*||_inf (LS projection)")
    ax.axhline(s["floor_minimax_sup"], color="gray", ls=":", label="min_theta ||Phi theta - Q*||_inf")
    ax.set_xscale("log")
    ax.set(xlabel="step t", ylabel="sup-norm error", title="3 cosine features")
    ax.legend(fontsize=7)
    v = res.tables["function-approximation_values"]
    ax2 = fig.add_subplot(1, 2, 2)
    i = np.arange(len(v["q_star"]))
    w = 0.27
    ax2.bar(i - w, v["q_star"], w, label="Q*")
    ax2.bar(i, v["projection"], w, label="Pi Q*")
    ax2.bar(i + w, v["q_theta_final_mean"], w, label="Q_theta (final)")
    ax2.set_xticks(i, [f"{st},{a}" for st, a in zip(v["state"], v["action"])], fontsize=7)
    ax2.set(xlabel="(state, action)", title="values per pair")
    ax2.legend(fontsize=7)


def _chain_depth(res: Result, fig) -> None:
    c = res.tables["chain-depth"]
    depths = sorted({int(k[5:].split("_")[0]) for k in c if k.startswith("depth")})
    ax = fig.add_subplot(1, 2, 1)
    for D, color in zip(depths, COLORS):
        _band(ax, c["step"], c, f"depth{D}", color, f"D = {D} (Q-learning)")
        _band(ax, c["step"], c, f"depth{D}_oracle", color, f"D = {D} (fit Q* directly)", "--", band=False)
    ax.set_yscale("log")
    ax.set_ylim(bottom=1e-4)  # D = 2 is fitted to round-off; below 1e-4 is not informative
    ax.set(xlabel="step", ylabel="||Q_theta - Q*||_inf", title=f"Chain depth, gamma = {res.summary['gamma']}")
    ax.legend(fontsize=7)
    b = res.tables["chain-depth_bias"]
    ax2 = fig.add_subplot(1, 2, 2)
    for D, color in zip(depths, COLORS):
        m = b["depth"] == D
        ax2.plot(b["distance"][m], b["bias_mean"][m], "o-", ms=3, color=color, label=f"D = {D}")
        ax2.fill_between(b["distance"][m], b["bias_min"][m], b["bias_max"][m], color=color, alpha=0.18, lw=0)
    ax2.axhline(0, color="k", lw=0.8)
    ax2.set(
        xlabel="distance to terminal", ylabel="Q_theta(s, fwd) - Q*(s, fwd)", title="final bias per state"
    )
    ax2.legend(fontsize=7)


def _discount(res: Result, fig) -> None:
    c = res.tables["discount"]
    gammas = [k[5:-5] for k in c if k.startswith("gamma") and k.endswith("_mean") and k.count("_") == 1]
    ax = fig.add_subplot(1, 2, 1)
    for g, color in zip(gammas, COLORS):
        _band(ax, c["step"], c, f"gamma{g}", color, f"gamma = {g} (Q-learning)")
        _band(ax, c["step"], c, f"gamma{g}_oracle", color, f"gamma = {g} (fit Q* directly)", "--", band=False)
    ax.set_yscale("log")
    ax.set(
        xlabel="step", ylabel="||Q_theta - Q*||_inf", title=f"Chain-{res.summary['depth']}, bands over seeds"
    )
    ax.legend(fontsize=7)
    bk = res.tables["discount_backup"]
    K, S = int(bk["sweep"].max()) + 1, int(bk["state"].max()) + 1
    ax2 = fig.add_subplot(1, 2, 2)
    im = ax2.imshow(bk["value"].reshape(K, S), cmap="viridis", origin="lower", aspect="auto")
    for k in range(K):
        for s in range(S):
            ax2.text(s, k, f"{bk['value'][k * S + s]:.2f}", ha="center", va="center", fontsize=7, color="w")
    fig.colorbar(im, ax=ax2)
    ax2.set(xlabel="state (goal at the right)", ylabel="sweep k", title=f"V_k = max T^k 0, chain-{S}")


def _n_step(res: Result, fig) -> None:
    c = res.tables["n-step"]
    labels = [k[:-5] for k in c if k.endswith("_mean")]
    ax = fig.add_subplot(1, 1, 1)
    for lab, color in zip(labels, COLORS):
        name = {"mc": "Digi-Q MC (return regression)", "digiq_td": "Digi-Q TD (Q, V, EMA targets)"}.get(
            lab, f"{lab[1:]}-step Q-learning"
        )
        _band(ax, c["step"], c, lab, color, name)
    ax.set_yscale("log")
    s = res.summary
    ax.set(xlabel="step", ylabel="||Q_theta - Q*||_inf", title=f"Chain-{s['depth']}, gamma = {s['gamma']}")
    ax.legend(fontsize=8)


PLOTTERS = {
    "value-iteration": (_value_iteration, (6.5, 4.2)),
    "q-learning": (_q_learning, (6.5, 4.2)),
    "function-approximation": (_function_approximation, (11, 4.2)),
    "chain-depth": (_chain_depth, (11, 4.2)),
    "discount": (_discount, (11, 4.2)),
    "n-step": (_n_step, (6.5, 4.2)),
}


def plot_result(res: Result, path: str | Path, dpi: int = 90) -> Path:
    """Draw ``res`` into a PNG at ``path`` (written atomically)."""
    draw, size = PLOTTERS[res.name]
    fig = plt.figure(figsize=size)
    try:
        draw(res, fig)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
