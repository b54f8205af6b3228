#!/usr/bin/env bash
# Create .venv and install digiq with its dev tools. Idempotent: a second run only checks.
# torch is pinned to the CPU wheel here so no multi-GB CUDA build is pulled on a laptop or in CI;
# on a GPU machine install the torch build you want first and run with DIGIQ_TORCH=skip.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if [ "${DIGIQ_TORCH:-cpu}" != "skip" ]; then
  python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q -e ".[dev]"
echo "digiq installed in $(pwd)/.venv"
