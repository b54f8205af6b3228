"""Regenerate the figures of docs/theory.md: every `digiq theory` experiment at full size, seed 0.

    python scripts/make_theory_figures.py [--seed 0] [--out docs/img]

Writes docs/img/theory_<experiment>.png (hyphens -> underscores) and docs/img/theory_summary.json (the key
numbers quoted in docs/theory.md, with each experiment's wall-clock seconds).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from digiq.config import load_config  # noqa: E402
from digiq.theory.cli import EXPERIMENTS, Config, run_experiment  # noqa: E402
from digiq.theory.common import summary_json  # noqa: E402
from digiq.theory.plots import plot_result  # noqa: E402
from digiq.utils.io import atomic_write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "img"))
    args = ap.parse_args()
    out = Path(args.out)
    cfg = load_config(Config, None, [f"seed={args.seed}"])
    summaries = {}
    for name in EXPERIMENTS:
        t0 = time.perf_counter()
        res = run_experiment(name, cfg)
        seconds = time.perf_counter() - t0
        path = plot_result(res, out / f"theory_{name.replace('-', '_')}.png")
        s = {k: v for k, v in summary_json(res.summary).items() if not isinstance(v, list)}
        s["seconds"] = round(seconds, 2)
        summaries[name] = s
        print(f"{name}: {seconds:.1f} s -> {path} ({path.stat().st_size // 1024} KB)")
    atomic_write_json(out / "theory_summary.json", summaries)


if __name__ == "__main__":
    main()
