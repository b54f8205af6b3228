"""The paper's ablations on a finished `digiq pipeline` run, like for like, on validation goals by default.

Each pair of arms differs in exactly the thing named (Digi-Q paper, arXiv:2502.15760, Tables 1-3). The
*actor start* is the pipeline's `extract_policy.init_policy`: pi_beta, or with `actor_from=behaviour` the model
that collected the data (the paper fine-tunes AutoUI, Sec. 5.1); Filtered BC and every extraction arm start there.

- `behaviour_greedy` / `behaviour_sampled`: reference rows when a model collected the data (`collect.policy`),
  evaluated greedy and at `collect.temperature` (as it collected) through the same evaluate stage and pages;
- `pi_beta`: the behaviour-cloned policy the pipeline trained;
- `filtered_bc`: BC on the successful trajectories of the same data, from the actor start (Table 1's baseline);
- `td` / `mc`: the pipeline's critic trained with TD / with the MC return, all else equal (its no-op backup
  and dueling head included); TD over every N, MC at the largest N;
- `td_paper` / `mc_paper`: the same pair with the paper's critic (no no-op backup, a direct Q head, no
  conservative term);
- `q_star`, an **oracle reference** (simulator only): the exact Q* scores the same candidates, the ceiling of
  extraction over them; it reads privileged state, so it is a reference row, never a method;
- `td_pre` (`--pre-stage1`): TD on features of the VLM before Stage 1 (the paper's off-the-shelf arm).

Per seed it trains each critic / policy, extracts, and evaluates on `--split` (default **val**: every
default is chosen there; `--split test` is for the reported tables only). Successes are pooled over
independent units: on the simulator (seed, goal) pairs, not repeated episodes of one deterministic goal; on an
environment whose every episode is a fresh instance (MiniWoB++: its own page seed) the episodes themselves,
with a 95% Wilson interval, and ablation.md adds successes / episodes per task and arm. Writes
`<out>/ablation.md`, `ablation.json` and `ablation.png`.

    PYTHONPATH=. python scripts/ablate.py --pipeline runs/pipeline --out runs/ablation_val --seeds 0 1 2
    PYTHONPATH=. python scripts/ablate.py --pipeline runs/pipeline --split test --out runs/ablation_test
    PYTHONPATH=. python scripts/ablate.py --pipeline runs/miniwob-paper --config configs/pipeline/miniwob-paper.yaml \
        --actor-from behaviour --seeds 0 --ns 16 --episodes 240 --out runs/ablation_mw_paper_behaviour \
        --arms behaviour_greedy behaviour_sampled pi_beta filtered_bc td mc

Seeds vary critic training, extraction and evaluation; the data, Stage 1 and pi_beta are the pipeline run's
(run the pipeline with other seeds for whole-pipeline draws).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import yaml

from digiq.config import ConfigError, load_config, to_dict
from digiq.envs.registry import episode_unit, get_env
from digiq.errors import DigiqError
from digiq.stages import cache_features, evaluate, extract_policy, pipeline, train_bc, train_critic
from digiq.training.policy_loop import POLICY_DIR
from digiq.utils.io import is_complete
from digiq.utils.logging import read_metrics
from digiq.utils.stats import unit_success

METHODS = {
    "behaviour_greedy": "[reference] behaviour model, greedy",
    "behaviour_sampled": "[reference] behaviour model, sampled at collect.temperature",
    "pi_beta": "pi_beta (BC)",
    "filtered_bc": "Filtered BC",
    "td": "Digi-Q TD",
    "mc": "Digi-Q MC",
    "td_paper": "Digi-Q TD, paper's critic",
    "mc_paper": "Digi-Q MC, paper's critic",
    "q_star": "[oracle] exact Q* over the same candidates",
    "td_pre": "Digi-Q TD, pre-Stage-1 features",
}
# Every arm but td_pre, which runs with --pre-stage1 (one extra feature pass).
DEFAULT_ARMS = tuple(a for a in METHODS if a != "td_pre")
BEHAVIOUR_ARMS = ("behaviour_greedy", "behaviour_sampled")
CRITIC_ARMS = ("td", "mc", "td_paper", "mc_paper", "td_pre")


def critic_overrides(arm: str, tc: train_critic.Config) -> dict:
    """The train-critic fields an arm changes from the pipeline's critic ``tc`` (and nothing else)."""
    paper = {
        "noop": dataclasses.replace(tc.noop, enabled=False),
        "critic": dataclasses.replace(tc.critic, q_param="direct"),
        "conservative": dataclasses.replace(tc.conservative, weight=0.0),
    }
    return {
        "td": {"critic_loss": "td"},
        "mc": {"critic_loss": "mc"},
        "td_paper": {"critic_loss": "td", **paper},
        "mc_paper": {"critic_loss": "mc", **paper},
        "td_pre": {"critic_loss": "td"},
    }[arm]


