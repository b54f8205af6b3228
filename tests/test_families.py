"""The VLM family registry: entries agree with their tiny models, the tiny tokenizer is pinned, and
digiq.models stays independent of digiq.sim."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from digiq.models import tiny, tiny_text
from digiq.models.families import BY_MODEL_TYPE, FAMILIES
from digiq.models.vlm import build_tiny_vlm, decoder_layers, family_of, num_text_layers
from digiq.stages.finetune_vlm import param_groups

ROOT = Path(__file__).resolve().parents[1]
# sha256 of the tiny: tokenizer (vocab 2048) as it was defined at digiq commit 13410f3. Every tiny: model's
# prompts and weights depend on it: a change here changes every saved tiny: adapter and feature cache.
TINY_TOKENIZER_SHA256 = "c1ba2749160778bc509ca3d42f0edf243082204cd13fda18eb5169bb7af1dc31"


def test_default_tiny_tokenizer_is_pinned():
    js = tiny.tokenizer_json(tiny_text.default_corpus(), 2048)
    assert hashlib.sha256(js.encode()).hexdigest() == TINY_TOKENIZER_SHA256


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


def test_registry_is_consistent():
    types = [t for f in FAMILIES.values() for t in f.model_types]
    assert len(types) == len(set(types)) == len(BY_MODEL_TYPE)  # no model_type claimed by two families
    assert all(name == f.name for name, f in FAMILIES.items())
    assert set(tiny_text.CORPUS_FAMILIES) <= set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_entry_matches_its_tiny_model(family):
    """model_types and text_decoder of an entry agree with the model its tiny builders make."""
    spec = tiny.TinySpec(
        hidden=32, layers=2, heads=2, kv_heads=1, vision_hidden=32, vision_layers=1, image_size=56
    )
    model, processor = build_tiny_vlm(family, spec)
    assert family_of(model) == family and processor.digiq_family == family
    layers = decoder_layers(model.model)
    assert layers is not None and len(layers) == num_text_layers(model) == 2
    # vision_modules name exactly the vision tower and projector: finetune-vlm's vision learning-rate group
    rest, vision = param_groups(model, 1.0, 0.5)
    vision_ids = {id(p) for p in vision["params"]}
    names = [n for n, p in model.named_parameters() if id(p) in vision_ids]
    assert names and vision["lr"] == 0.5
    assert all(not n.split(".")[1].startswith(("language_model", "text_model", "lm_head")) for n in names)
    decoder = {id(p) for p in layers.parameters()}
    assert decoder and not decoder & vision_ids and decoder <= {id(p) for p in rest["params"]}
