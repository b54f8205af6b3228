"""``digiq report``: a static, self-contained HTML Q-value viewer for a dataset (+ feature cache + critic).

    digiq report dataset=data/sim features=runs/feats critic_dir=runs/critic_td output_dir=runs/report
    digiq report dataset=data/sim output_dir=runs/report_data          # no critic: trajectories + actions

For the first ``max_trajectories`` trajectories the page shows every step's screenshot with its candidate
actions drawn on it (:func:`digiq.viz.draw_actions`) and a table of Q(s, a_i), V(s) and Q - V per candidate,
the argmax-Q candidate (what Best-of-N extraction would pick, Digi-Q Stage 3) highlighted and the dataset
action (index 0, the feature-cache contract) marked. On simulated data (``state_key`` set) the exact Q* of
every candidate is shown too. Plots: Q/V distributions and Q(s, a_dataset) against the discounted return.

Everything the page needs is inlined (base64 images, inline CSS, no scripts or external resources), so
``index.html`` can be mailed or opened from any disk. The output folder (``index.html``, ``plots/*.png``,
``summary.json``) is written through :func:`digiq.utils.io.staged_output`: it appears complete or not at all.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from digiq.actions import Action, action_label, parse_action
from digiq.config import check
from digiq.data.schema import dataset_info, iter_decoded_rows, load_dataset, trajectory_bounds
from digiq.data.transitions import load_transitions
from digiq.envs.registry import env_for_dataset
from digiq.errors import DataError
from digiq.models.critic import open_critic_and_features
from digiq.models.critic_text import CriticInputs, build_inputs, score
from digiq.utils.io import (
    OutputPlan,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    config_fingerprint,
    plan_output,
    staged_output,
)
from digiq.utils.logging import get_logger
from digiq.utils.stats import pearson
from digiq.viz import HIGHLIGHT, colour, draw_actions, hex_colour

log = get_logger(__name__)

# Background of the chosen (argmax-Q) table row; the Chromium test looks for this exact colour.
CHOSEN_BG = (255, 226, 238)


@dataclasses.dataclass
class Config:
    # Dataset folder (digiq schema) whose trajectories are shown.
    dataset: str = ""
    # Feature cache of that dataset (needed with a critic: Q and V are computed from the cached features).
    features: str = ""
    # Trained critic: a `save_critic` folder or a `digiq train-critic` output_dir (its critic/ is used).
    # Empty: no values, the page shows trajectories and candidate actions only.
    critic_dir: str = ""
    output_dir: str = "runs/report"
    # Show the first this many trajectories (in dataset order).
    max_trajectories: int = 10
    # Width in pixels of the screenshots on the page (aspect ratio kept).
    image_width: int = 240
    # Inlined image encoding: png (exact, larger) or jpeg (smaller page for real screenshots).
    image_format: Literal["png", "jpeg"] = "png"
    # Discount for the MC return and Q*; null = the critic's training gamma (critic.json), else 0.95.
    gamma: float | None = None
    # Exact Q* per candidate on rows with a state_key: auto = when the dataset's environment (its
    # digiq_dataset.json source; the simulator when it names none) has one.
    q_star: Literal["auto", "skip"] = "auto"
    # Rows per critic forward pass.
    eval_batch_size: int = 4096
    # At most this many dataset rows (from the start) enter the distribution / scatter plots.
    plot_rows: int = 20000
    # Page title.
    title: str = "digiq Q-value viewer"
    # Replace a finished output at output_dir instead of refusing it.
    overwrite: bool = False

    def validate(self) -> None:
        check(bool(self.dataset), "dataset must be set (a dataset folder)")
        check(
            not self.critic_dir or bool(self.features),
            "a critic needs features (its feature cache) to be set",
        )
        check(self.max_trajectories > 0, "max_trajectories must be > 0")
        check(16 <= self.image_width <= 2048, "image_width must be in [16, 2048]")
        check(self.gamma is None or 0.0 <= self.gamma < 1.0, f"gamma must be in [0, 1), got {self.gamma}")
        check(self.eval_batch_size > 0 and self.plot_rows > 0, "eval_batch_size and plot_rows must be > 0")


# --------------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def critic_values(
    critic: Any,
    inputs: CriticInputs,
    rows: np.ndarray,
    batch: int,
    all_candidates: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """(Q (M, N) or (M, 1) for the dataset action only, V (M,)) for feature rows ``rows``, in float64."""
    actions = inputs.actions
    qs, vs = [], []
    per = max(1, batch // (actions.shape[1] if all_candidates else 1))
    for i in range(0, len(rows), per):
        idx = torch.as_tensor(rows[i : i + per], dtype=torch.long)
        q, v = score(critic, inputs, idx, slice(None) if all_candidates else slice(0, 1))
        qs.append(q.double())
        vs.append(v.double())
    if not qs:
        return np.zeros((0, actions.shape[1] if all_candidates else 1)), np.zeros(0)
    return torch.cat(qs).numpy(), torch.cat(vs).numpy()


# --------------------------------------------------------------------------------------------------
# HTML pieces
# --------------------------------------------------------------------------------------------------

CSS = """
:root { --hi: %(hi)s; --chosen: %(chosen)s; --ink: #1d2330; --muted: #667085; --line: #e4e7ec; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink);
       background: #f5f6f8; }
header { background: #1d2330; color: #fff; padding: 18px 28px; }
header h1 { margin: 0 0 6px; font-size: 22px; }
header .meta { color: #c9d0dc; font-size: 13px; }
header .meta code { color: #fff; }
main { padding: 20px 28px; max-width: 1400px; }
h2 { font-size: 18px; margin: 0 0 4px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 16px 18px; margin: 0 0 18px; }
.plots { display: flex; flex-wrap: wrap; gap: 16px; }
.plots figure { margin: 0; }
.plots img { max-width: 520px; width: 100%%; border: 1px solid var(--line); border-radius: 6px; }
.plots figcaption { color: var(--muted); font-size: 12px; }
.traj .goal { color: var(--muted); margin-bottom: 10px; }
.step { display: flex; gap: 18px; align-items: flex-start; padding: 12px 0; border-top: 1px solid var(--line); }
.step img.shot { border: 1px solid #cfd4dc; border-radius: 6px; flex: none; }
.step .info { flex: 1; min-width: 0; }
.step .facts { margin: 0 0 6px; color: var(--muted); }
.step .facts b { color: var(--ink); }
table.cands { border-collapse: collapse; width: 100%%; max-width: 860px; font-size: 13px; }
table.cands th { text-align: left; font-weight: 600; color: var(--muted); border-bottom: 2px solid var(--line);
                 padding: 4px 8px; }
table.cands td { padding: 4px 8px; border-bottom: 1px solid var(--line); vertical-align: top; }
table.cands td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.cands th.num, table.cands td.num { width: 86px; } table.cands td:first-child { width: 22px; }
table.cands tr.chosen td { background: var(--chosen); font-weight: 600; }
table.cands tr.chosen td:first-child { box-shadow: inset 4px 0 0 var(--hi); }
.swatch { display: inline-block; width: 12px; height: 12px; border-radius: 3px; vertical-align: -1px; }
.tag { display: inline-block; font-size: 11px; font-weight: 600; border-radius: 9px; padding: 0 7px;
       margin-left: 6px; white-space: nowrap; }
.tag.dataset { background: #e0ecff; color: #1849a9; }
.tag.argmax { background: var(--hi); color: #fff; }
.tag.opt { background: #dcfae6; color: #067647; }
.neg { color: #b42318; } .pos { color: #067647; }
.legend { color: var(--muted); font-size: 12px; }
"""


def _fmt(x: float, digits: int = 4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _img_data_uri(img: Any, fmt: str) -> str:
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.convert("RGB").save(buf, format="JPEG", quality=85)
        mime = "image/jpeg"
    else:
        img.save(buf, format="PNG", optimize=True)
        mime = "image/png"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _png_uri(data: bytes) -> str:
    return f"data:image/png;base64,{base64.b64encode(data).decode('ascii')}"


def _png(fig) -> bytes:
    """A finished matplotlib figure as PNG bytes (the figure is closed)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def make_plots(q_data: np.ndarray, v: np.ndarray, q_all: np.ndarray, mc: np.ndarray) -> dict[str, bytes]:
    """PNG bytes of (a) Q/V histograms and (b) Q(s, a_dataset) vs the MC return, Pearson r in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, bytes] = {}
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    bins = 40
    ax.hist(q_data, bins=bins, alpha=0.6, label="Q(s, a_dataset)", color=hex_colour(colour(0)))
    ax.hist(v, bins=bins, alpha=0.6, label="V(s)", color=hex_colour(colour(2)))
    if q_all.size:
        ax.hist(
            q_all, bins=bins, alpha=0.45, label="Q(s, a_i), shown candidates", color=hex_colour(colour(1))
        )
    ax.set_xlabel("value")
    ax.set_ylabel("count")
    ax.set_title(f"Q / V distributions ({len(q_data)} rows)")
    ax.legend(fontsize=8)
    out["q_v_hist.png"] = _png(fig)

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    r = pearson(q_data, mc)
    ax.scatter(mc, q_data, s=6, alpha=0.5, color=hex_colour(colour(0)))
    lo = float(min(mc.min(initial=0.0), q_data.min(initial=0.0)))
    hi = float(max(mc.max(initial=1.0), q_data.max(initial=1.0)))
    ax.plot([lo, hi], [lo, hi], color="#999", lw=1, ls="--", label="y = x")
    ax.set_xlabel("discounted MC return")
    ax.set_ylabel("Q(s, a_dataset)")
    ax.set_title(f"Q vs MC return: Pearson r = {_fmt(r, 3)} ({len(q_data)} rows)")
    ax.legend(fontsize=8)
    out["q_vs_mc.png"] = _png(fig)
    return out


def _text_inputs_html(inputs: CriticInputs, row: int, keep: list[int]) -> str:
    """The strings a text-reading critic embeds for a row (goal, previous action, each shown candidate's
    type | typed text), so a reader sees what V and Q were given; empty for critics without text."""
    t = inputs.texts
    if t is None:
        return ""
    s = t.strings

    def q(x: str) -> str:
        return f"&ldquo;{html.escape(x)}&rdquo;"

    prev = f"{q(s['type'][int(t.prev_type[row])])} | {q(s['text'][int(t.prev_text[row])])}"
    cands = "; ".join(
        f"{i}: {q(s['type'][int(t.cand_type[row, i])])} | {q(s['text'][int(t.cand_text[row, i])])}"
        for i in keep
    )
    return (
        f'<p class="text-inputs">critic text inputs &middot; goal {q(s["goal"][int(t.goal[row])])} &middot; '
        f"previous action {prev} &middot; candidates (type | text) {cands}</p>"
    )


def _candidate_rows(
    acts: list[Action],
    raw: list[str],
    q: np.ndarray | None,
    v: float | None,
    qstar: np.ndarray | None,
    chosen: int | None,
) -> str:
    best = None if qstar is None else set(np.flatnonzero(qstar >= qstar.max() - 1e-6).tolist())
    rows = []
    for i, a in enumerate(acts):
        cls = ["cand"]
        tags = []
        if i == 0:
            cls.append("dataset")
            tags.append('<span class="tag dataset">dataset</span>')
        if chosen is not None and i == chosen:
            cls.append("chosen")
            tags.append('<span class="tag argmax">argmax Q</span>')
        if best is not None and i in best:
            tags.append('<span class="tag opt">Q*-optimal</span>')
        sw = hex_colour(HIGHLIGHT if i == chosen else colour(i))
        attrs = f'class="{" ".join(cls)}" data-index="{i}"'
        cells = [
            f'<td><span class="swatch" style="background:{sw}"></span></td>',
            f'<td class="num">{i}</td>',
            f'<td class="action" title="{html.escape(raw[i])}">{html.escape(action_label(a))}{"".join(tags)}</td>',
        ]
        if q is not None and v is not None:
            adv = float(q[i]) - v
            attrs += f' data-q="{float(q[i])!r}" data-v="{v!r}"'
            sign = "pos" if adv > 0 else "neg" if adv < 0 else ""
            cells += [
                f'<td class="num q">{_fmt(float(q[i]))}</td>',
                f'<td class="num v">{_fmt(v)}</td>',
                f'<td class="num adv {sign}">{adv:+.4f}</td>',
            ]
        if qstar is not None:
            attrs += f' data-qstar="{float(qstar[i])!r}"'
            cells.append(f'<td class="num qstar">{_fmt(float(qstar[i]))}</td>')
        rows.append(f"<tr {attrs}>{''.join(cells)}</tr>")
    head = ["<th></th>", '<th class="num">#</th>', "<th>action</th>"]
    if q is not None:
        head += ['<th class="num">Q</th>', '<th class="num">V</th>', '<th class="num">Q \u2212 V</th>']
    if qstar is not None:
        head.append('<th class="num">Q*</th>')
    return (
        f'<table class="cands"><thead><tr>{"".join(head)}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
    )


# --------------------------------------------------------------------------------------------------
# Recipe
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ReportInputs:
    """What the page is built from: the dataset, its transitions and, with a critic, the critic and its
    feature cache (:func:`open_inputs`)."""

    ds: Any
    tr: Any  # the dataset's transitions (MC returns, rewards, state keys)
    gamma: float
    bounds: list[tuple[int, int]]  # every trajectory's rows
    shown: list[tuple[int, int]]  # the first max_trajectories of them
    critic: Any = None
    feats: Any = None
    inputs: CriticInputs | None = None
    qstar_fn: Any = None  # exact Q* of a simulated state's candidates

    @property
    def num_candidates(self) -> int | None:
        return self.feats.num_candidates if self.feats is not None else None


def open_inputs(cfg: Config) -> ReportInputs:
    ds = load_dataset(cfg.dataset)
    critic = feats = inputs = None
    meta: dict[str, Any] = {}
    if cfg.critic_dir:
        critic, feats, meta = open_critic_and_features(cfg.critic_dir, cfg.features, ds, cfg.dataset)
        inputs = build_inputs(critic, feats.state, feats.actions, ds, cfg.features)
    gamma = cfg.gamma if cfg.gamma is not None else float(meta.get("gamma", 0.95))
    tr, _ = load_transitions(cfg.dataset, gamma)
    bounds = trajectory_bounds(ds.select_columns(["traj_id"]))
    shown = bounds[: cfg.max_trajectories]
    qstar_fn = None
    if cfg.q_star == "auto" and any(tr.state_key[s] for s, _ in shown):
        spec = env_for_dataset(dataset_info(cfg.dataset).get("source"))
        qstar_fn = spec.q_star(spec.open()) if spec.q_star is not None else None
    return ReportInputs(ds, tr, gamma, bounds, shown, critic, feats, inputs, qstar_fn)


@dataclasses.dataclass
class _Tally:
    """Per-step numbers the summary and the plots collect across the shown trajectories."""

    q_shown: list[np.ndarray] = dataclasses.field(default_factory=list)  # Q of every shown candidate
    agree: list[bool] = dataclasses.field(default_factory=list)  # argmax Q is Q*-optimal


def render_step(cfg: Config, inp: ReportInputs, r: int, row: dict, q_row, v_row, tally: _Tally) -> str:
    """One step: the screenshot with its candidates drawn, the facts line and the candidate table."""
    N = inp.num_candidates
    raw = list(row["candidates"]) or [row["action"]]
    keep = list(range(len(raw)))
    q = v = None
    chosen = None
    if inp.critic is not None and inp.feats is not None:
        if len(raw) != N and not (N == 1 and not row["candidates"]):
            raise DataError(
                f"{cfg.dataset}: trajectory {row['traj_id']} step {row['step_id']} (row {r}) has "
                f"{len(raw)} candidates but the feature cache {cfg.features} has N={N}"
            )
        if N == 1:
            raw = raw[:1]
        keep = list(range(len(raw)))
        if inp.feats.valid is not None:  # padding candidates are not shown
            keep = [i for i in keep if bool(inp.feats.valid[r, i])]
        q = q_row[keep]
        v = float(v_row)
        chosen = int(np.argmax(q))
        tally.q_shown.append(q)
    raw = [raw[i] for i in keep]
    acts = [parse_action(x) for x in raw]
    qstar = None
    if inp.qstar_fn is not None and row["state_key"]:
        qstar = inp.qstar_fn(row["state_key"], raw, inp.gamma)
        if chosen is not None:
            tally.agree.append(bool(qstar[chosen] >= qstar.max() - 1e-6))
    labels = [str(i) for i in range(len(acts))]
    img = draw_actions(row["screenshot"], acts, labels, highlight=chosen, width=cfg.image_width)
    facts = [
        f"<b>step {row['step_id']}</b>",
        f"r = {_fmt(float(row['reward']), 2)}",
        f"MC return = {_fmt(float(inp.tr.mc_return[r]))}",
    ]
    if v is not None:
        facts.append(f"V(s) = <b>{_fmt(v)}</b>")
    if row["done"]:
        facts.append("done")
    text_html = _text_inputs_html(inp.inputs, r, keep) if inp.inputs is not None else ""
    return (
        f'<div class="step" data-row="{r}" data-step="{row["step_id"]}">'
        f'<img class="shot" width="{img.width}" height="{img.height}" alt="step {row["step_id"]}" '
        f'src="{_img_data_uri(img, cfg.image_format)}">'
        f'<div class="info"><p class="facts">{" &middot; ".join(facts)}</p>'
        f"{text_html}{_candidate_rows(acts, raw, q, v, qstar, chosen)}</div></div>"
    )


def render_trajectory(cfg: Config, inp: ReportInputs, s: int, e: int, tally: _Tally) -> str:
    """One trajectory's card (rows ``s..e``): its goal and return, then every step."""
    ds, rows = inp.ds, np.arange(s, e)
    q_rows = v_rows = None
    if inp.critic is not None:
        assert inp.feats is not None
        assert inp.inputs is not None
        q_rows, v_rows = critic_values(inp.critic, inp.inputs, rows, cfg.eval_batch_size, True)
    # Decoded by schema.iter_decoded_rows: a corrupt screenshot names its trajectory/step (DataError).
    part = list(iter_decoded_rows(ds.select(range(s, e)), ds.column_names, source=str(cfg.dataset)))
    steps_html = [
        render_step(
            cfg,
            inp,
            r,
            part[j],
            None if q_rows is None else q_rows[j],
            None if v_rows is None else v_rows[j],
            tally,
        )
        for j, r in enumerate(rows.tolist())
    ]
    first = ds[s]
    ret = float(inp.tr.mc_return[s])
    return (
        f'<section class="card traj" id="traj-{first["traj_id"]}" data-traj="{first["traj_id"]}">'
        f"<h2>Trajectory {first['traj_id']}</h2>"
        f'<div class="goal">Goal: <b>{html.escape(first["task"])}</b> &middot; {e - s} steps &middot; '
        f"return {_fmt(ret)} &middot; {'success' if float(np.max(inp.tr.reward[s:e])) > 0 else 'no reward'}</div>"
        f"{''.join(steps_html)}</section>"
    )


def value_plots(cfg: Config, inp: ReportInputs, tally: _Tally) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The plots (PNG bytes) and summary numbers of Q(s, a_dataset) and V(s) on the first plot_rows rows."""
    if inp.critic is None or inp.feats is None:
        return {}, {}
    prow = np.arange(min(len(inp.ds), cfg.plot_rows))
    assert inp.inputs is not None
    q_d, v_d = critic_values(inp.critic, inp.inputs, prow, cfg.eval_batch_size, False)
    q_d = q_d[:, 0]
    mc = inp.tr.mc_return[prow].astype(np.float64)
    plots = make_plots(q_d, v_d, np.concatenate(tally.q_shown) if tally.q_shown else np.zeros(0), mc)
    numbers = {
        "q_mc_pearson": pearson(q_d, mc),
        "q_mean": float(q_d.mean()),
        "v_mean": float(v_d.mean()),
        "plot_rows": len(prow),
        "num_candidates": inp.num_candidates,
    }
    return plots, numbers


def render_page(cfg: Config, summary: dict[str, Any], plots: dict[str, bytes], sections: list[str]) -> str:
    """The whole self-contained page: header, legend, plots and trajectory cards."""
    meta_bits = [
        f"dataset <code>{html.escape(cfg.dataset)}</code>",
        f"{summary['num_rows']} rows",
        f"gamma {summary['gamma']}",
    ]
    if cfg.critic_dir:
        meta_bits += [
            f"critic <code>{html.escape(cfg.critic_dir)}</code>",
            f"features <code>{html.escape(cfg.features)}</code>",
        ]
        meta_bits.append(f"Pearson(Q, MC) {_fmt(summary['q_mc_pearson'], 3)}")
    else:
        meta_bits.append("no critic: trajectories and actions only")
    if "shown_argmax_q_star_optimal" in summary:
        meta_bits.append(
            f"argmax Q is Q*-optimal on {100 * summary['shown_argmax_q_star_optimal']:.1f}% of shown steps"
        )
    plots_html = ""
    if plots:
        figs = "".join(
            f'<figure><img alt="{name}" src="{_png_uri(data)}"><figcaption>{name}</figcaption></figure>'
            for name, data in plots.items()
        )
        plots_html = (
            f'<section class="card" id="plots"><h2>Value plots</h2><div class="plots">{figs}</div></section>'
        )
    legend = (
        '<p class="legend">Taps are circles, swipes arrows (touch \u2192 lift), typed text a label at the bottom, '
        "key presses a badge at the top; numbers are candidate indices (0 = the dataset action). "
        "The argmax-Q candidate is drawn and listed in the highlight colour.</p>"
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(cfg.title)}</title>"
        f"<style>{CSS % {'hi': hex_colour(HIGHLIGHT), 'chosen': hex_colour(CHOSEN_BG)}}</style></head><body>"
        f'<header><h1>{html.escape(cfg.title)}</h1><div class="meta">{" &middot; ".join(meta_bits)}</div></header>'
        f"<main>{legend}{plots_html}{''.join(sections)}</main></body></html>"
    )


def write_report(plan: OutputPlan, page: str, plots: dict[str, bytes], summary: dict[str, Any]) -> None:
    """``index.html``, ``plots/*.png`` and ``summary.json``, swapped into place together."""
    with staged_output(plan) as tmp:
        atomic_write_text(tmp / "index.html", page)
        for name, data in plots.items():
            atomic_write_bytes(tmp / "plots" / name, data)
        atomic_write_json(tmp / "summary.json", summary)


def run(cfg: Config) -> dict[str, Any]:
    """Write the report folder; returns a summary (also written to ``summary.json``)."""
    plan = plan_output(
        cfg.output_dir,
        "report",
        overwrite=cfg.overwrite,
        fingerprint=config_fingerprint(cfg),
        resumable=False,
    )
    inp = open_inputs(cfg)
    summary: dict[str, Any] = {
        "dataset": cfg.dataset,
        "features": cfg.features,
        "critic_dir": cfg.critic_dir,
        "gamma": inp.gamma,
        "num_rows": len(inp.ds),
        "num_trajectories": len(inp.bounds),
        "shown_trajectories": len(inp.shown),
        "shown_steps": sum(e - s for s, e in inp.shown),
    }
    tally = _Tally()
    sections = []
    for t_i, (s, e) in enumerate(tqdm(inp.shown, desc="report", unit="traj")):
        sections.append(render_trajectory(cfg, inp, s, e, tally))
        log.debug("trajectory %d/%d rendered", t_i + 1, len(inp.shown))
    plots, numbers = value_plots(cfg, inp, tally)
    summary.update(numbers)
    if tally.agree:
        summary["shown_argmax_q_star_optimal"] = float(np.mean(tally.agree))
    page = render_page(cfg, summary, plots, sections)
    summary = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in summary.items()}
    write_report(plan, page, plots, summary)
    log.info("report written to %s", Path(cfg.output_dir) / "index.html")
    return json.loads(json.dumps(summary))