def check_split(pcfg: pipeline.Config, wired: dict, split: str) -> None:
    """Refuse a split the benchmark does not have, before any training."""
    if pcfg.env != "sim":
        return  # MiniWoB++ draws val and test pages from their own seed ranges (digiq.envs.miniwob)
    from digiq.sim.phone import SimPhone

    try:
        SimPhone(wired["evaluate"].sim).tasks(split)
    except DigiqError as e:
        raise SystemExit(
            f"--split {split}: {e}. Defaults are chosen on validation goals; a benchmark without them can only "
            "give reported tables (--split test)"
        ) from None


def select_arms(requested: list[str] | None, pcfg: pipeline.Config, pre_stage1: bool) -> list[str]:
    """The arms to run, in METHODS order. The defaults leave out the arms this run cannot have (the exact Q*
    off the simulator, the behaviour rows when a scripted policy collected); asking for one of them refuses."""
    unavailable = {}
    if get_env(pcfg.env).q_star is None:
        unavailable["q_star"] = f"env={pcfg.env} has no exact Q*"
    if pcfg.collect.policy == "scripted":
        for arm in BEHAVIOUR_ARMS:
            unavailable[arm] = "collect.policy is the scripted policy, not a model"
    bad = [f"{a} ({unavailable[a]})" for a in requested or () if a in unavailable]
    if bad:
        raise SystemExit(f"--arms: this pipeline run cannot have {', '.join(bad)}")
    wanted = set(requested or DEFAULT_ARMS) - set(unavailable)
    return [a for a in METHODS if a in wanted or (a == "td_pre" and pre_stage1)]


def _evaluate(
    policy: str,
    out: Path,
    seed: int,
    episodes: int,
    base: evaluate.Config,
    split: str,
    temperature: float | None = None,
) -> dict:
    if (out / "metrics.json").exists():
        return json.loads((out / "metrics.json").read_text())
    cfg = dataclasses.replace(
        base, policy=policy, mode="sim", seed=seed, num_episodes=episodes, output_dir=str(out), split=split
    )
    if temperature is not None:
        cfg.temperature = temperature
    return evaluate.run(cfg)


