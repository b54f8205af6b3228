"""The Python side of scripts/gpu_check.sh: run one ``digiq`` command and record it, check configs, probe the
environment, write the report. Runs as a file from any directory, with or without ``pip install -e .``.

    python scripts/gpu_run.py <label> <digiq command and arguments ...>
    accelerate launch --config_file configs/accelerate/fsdp_7b.yaml scripts/gpu_run.py <label> finetune-vlm ...
    python scripts/gpu_run.py --probe                  # what this Python lacks (pip specs), torch or not
    python scripts/gpu_run.py --check-configs FILE     # load each recorded command's config (--print-config)
    python scripts/gpu_run.py --report DIR             # DIR/gpu_check.json from the step and process records

A stage run appends one JSON line ``{"label", "command", "rank", "processes", "seconds", "peak_mib",
"distributed", "exit"}`` per process to ``$DIGIQ_GPU_REPORT`` (default ``gpu_check.jsonl``); the peak is
``torch.cuda.max_memory_allocated`` of the process's own GPU (0 without one).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata as md
import importlib.util
import io
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as a file, sys.path[0] is scripts/: put the repository first so that digiq imports without the editable
# install (and this checkout's digiq wins over another installed one).
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# What digiq imports at run time, as (module, pip spec, minimum version). wandb is not here: gpu_check.sh runs
# with WANDB_MODE=disabled, and digiq imports wandb only when it is enabled. datasets needs dill, multiprocess
# and a pyarrow of its own era, which a bare machine's Python may lack or have too old.
NEEDS = (
    ("transformers", "transformers>=5.0", "5.0"),
    ("accelerate", "accelerate>=1.0", "1.0"),
    ("peft", "peft>=0.15", "0.15"),
    ("datasets", "datasets>=3.0", "3.0"),
    ("dill", "dill", None),
    ("multiprocess", "multiprocess", None),
    ("pyarrow", "pyarrow>=15", "15"),
    ("safetensors", "safetensors>=0.4", "0.4"),
    ("tokenizers", "tokenizers>=0.20", "0.20"),
    ("yaml", "pyyaml>=6", None),
    ("PIL", "pillow>=10", "10"),
    ("numpy", "numpy>=1.26", "1.26"),
    ("tqdm", "tqdm>=4.66", None),
    ("matplotlib", "matplotlib>=3.8", "3.8"),
)
DISTRIBUTIONS = {"yaml": "pyyaml", "PIL": "pillow"}


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def probe() -> int:
    """Print ``python: ...``, ``torch: ...``, and one ``missing: <pip spec>`` line per absent or too-old package;
    exit 3 when torch itself is missing (gpu_check.sh never installs torch: the machine's CUDA build is used)."""
    print(f"python: {sys.executable} {sys.version.split()[0]}")
    try:
        import torch
    except ImportError as e:
        print(f"torch: missing ({e})")
        return 3
    cuda = torch.version.cuda or "none"
    print(f"torch: {torch.__version__} (CUDA {cuda}, {torch.cuda.device_count()} visible GPUs)")
    for module, spec, minimum in NEEDS:
        try:
            importlib.import_module(module)
            version = md.version(DISTRIBUTIONS.get(module, module))
        except Exception:  # not installed, or installed but broken (an old pyarrow under a new datasets)
            print(f"missing: {spec}")
            continue
        if minimum and _version_tuple(version) < _version_tuple(minimum):
            print(f"missing: {spec} (have {version})")
    # digiq itself, as another directory sees it: the editable install of this checkout, or nothing
    sys.path.remove(str(ROOT))
    try:
        spec = importlib.util.find_spec("digiq")
    finally:
        sys.path.insert(0, str(ROOT))
    here = spec is not None and spec.origin and Path(spec.origin).resolve().parent == ROOT / "digiq"
    print("digiq: installed from this checkout" if here else f"missing: -e {ROOT} (digiq, --no-deps)")
    return 0


def check_configs(path: str) -> int:
    """Load every recorded stage's config as the CLI would (``--print-config``): unknown keys and bad values
    fail here. Records are argv words separated by 0x1f, commands by 0x1e (written by gpu_check.sh)."""
    from digiq.cli import main

    records = [r for r in Path(path).read_text(encoding="utf-8").split("\x1e") if r]
    for record in records:
        argv = [a for a in record.split("\x1f") if a]
        with contextlib.redirect_stdout(io.StringIO()):
            code = main([*argv, "--print-config"])
        if code != 0:
            print(f"gpu_check: config check failed ({code}): digiq {' '.join(argv)}", file=sys.stderr)
            return 1
    print(
        f"[gpu_check] {len(records)} stage configs load (digiq from {Path(sys.modules['digiq'].__file__).parent})"
    )
    return 0


def report(out_dir: str) -> int:
    """Write ``DIR/gpu_check.json``: per step its label, command, exit code, wall seconds and peak GPU MiB (the
    maximum over its processes), with the machine's torch / transformers versions and GPU name; print a table.
    Inputs: ``DIR/steps.jsonl`` (one line per step, written by gpu_check.sh) and ``DIR/gpu_check.jsonl``."""
    import torch
    import transformers

    out = Path(out_dir)

    def lines(name: str) -> list[dict]:
        p = out / name
        return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []

    procs = lines("gpu_check.jsonl")
    steps = []
    for s in lines("steps.jsonl"):
        rows = [r for r in procs if r["label"] == s["label"]]
        peak = max((r["peak_mib"] for r in rows), default=None)
        distributed = sorted({r["distributed"] for r in rows if r.get("distributed")})
        steps.append(
            {
                **s,
                "processes": max((r["processes"] for r in rows), default=1),
                "peak_gpu_mib": peak,
                "distributed": ",".join(distributed) or None,
            }
        )
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    doc = {
        "mode": os.environ.get("DIGIQ_GPU_MODE", ""),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "gpu": gpus[0] if gpus else None,
        "gpus": len(gpus),
        "ok": all(s["rc"] == 0 for s in steps),
        "total_wall_s": round(sum(s["wall_s"] for s in steps), 1),
        "steps": steps,
    }
    (out / "gpu_check.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(
        f"| step | rc | processes | accelerate | wall s | peak GPU MiB |  ({doc['gpu']}, torch {doc['torch']})"
    )
    print("|---|---|---|---|---|---|")
    for s in steps:
        row = [s["label"], s["rc"], s["processes"], s["distributed"], f"{s['wall_s']:.1f}", s["peak_gpu_mib"]]
        print("| " + " | ".join(str(x) for x in row) + " |")
    print(f"total {doc['total_wall_s']} s; {out / 'gpu_check.json'}")
    return 0


def run(label: str, argv: list[str]) -> int:
    import torch

    from digiq.cli import main

    t0 = time.perf_counter()
    code = main(argv)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 1024**2 if torch.cuda.is_available() else 0.0
    # What accelerate really ran (FSDP, MULTI_GPU, NO, ...): a launcher's config is a request, not a proof
    from accelerate.state import PartialState

    distributed = PartialState._shared_state.get("distributed_type")
    expected = os.environ.get("DIGIQ_EXPECT_DISTRIBUTED")  # gpu_check.sh's FSDP steps: FSDP
    ran = None if distributed is None else str(distributed.value)
    if expected and torch.cuda.is_available() and ran != expected:
        print(f"gpu_run.py {label}: accelerate ran {ran}, not {expected}", file=sys.stderr)
        code = code or 3
    row = {
        "label": label,
        "command": " ".join(argv),
        "rank": int(os.environ.get("RANK", "0")),
        "processes": int(os.environ.get("WORLD_SIZE", "1")),
        "seconds": round(seconds, 2),
        "peak_mib": round(peak),
        "distributed": ran,
        "exit": code,
    }
    with Path(os.environ.get("DIGIQ_GPU_REPORT", "gpu_check.jsonl")).open("a") as f:
        f.write(json.dumps(row) + "\n")
    return code


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--probe"]:
        raise SystemExit(probe())
    if args[:1] == ["--check-configs"] and len(args) == 2:
        raise SystemExit(check_configs(args[1]))
    if args[:1] == ["--report"] and len(args) == 2:
        raise SystemExit(report(args[1]))
    if len(args) < 2 or args[0].startswith("-"):
        raise SystemExit(__doc__)
    raise SystemExit(run(args[0], args[1:]))
