"""The two ablations users run: TD vs MC critics, and N in Best-of-N (paper: TD 58.0 vs MC 37.5 and
behaviour 25.0 on Web Shopping; success grows with N over 1/4/8/16).

It reuses a finished `digiq pipeline` run (its dataset with candidates, cached features and pi_beta), then
per seed: trains a TD and an MC critic, extracts a policy for every N (TD) and for the largest N (MC), and
evaluates each on the simulator's held-out tasks. The MC critic regresses Q on the discounted return alone
(the mission's and the paper's MC ablation); the TD critic has the pipeline's settings, no-op backup
included, which bootstraps gamma V(s) and so is TD's (`--mc-backup` adds an MC critic with it too). Writes
`<out>/ablation.md` (tables), `ablation.json` and `ablation.png` (success vs N; TD, MC and pi_beta).

With `--pre-stage1` it also caches features with the VLM *before* Stage-1 fine-tuning (the weights Stage 1
started from: the shipped GUI-pretrained model with the pipeline's default stage1_init=pretrained, the hub
model for a real run) and trains a TD critic on them per seed (issue #4: the paper's "off-the-shelf
features" arm, 31.9 vs 58.0 on Web Shopping), extracting at the largest N.

    PYTHONPATH=. python scripts/ablate.py --pipeline runs/pipeline --out runs/ablation --seeds 0 1 2 \
        --ns 1 4 8 16 --pre-stage1

Seeds vary critic training, extraction and evaluation; the data, Stage 1 and pi_beta are shared (re-running
those per seed would multiply the CPU cost by 3 for the parts both arms have in common).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from digiq.config import load_config
from digiq.stages import cache_features, evaluate, extract_policy, pipeline, train_critic
from digiq.utils.io import is_complete
from digiq.utils.logging import read_metrics


def _evaluate(policy: str, out: Path, seed: int, episodes: int, base: evaluate.Config) -> dict:
    if (out / "metrics.json").exists():
        return json.loads((out / "metrics.json").read_text())
    cfg = dataclasses.replace(
        base, policy=policy, mode="sim", seed=seed, num_episodes=episodes, output_dir=str(out)
    )
    return evaluate.run(cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", default="runs/pipeline", help="a finished `digiq pipeline` output_dir")
    ap.add_argument("--config", default=None, help="the pipeline YAML it was run with (for stage settings)")
    ap.add_argument("--out", default="runs/ablation")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ns", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument(
        "--mc-backup",
        action="store_true",
        help="also an MC critic with the TD arm's no-op backup (bootstraps the no-ops through gamma V(s))",
    )
    ap.add_argument(
        "--pre-stage1",
        action="store_true",
        help="also train TD critics on features of the VLM before Stage-1 fine-tuning (one extra feature pass)",
    )
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = Path(args.pipeline)
    pcfg = load_config(pipeline.Config, args.config, [f"output_dir={pipe}"])
    wired = pipeline.wire(pcfg)
    for stage in ("candidates", "cache_features", "train_bc"):
        folder = pipe / pipeline.FOLDERS[stage]
        if not is_complete(folder):
            raise SystemExit(f"{folder} is not a finished {stage} output: run `digiq pipeline` first")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    t0 = time.perf_counter()
    for seed in args.seeds:
        bc = _evaluate(
            wired["extract_policy"].init_policy,
            out / f"s{seed}/eval_bc",
            seed,
            args.episodes,
            wired["evaluate"],
        )
        rows.append({"seed": seed, "method": "pi_beta (BC)", "n": 0, **_pick(bc)})
        tc = wired["train_critic"]
        features = tc.features
        # The MC arm regresses on the discounted return alone (the paper's "MC return" ablation): the no-op
        # backup is a one-step bootstrap, gamma V(s), so it belongs to TD; --mc-backup adds MC with it.
        pure = dataclasses.replace(tc.noop, enabled=False)
        arms = [("td", "td", features, tc.noop), ("mc", "mc", features, pure)]
        if args.mc_backup:
            arms.append(("mc_backup", "mc", features, tc.noop))
        if args.pre_stage1:
            arms.append(("td_pre", "td", _pre_stage1_features(wired, out), tc.noop))
        for arm, loss, features, noop in arms:
            critic_dir = _run_once(
                train_critic,
                tc,
                out / f"s{seed}/critic_{arm}",
                "critic",
                critic_loss=loss,
                features=features,
                noop=noop,
                seed=seed,
            )
            cmetrics = json.loads((critic_dir / "metrics.json").read_text())
            cmetrics.update(_last_validations(critic_dir))
            for n in args.ns if arm == "td" else [max(args.ns)]:
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
                ev = _evaluate(
                    str(extract_dir / "policy"),
                    out / f"s{seed}/eval_{arm}_n{n}",
                    seed,
                    args.episodes,
                    wired["evaluate"],
                )
                rows.append(
                    {
                        "seed": seed,
                        "method": METHODS[arm],
                        "n": n,
                        **_pick(ev),
                        "critic_top1": cmetrics.get("val/qstar_top1_agreement"),
                        "critic_spearman": cmetrics.get("val/qstar_spearman"),
                        "critic_top1_last5": cmetrics.get("top1_last5"),
                        "critic_spearman_last5": cmetrics.get("spearman_last5"),
                    }
                )
        (out / "ablation.json").write_text(json.dumps(rows, indent=2))
    text = table(rows) + "\n\n" + critic_table(rows)
    (out / "ablation.md").write_text(text + f"\n\nTotal time: {time.perf_counter() - t0:.0f} s\n")
    plot(rows, out / "ablation.png")
    print(text)
    print(f"wrote {out / 'ablation.md'} and {out / 'ablation.png'}")


def _run_once(stage, base, folder: Path, product: str, **fields) -> Path:
    """Run ``stage`` with ``base`` + ``fields`` into ``folder`` unless ``folder/product`` is already complete
    (a re-run of the ablation resumes where it stopped); returns ``folder``."""
    if not is_complete(folder / product):
        stage.run(dataclasses.replace(base, output_dir=str(folder), overwrite=True, **fields))
    return folder


METHODS = {
    "td": "Digi-Q TD",
    "mc": "Digi-Q MC",
    "mc_backup": "Digi-Q MC + no-op backup",
    "td_pre": "Digi-Q TD, pre-Stage-1 features",
}


def _pre_stage1_features(wired: dict, out: Path) -> str:
    """Features of the same rows from the VLM Stage 1 started from (its initial weights), cached once."""
    folder = out / "features_pre_stage1"
    if not is_complete(folder):
        base = wired["finetune_vlm"].model  # what finetune-vlm loaded before training (pi_beta by default)
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
    """Mean of the last ``k`` per-epoch validations: the final epoch alone swings by +-0.1 in top-1 on
    the tiny features (argmax over near-tied candidates), the mean of five is a steadier summary."""
    vals = [v for v in read_metrics(run_dir) if "val/qstar_top1_agreement" in v][-k:]
    if not vals:
        return {}
    return {
        "top1_last5": float(np.mean([v["val/qstar_top1_agreement"] for v in vals])),
        "spearman_last5": float(np.nanmean([v["val/qstar_spearman"] for v in vals])),
    }


def _or_nan(x: float | None) -> float:
    return np.nan if x is None else x


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


def _pick(m: dict) -> dict:
    return {k: m.get(k) for k in ("success_rate", "ci_low", "ci_high", "num_episodes")}


def _groups(rows: list[dict]) -> dict[tuple[str, int], list[dict]]:
    g: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        g.setdefault((r["method"], r["n"]), []).append(r)
    return g


def table(rows: list[dict]) -> str:
    lines = [
        "| method | N | success (mean over seeds) | std | per seed | critic top-1 vs Q* | critic Spearman vs Q* |",
        "|---|---|---|---|---|---|---|",
    ]
    for (method, n), rs in sorted(_groups(rows).items(), key=lambda kv: (kv[0][0], kv[0][1])):
        s = np.array([r["success_rate"] for r in rs], dtype=float)
        t1 = [r.get("critic_top1") for r in rs if r.get("critic_top1") is not None]
        sp = [r.get("critic_spearman") for r in rs if r.get("critic_spearman") is not None]
        lines.append(
            f"| {method} | {n or '-'} | {s.mean():.3f} | {s.std():.3f} | {', '.join(f'{x:.2f}' for x in s)} | "
            f"{(f'{np.mean(t1):.3f}' if t1 else '-')} | {(f'{np.mean(sp):.3f}' if sp else '-')} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = _groups(rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    td = sorted((n, [r["success_rate"] for r in rs]) for (m, n), rs in g.items() if m == "Digi-Q TD")
    if td:
        ns = [n for n, _ in td]
        mu = np.array([np.mean(v) for _, v in td])
        sd = np.array([np.std(v) for _, v in td])
        ax.errorbar(ns, mu, yerr=sd, marker="o", capsize=4, label="Digi-Q (TD critic)")
    for (m, n), rs in g.items():
        if m == "Digi-Q MC":
            v = [r["success_rate"] for r in rs]
            ax.errorbar(
                [n], [np.mean(v)], yerr=[np.std(v)], marker="s", color="C3", capsize=4, label="MC critic"
            )
        if m == METHODS["td_pre"]:
            v = [r["success_rate"] for r in rs]
            ax.errorbar(
                [n],
                [np.mean(v)],
                yerr=[np.std(v)],
                marker="^",
                color="C2",
                capsize=4,
                label="TD, pre-Stage-1 features",
            )
        if m == "pi_beta (BC)":
            v = [r["success_rate"] for r in rs]
            ax.axhline(np.mean(v), color="gray", linestyle="--", label="pi_beta (BC)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("N (candidates in Best-of-N)")
    ax.set_ylabel("success rate (held-out tasks)")
    ax.set_title("Simulated device: Best-of-N extraction")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