def _check_setup(out: Path, setup: dict) -> None:
    """Finished arms in ``out`` are reused: refuse one written with another actor start, threshold, split or
    episode count, whose arms would be mixed in silently."""
    path = out / "setup.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = [f"{k}: {old.get(k)!r} there, {v!r} now" for k, v in setup.items() if old.get(k) != v]
        if diff:
            raise SystemExit(
                f"{out} holds an ablation of another setup ({'; '.join(diff)}): use another --out"
            )
    path.write_text(json.dumps(setup, indent=2))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", default="runs/pipeline", help="a finished `digiq pipeline` output_dir")
    ap.add_argument("--config", default=None, help="the pipeline YAML it was run with (for stage settings)")
    ap.add_argument("--out", default=None, help="output folder (default runs/ablation_<split>)")
    ap.add_argument(
        "--split",
        choices=("val", "test"),
        default="val",
        help="goals to evaluate on: val (default; where defaults are chosen) or test (reported tables only)",
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ns", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--episodes", type=int, default=100, help="episodes per policy and seed")
    ap.add_argument(
        "--arms",
        nargs="+",
        choices=DEFAULT_ARMS,
        default=None,
        help="which arms to run (default: all that this pipeline run can have)",
    )
    ap.add_argument(
        "--actor-from",
        choices=("pi_beta", "behaviour"),
        default=None,
        help="the actor start of Filtered BC and the extraction arms (default: the pipeline config's actor_from)",
    )
    ap.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="extract_policy.threshold of the extraction arms (default: the pipeline config's)",
    )
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument(
        "--pre-stage1",
        action="store_true",
        help="also train TD critics on features of the VLM before Stage-1 fine-tuning (one extra feature pass)",
    )
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = Path(args.pipeline)
    overrides = [f"output_dir={pipe}"]
    if args.actor_from is not None:
        overrides.append(f"actor_from={args.actor_from}")
    if args.threshold is not None:
        overrides.append(f"extract_policy.threshold={args.threshold}")
    try:
        pcfg = load_config(pipeline.Config, args.config, overrides)
    except ConfigError as e:
        raise SystemExit(str(e)) from None
    wired = pipeline.wire(pcfg)
    start = wired["extract_policy"].init_policy  # the actor start: Filtered BC's and every extraction's
    pi_beta = str(Path(wired["train_bc"].output_dir) / POLICY_DIR)
    unit = episode_unit(pcfg.env)
    check_split(pcfg, wired, args.split)
    for stage in ("candidates", "cache_features", "train_bc"):
        folder = pipe / pipeline.FOLDERS[stage]
        if not is_complete(folder):
            raise SystemExit(f"{folder} is not a finished {stage} output: run `digiq pipeline` first")
    arms = select_arms(args.arms, pcfg, args.pre_stage1)
    out = Path(args.out or f"runs/ablation_{args.split}")
    out.mkdir(parents=True, exist_ok=True)
    threshold = wired["extract_policy"].threshold
    _check_setup(
        out,
        {"actor_start": start, "threshold": threshold, "split": args.split, "episodes": args.episodes},
    )
    n_max = max(args.ns)
    rows: list[dict] = []
    t0 = time.perf_counter()

    def ev(policy: str, name: str, seed: int, temperature: float | None = None) -> dict:
        return _evaluate(
            policy,
            out / f"s{seed}/eval_{name}",
            seed,
            args.episodes,
            wired["evaluate"],
            args.split,
            temperature,
        )

    for seed in args.seeds:
        tc = wired["train_critic"]
        for arm in arms:
            if arm in BEHAVIOUR_ARMS:  # the model that collected the data, as itself
                t = 0.0 if arm == "behaviour_greedy" else pcfg.collect.temperature
                rows.append(_row(seed, arm, 0, ev(wired["collect"].policy, arm, seed, t), temperature=t))
            elif arm == "pi_beta":
                rows.append(_row(seed, arm, 0, ev(pi_beta, "bc", seed)))
            elif arm == "filtered_bc":
                folder = _run_once(
                    train_bc,
                    wired["train_bc"],
                    out / f"s{seed}/filtered_bc",
                    POLICY_DIR,
                    model=dataclasses.replace(wired["train_bc"].model, name_or_path=start),
                    trajectories="successful",
                    seed=seed,
                )
                rows.append(_row(seed, arm, 0, ev(str(folder / POLICY_DIR), "filtered_bc", seed)))
            elif arm == "q_star":
                folder = _run_once(
                    extract_policy,
                    wired["extract_policy"],
                    out / f"s{seed}/extract_q_star_n{n_max}",
                    "policy",
                    scorer="q_star",
                    features="",
                    critic_dir="",
                    num_candidates=n_max,
                    seed=seed,
                )
                rows.append(_row(seed, arm, n_max, ev(str(folder / "policy"), f"q_star_n{n_max}", seed)))
            else:
                features = _pre_stage1_features(wired, out) if arm == "td_pre" else tc.features
                critic_dir = _run_once(
                    train_critic,
                    tc,
                    out / f"s{seed}/critic_{arm}",
                    "critic",
                    features=features,
                    seed=seed,
                    **critic_overrides(arm, tc),
                )
                cmetrics = json.loads((critic_dir / "metrics.json").read_text())
                cmetrics.update(_last_validations(critic_dir))
                for n in args.ns if arm == "td" else [n_max]:
                    extract_dir = _run_once(
                        extract_policy,
                        wired["extract_policy"],
                        out / f"s{seed}/extract_{arm}_n{n}",
                        "policy",
                        critic_dir=str(critic_dir / "critic"),
                        features=features,
                        num_candidates=n,
                        seed=seed,
                    )
                    m = ev(str(extract_dir / "policy"), f"{arm}_n{n}", seed)
                    rows.append(
                        _row(
                            seed,
                            arm,
                            n,
                            m,
                            critic_top1=cmetrics.get("val/qstar_top1_agreement"),
                            critic_spearman=cmetrics.get("val/qstar_spearman"),
                            critic_top1_last5=cmetrics.get("top1_last5"),
                            critic_spearman_last5=cmetrics.get("spearman_last5"),
                        )
                    )
        (out / "ablation.json").write_text(json.dumps(rows, indent=2))
    text = header(args.split, args.seeds, args.episodes, unit, pcfg.actor_from, start, threshold)
    text += table(rows, unit) + "\n\n"
    if unit == "page":
        text += per_task_table(rows) + "\n\n"
    if any(r.get("critic_top1") is not None for r in rows):  # ranking against Q* needs an exact Q*
        text += critic_table(rows) + "\n\n"
    (out / "ablation.md").write_text(text + f"Total time: {time.perf_counter() - t0:.0f} s\n")
    plot(rows, out / "ablation.png", args.split, unit, pcfg.env)
    print(text)
    print(f"wrote {out / 'ablation.md'} and {out / 'ablation.png'}")


