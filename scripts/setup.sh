#!/usr/bin/env bash
# Create .venv and install digiq with its dev tools. Idempotent: a second run only checks.
# torch is pinned to the CPU wheel here so no multi-GB CUDA build is pulled on a laptop or in CI;
# on a GPU machine install the torch build you want first and run with DIGIQ_TORCH=skip.
# --miniwob also installs MiniWoB++ (env=miniwob): Debian's chromium + chromium-driver and the miniwob wheel.
set -euo pipefail
EXTRAS="dev"
for arg in "$@"; do
  case "$arg" in
    --miniwob) EXTRAS="dev,miniwob" ;;
    *) echo "setup.sh: unknown option $arg (known: --miniwob)" >&2; exit 2 ;;
  esac
done
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
if [ "$EXTRAS" = "dev,miniwob" ] && ! { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; }; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" != 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "setup.sh --miniwob: install chromium and chromedriver at /usr/bin (no apt-get here)" >&2; exit 1
  fi
fi
python -m pip install -q -e ".[$EXTRAS]"
echo "digiq installed in $(pwd)/.venv"
