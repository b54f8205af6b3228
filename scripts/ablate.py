"""The paper's ablations on a finished `digiq pipeline` run, like for like, on validation goals by default.

Each pair of arms differs in exactly the thing named (Digi-Q paper, arXiv:2502.15760, Tables 1-3):

- `pi_beta`: the behaviour-cloned policy the pipeline trained (the actor's start);
- `filtered_bc`: BC on the successful trajectories of the same data, from the same start (Table 1's baseline);
- `td` / `mc`: the pipeline's critic trained with TD / with the MC return, all else equal (its no-op backup
  and dueling head included); TD over every N, MC at the largest N;
- `td_paper` / `mc_paper`: the same pair with the paper's critic (no no-op backup, a direct Q head);
- `q_star`, an **oracle reference** (simulator only): the exact Q* scores the same candidates, the ceiling of
  extraction over them; it reads privileged state, so it is a reference row, never a method;
- `td_pre` (`--pre-stage1`): TD on features of the VLM before Stage 1 (the paper's off-the-shelf arm).

Per seed it trains each critic / policy, extracts, and evaluates on `--split` (default **val**: every
default is chosen there; `--split test` is for the reported tables only). Successes are pooled over
independent units, (seed, goal) pairs, not over repeated episodes of one deterministic goal. Writes
`<out>/ablation.md`, `ablation.json` and `ablation.png`.

    PYTHONPATH=. python scripts/ablate.py --pipeline runs/pipeline --out runs/ablation_val --seeds 0 1 2
    PYTHONPATH=. python scripts/ablate.py --pipeline runs/pipeline --split test --out runs/ablation_test

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

from digiq.config import load_config
from digiq.errors import DigiqError
from digiq.stages import cache_features, evaluate, extract_policy, pipeline, train_bc, train_critic
from digiq.training.policy_loop import POLICY_DIR
from digiq.utils.io import is_complete
from digiq.utils.logging import read_metrics
from digiq.utils.stats import clustered_success

METHODS = {
    "pi_beta": "pi_beta (BC)",
    "filtered_bc": "Filtered BC",
    "td": "Digi-Q TD",
    "mc": "Digi-Q MC",
    "td_paper": "Digi-Q TD, paper's critic",
    "mc_paper": "Digi-Q MC, paper's critic",
    "q_star": "[oracle] exact Q* over the same candidates",
    "td_pre": "Digi-Q TD, pre-Stage-1 features",
}
DEFAULT_ARMS = ("pi_beta", "filtered_bc", "td", "mc", "td_paper", "mc_paper", "q_star")
CRITIC_ARMS = ("td", "mc", "td_paper", "mc_paper", "td_pre")


def critic_overrides(arm: str, tc: train_critic.Config) -> dict:
    """The train-critic fields an arm changes from the pipeline's critic ``tc`` (and nothing else)."""
    paper = {
        "noop": dataclasses.replace(tc.noop, enabled=False),
        "critic": dataclasses.replace(tc.critic, q_param="direct"),
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


def _evaluate(policy: str, out: Path, seed: int, episodes: int, base: evaluate.Config, split: str) -> dict:
    if (out / "metrics.json").exists():
        return json.loads((out / "metrics.json").read_text())
    cfg = dataclasses.replace(
        base, policy=policy, mode="sim", seed=seed, num_episodes=episodes, output_dir=str(out), split=split
    )
    return evaluate.run(cfg)


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
        choices=[a for a in METHODS if a != "td_pre"],
        default=list(DEFAULT_ARMS),
        help="which arms to run (default: all of them)",
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
    pcfg = load_config(pipeline.Config, args.config, [f"output_dir={pipe}"])
    wired = pipeline.wire(pcfg)
    check_split(pcfg, wired, args.split)
    for stage in ("candidates", "cache_features", "train_bc"):
        folder = pipe / pipeline.FOLDERS[stage]
        if not is_complete(folder):
            raise SystemExit(f"{folder} is not a finished {stage} output: run `digiq pipeline` first")
    out = Path(args.out or f"runs/ablation_{args.split}")
    out.mkdir(parents=True, exist_ok=True)
    arms = [a for a in METHODS if a in args.arms or (a == "td_pre" and args.pre_stage1)]
    if pcfg.env != "sim" and "q_star" in arms:  # the exact Q* is the simulator's
        arms.remove("q_star")
    n_max = max(args.ns)
    rows: list[dict] = []
    t0 = time.perf_counter()

    def ev(policy: str, name: str, seed: int) -> dict:
        return _evaluate(
            policy, out / f"s{seed}/eval_{name}", seed, args.episodes, wired["evaluate"], args.split
        )

    for seed in args.seeds:
        tc = wired["train_critic"]
        for arm in arms:
            if arm == "pi_beta":
                m = ev(wired["extract_policy"].init_policy, "bc", seed)
                rows.append(_row(seed, arm, 0, m))
            elif arm == "filtered_bc":
                folder = _run_once(
                    train_bc,
                    wired["train_bc"],
                    out / f"s{seed}/filtered_bc",
                    POLICY_DIR,
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
    header = f"Split: **{args.split}** goals; seeds {args.seeds}; {args.episodes} episodes per policy and seed.\n\n"
    text = header + table(rows) + "\n\n" + critic_table(rows)
    (out / "ablation.md").write_text(text + f"\n\nTotal time: {time.perf_counter() - t0:.0f} s\n")
    plot(rows, out / "ablation.png", args.split)
    print(text)
    print(f"wrote {out / 'ablation.md'} and {out / 'ablation.png'}")


def _row(seed: int, arm: str, n: int, m: dict, **extra) -> dict:
    keys = ("success_rate", "ci_low", "ci_high", "num_episodes", "split", "per_task")
    return {"seed": seed, "arm": arm, "method": METHODS[arm], "n": n, **{k: m.get(k) for k in keys}, **extra}


def _run_once(stage, base, folder: Path, product: str, **fields) -> Path:
    """Run ``stage`` with ``base`` + ``fields`` into ``folder`` unless ``folder/product`` is already complete
    (a re-run of the ablation resumes where it stopped); returns ``folder``."""
    if not is_complete(folder / product):
        stage.run(dataclasses.replace(base, output_dir=str(folder), overwrite=True, **fields))
    return folder


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


def pooled(rs: list[dict]) -> tuple[float, float, float, int]:
    """Success over (seed, goal) units of the rows of one arm: ``(rate, lo, hi, units)``."""
    units = [tuple(v) for r in rs for v in (r.get("per_task") or {}).values()]
    return clustered_success(units)


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


def table(rows: list[dict]) -> str:
    """One line per (arm, N), in METHODS order: success over (seed, goal) units with a 95% interval."""
    lines = [
        "| method | N | success over (seed, goal) units [95% CI] | units | per seed | critic top-1 vs Q* |",
        "|---|---|---|---|---|---|",
    ]
    order = {m: i for i, m in enumerate(METHODS.values())}
    for (method, n), rs in sorted(_groups(rows).items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0][1])):
        rate, lo, hi, units = pooled(rs)
        per_seed = ", ".join(f"{r['success_rate']:.2f}" for r in rs)
        t1 = [r["critic_top1"] for r in rs if r.get("critic_top1") is not None]
        lines.append(
            f"| {method} | {n or '-'} | {rate:.3f} [{lo:.3f}, {hi:.3f}] | {units} | {per_seed} | "
            f"{(f'{np.mean(t1):.3f}' if t1 else '-')} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, split: str = "val") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = _groups(rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    td = sorted((n, rs) for (m, n), rs in g.items() if m == METHODS["td"])
    if td:
        ns = [n for n, _ in td]
        stats = [pooled(rs) for _, rs in td]
        mu = np.array([s[0] for s in stats])
        err = np.array([[s[0] - s[1] for s in stats], [s[2] - s[0] for s in stats]])
        ax.errorbar(ns, mu, yerr=err, marker="o", capsize=4, label=METHODS["td"])
    markers = {"mc": ("s", "C3"), "td_paper": ("D", "C4"), "mc_paper": ("v", "C5"), "td_pre": ("^", "C2")}
    for arm, (marker, colour) in markers.items():
        for (m, n), rs in g.items():
            if m == METHODS[arm]:
                r, lo, hi, _ = pooled(rs)
                ax.errorbar(
                    [n], [r], yerr=[[r - lo], [hi - r]], marker=marker, color=colour, capsize=4, label=m
                )
    for arm, style in (("pi_beta", "--"), ("filtered_bc", ":"), ("q_star", "-.")):
        for (m, _), rs in g.items():
            if m == METHODS[arm]:
                ax.axhline(pooled(rs)[0], color="gray", linestyle=style, label=m)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("N (candidates in Best-of-N)")
    ax.set_ylabel(f"success rate ({split} goals)")
    ax.set_title("Simulated device: Best-of-N extraction")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