def _row(seed: int, arm: str, n: int, m: dict, **extra) -> dict:
    keys = ("success_rate", "ci_low", "ci_high", "num_episodes", "split", "per_task")
    return {"seed": seed, "arm": arm, "method": METHODS[arm], "n": n, **{k: m.get(k) for k in keys}, **extra}


def _run_once(stage, base, folder: Path, product: str, **fields) -> Path:
    """Run ``stage`` with ``base`` + ``fields`` into ``folder`` unless ``folder/product`` is already complete
    (a re-run of the ablation resumes where it stopped); returns ``folder``."""
    cfg = dataclasses.replace(base, output_dir=str(folder), overwrite=True, **fields)
    if is_complete(folder / product):
        _check_reuse(folder, cfg)
    else:
        stage.run(cfg)
    return folder


def _start_and_threshold(cfg: dict) -> dict:
    model = cfg.get("model") or {}
    return {
        "init_policy": cfg.get("init_policy"),
        "model": model.get("name_or_path") if isinstance(model, dict) else None,
        "threshold": cfg.get("threshold"),
    }


def _check_reuse(folder: Path, cfg) -> None:
    """A finished arm is reused only when it started from the same weights with the same threshold (an
    ablation folder of another actor start would otherwise mix its arms in silently)."""
    path = folder / "config.yaml"
    if not path.exists():
        return
    saved = _start_and_threshold(yaml.safe_load(path.read_text()) or {})
    want = _start_and_threshold(to_dict(cfg))
    diff = [f"{k} {saved[k]!r} there, {want[k]!r} now" for k in want if saved[k] != want[k]]
    if diff:
        raise SystemExit(f"{folder} was run with another setup ({'; '.join(diff)}): use another --out")


def _pre_stage1_features(wired: dict, out: Path) -> str:
    """Features of the same rows from the VLM Stage 1 started from (its initial weights), cached once."""
    folder = out / "features_pre_stage1"
    if not is_complete(folder):
        base = wired["finetune_vlm"].model  # what finetune-vlm loaded before training
        cfg = dataclasses.replace(
            wired["cache_features"],
            model=dataclasses.replace(
                wired["cache_features"].model, name_or_path=base.name_or_path, tiny_seed=base.tiny_seed
            ),
            output_dir=str(folder),
            overwrite=True,
        )
        cache_features.run(cfg)
    return str(folder)


