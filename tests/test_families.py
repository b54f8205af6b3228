"""The VLM family layer: the tiny tokenizer is pinned, and digiq.models stays independent of digiq.sim."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from digiq.models import vlm

ROOT = Path(__file__).resolve().parents[1]
# sha256 of the tiny: tokenizer (vocab 2048) as it was defined at digiq commit 13410f3. Every tiny: model's
# prompts and weights depend on it: a change here changes every saved tiny: adapter and feature cache.
TINY_TOKENIZER_SHA256 = "c1ba2749160778bc509ca3d42f0edf243082204cd13fda18eb5169bb7af1dc31"


def test_default_tiny_tokenizer_is_pinned():
    assert hashlib.sha256(vlm._tokenizer_json(2048).encode()).hexdigest() == TINY_TOKENIZER_SHA256


def test_models_never_import_the_simulator():
    """sim imports models (the behaviour policy, rollouts): models importing sim would tie the layers."""
    code = (
        "import importlib, pkgutil, sys\n"
        "import digiq.models\n"
        "for m in pkgutil.iter_modules(digiq.models.__path__):\n"
        "    importlib.import_module('digiq.models.' + m.name)\n"
        "from digiq.models import vlm\n"
        "vlm.build_tiny_vlm('llava')\n"
        "print(sorted(m for m in sys.modules if m == 'digiq.sim' or m.startswith('digiq.sim.')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip().splitlines()[-1] == "[]"
    for path in (ROOT / "digiq" / "models").rglob("*.py"):
        assert "digiq.sim" not in path.read_text(), path
