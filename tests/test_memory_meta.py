"""The 7B models of the paper's setting, built on the meta device: counts, FSDP wrap classes, memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from digiq.training.memory import REAL_MODELS, memory_table, model_facts

ROOT = Path(__file__).resolve().parents[1]
# Parameter counts the hub shows for llava-hf/llava-1.5-7b-hf and Qwen/Qwen2-VL-7B-Instruct.
PUBLISHED = {"llava-1.5-7b": 7.06e9, "qwen2-vl-7b": 8.29e9}
FSDP_CONFIGS = {"llava-1.5-7b": "fsdp_7b.yaml", "qwen2-vl-7b": "fsdp_qwen2vl_7b.yaml"}


@pytest.mark.parametrize("name", list(REAL_MODELS))
def test_real_size_model_on_meta(name: str) -> None:
    facts = model_facts(name)
    assert abs(facts.params / PUBLISHED[name] - 1) < 0.002, facts.params
    # the accelerate FSDP config of this model wraps classes the model really has
    cfg = yaml.safe_load((ROOT / "configs" / "accelerate" / FSDP_CONFIGS[name]).read_text())
    wrapped = cfg["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"].split(",")
    assert wrapped and set(wrapped) <= set(facts.wrap_classes), (wrapped, facts.wrap_classes)


def test_every_stage_fits_80gb_by_the_estimate() -> None:
    rows = memory_table()
    assert len(rows) == 2 * 8
    for r in rows:
        assert 5 < r["total"] < 80, r
    # FSDP over 8 GPUs: the sharded fp32 states are 16 bytes per parameter / 8
    full = next(r for r in rows if r["model"] == "llava-1.5-7b" and "full, FSDP" in r["stage"])
    assert full["weights+grads+adam (sharded)"] == pytest.approx(16 * 7.063e9 / 8 / 1024**3, abs=0.05)