def _last_validations(run_dir: Path, k: int = 5) -> dict[str, float]:
    """Mean of the last ``k`` per-epoch validations: a steadier summary than the final epoch alone, whose
    top-1 swings with argmax over near-tied candidates."""
    vals = [v for v in read_metrics(run_dir) if "val/qstar_top1_agreement" in v][-k:]
    if not vals:
        return {}
    return {
        "top1_last5": float(np.mean([v["val/qstar_top1_agreement"] for v in vals])),
        "spearman_last5": float(np.nanmean([v["val/qstar_spearman"] for v in vals])),
    }


def _or_nan(x: float | None) -> float:
    return np.nan if x is None else x


def pooled(rs: list[dict], unit: str = "goal") -> tuple[float, float, float, int]:
    """Success of the rows of one arm, ``(rate, lo, hi, units)`` with a 95% interval. ``unit='goal'``: over
    (seed, goal) units, each counted once with its own success fraction (repeated episodes of a deterministic
    goal are one outcome). ``unit='page'``: over episodes, Wilson's interval on the pooled counts (every
    episode a fresh page, an independent outcome)."""
    return unit_success([tuple(v) for r in rs for v in (r.get("per_task") or {}).values()], unit)


# unit -> (what the success is over, the count column's name)
UNIT_WORDS = {"goal": ("(seed, goal) units", "units"), "page": ("episodes (unit = page)", "episodes")}


def header(
    split: str,
    seeds: list[int],
    episodes: int,
    unit: str,
    actor_from: str,
    start: str,
    threshold: float,
) -> str:
    """ablation.md's opening: what was evaluated, over which units the intervals are, and the actor start."""
    if unit == "page":
        what = (
            f"Split: **{split}** pages; seeds {seeds}; {episodes} episodes per policy and seed, each on a fresh "
            "page seed. Intervals: 95% Wilson over episodes (unit = page: each episode is an independent "
            "outcome), not clustered over (seed, task)."
        )
    else:
        what = f"Split: **{split}** goals; seeds {seeds}; {episodes} episodes per policy and seed."
    return (
        f"{what}\n\nActor start of Filtered BC and the extraction arms: `{start}` (actor_from={actor_from}); "
        f"extraction threshold {threshold:g}.\n\n"
    )


def critic_table(rows: list[dict]) -> str:
    """Critic ranking quality per arm: mean +- std over seeds of top-1 agreement with argmax Q* and Spearman."""
    per: dict[str, dict[int, dict]] = {}
    for r in rows:
        if r.get("critic_top1") is not None:
            per.setdefault(r["method"], {})[r["seed"]] = r
    lines = [
        "| critic | seeds | top-1 vs argmax Q* (final) | Spearman vs Q* (final) | per seed top-1 | "
        "top-1, mean of last 5 epochs | Spearman, last 5 |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, by_seed in per.items():
        rs = list(by_seed.values())
        t1 = np.array([r["critic_top1"] for r in rs], dtype=float)
        sp = np.array([r["critic_spearman"] for r in rs], dtype=float)
        l5 = np.array([_or_nan(r.get("critic_top1_last5")) for r in rs], dtype=float)
        s5 = np.array([_or_nan(r.get("critic_spearman_last5")) for r in rs], dtype=float)
        lines.append(
            f"| {method} | {len(t1)} | {t1.mean():.3f} +- {t1.std():.3f} | {sp.mean():.3f} +- {sp.std():.3f} | "
            f"{', '.join(f'{x:.3f}' for x in t1)} | {np.mean(l5):.3f} +- {np.std(l5):.3f} | "
            f"{np.mean(s5):.3f} +- {np.std(s5):.3f} |"
        )
    return "\n".join(lines)


def _groups(rows: list[dict]) -> dict[tuple[str, int], list[dict]]:
    g: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        g.setdefault((r["method"], r["n"]), []).append(r)
    return g


def _ordered_groups(rows: list[dict]) -> list[tuple[tuple[str, int], list[dict]]]:
    """The (method, N) groups in METHODS order, then by N."""
    order = {m: i for i, m in enumerate(METHODS.values())}
    return sorted(_groups(rows).items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0][1]))


def table(rows: list[dict], unit: str = "goal") -> str:
    """One line per (arm, N), in METHODS order: success over independent units with a 95% interval."""
    over, count = UNIT_WORDS[unit]
    lines = [
        f"| method | N | success over {over} [95% CI] | {count} | per seed | critic top-1 vs Q* |",
        "|---|---|---|---|---|---|",
    ]
    for (method, n), rs in _ordered_groups(rows):
        rate, lo, hi, units = pooled(rs, unit)
        per_seed = ", ".join(f"{r['success_rate']:.2f}" for r in rs)
        t1 = [r["critic_top1"] for r in rs if r.get("critic_top1") is not None]
        lines.append(
            f"| {method} | {n or '-'} | {rate:.3f} [{lo:.3f}, {hi:.3f}] | {units} | {per_seed} | "
            f"{(f'{np.mean(t1):.3f}' if t1 else '-')} |"
        )
    return "\n".join(lines)


def per_task_table(rows: list[dict]) -> str:
    """Successes / episodes per task and (arm, N), summed over seeds, with the totals."""
    groups = _ordered_groups(rows)
    tasks = sorted({t for r in rows for t in (r.get("per_task") or {})})

    def cell(rs: list[dict], task: str | None) -> str:
        pairs = [v for r in rs for t, v in (r.get("per_task") or {}).items() if task in (None, t)]
        return f"{sum(p[0] for p in pairs)}/{sum(p[1] for p in pairs)}"

    names = [m + (f", N={n}" if n else "") for (m, n), _ in groups]
    lines = ["| task | " + " | ".join(names) + " |", "|---" * (len(groups) + 1) + "|"]
    for task in [*tasks, None]:
        label = task if task is not None else "**all**"
        lines.append(f"| {label} | " + " | ".join(cell(rs, task) for _, rs in groups) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, split: str = "val", unit: str = "goal", env: str = "sim") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = _groups(rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    td = sorted((n, rs) for (m, n), rs in g.items() if m == METHODS["td"])
    if td:
        ns = [n for n, _ in td]
        stats = [pooled(rs, unit) for _, rs in td]
        mu = np.array([s[0] for s in stats])
        err = np.array([[s[0] - s[1] for s in stats], [s[2] - s[0] for s in stats]])
        ax.errorbar(ns, mu, yerr=err, marker="o", capsize=4, label=METHODS["td"])
    markers = {"mc": ("s", "C3"), "td_paper": ("D", "C4"), "mc_paper": ("v", "C5"), "td_pre": ("^", "C2")}
    for arm, (marker, colour) in markers.items():
        for (m, n), rs in g.items():
            if m == METHODS[arm]:
                r, lo, hi, _ = pooled(rs, unit)
                ax.errorbar(
                    [n], [r], yerr=[[r - lo], [hi - r]], marker=marker, color=colour, capsize=4, label=m
                )
    lines = {
        "pi_beta": ("--", "gray"),
        "filtered_bc": (":", "gray"),
        "q_star": ("-.", "gray"),
        "behaviour_greedy": ("--", "C1"),
        "behaviour_sampled": (":", "C1"),
    }
    for arm, (style, colour) in lines.items():
        for (m, _), rs in g.items():
            if m == METHODS[arm]:
                ax.axhline(pooled(rs, unit)[0], color=colour, linestyle=style, label=m)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("N (candidates in Best-of-N)")
    ax.set_ylabel(f"success rate ({split} {'pages' if unit == 'page' else 'goals'})")
    ax.set_title(f"{'Simulated device' if env == 'sim' else env}: Best-of-N extraction")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
