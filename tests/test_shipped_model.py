"""The GUI-pretrained model shipped in data/pretrained/gui-tiny: small, documented, and as good as its card
says, re-measured with plain transformers on screens generated now (tolerance below)."""

from __future__ import annotations

import json
import re

import pytest

from digiq.models.shipped import GUI_TINY, REBUILD, REPO_ROOT
from digiq.sim.synthetic import make_sample

FOLDER = REPO_ROOT / GUI_TINY
# Accuracy re-measured on 60 fresh questions per skill may fall below the card's (100 others) by sampling
# noise: one binomial standard error at p = 0.5 with n = 60 is 0.065; 0.15 is more than two of them.
TOLERANCE = 0.15
PER_SKILL = 60


def _card() -> dict:
    return json.loads((FOLDER / "pretraining.json").read_text())


def test_the_shipped_model_is_small_and_has_its_card() -> None:
    files = {p.name: p.stat().st_size for p in FOLDER.iterdir()}
    assert {"model.safetensors", "config.json", "README.md", "pretraining.json", "digiq_policy.json"} <= set(
        files
    )
    assert sum(files.values()) < 30 * 2**20  # well under the 100 MB the repository allows
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in files)  # safetensors only
    record = _card()
    m = record["metrics"]
    card = (FOLDER / "README.md").read_text()
    # The card states the command, seed, steps, wall time and accuracy, and they are the recorded ones.
    assert REBUILD[GUI_TINY] in card and record["command"] == REBUILD[GUI_TINY]
    assert f"seed: {record['config']['seed']}" in card and f"steps: {int(m['steps'])}" in card
    assert f"{m['train_seconds']:.0f} s training" in card and "GFLOP/s" in card
    for skill in ("ground", "refer", "read", "state", "screen", "parse", "type"):
        assert re.search(rf"\| {skill} \| {m[f'acc/{skill}']:.3f} \|", card), skill


@pytest.mark.slow
def test_the_shipped_model_grounds_and_refers_as_its_card_says() -> None:
    """Plain transformers (no digiq loader) answers fresh grounding and referring questions."""
    import random

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from digiq.sim.synthetic import is_correct

    model = AutoModelForImageTextToText.from_pretrained(str(FOLDER)).eval()
    processor = AutoProcessor.from_pretrained(str(FOLDER))
    spec = json.loads((FOLDER / "digiq_policy.json").read_text())
    tok = processor.tokenizer
    tok.padding_side = "left"
    m = _card()["metrics"]
    for skill in ("ground", "refer"):
        # A seed the card's evaluation never used.
        samples = [make_sample(random.Random(f"test:{skill}:{i}"), skill) for i in range(PER_SKILL)]
        hits = 0
        for b in range(0, PER_SKILL, 20):
            chunk = samples[b : b + 20]
            texts = [spec["prompt_head"] + s.question + spec["prompt_tail"] for s in chunk]
            enc = processor(images=[[s.image] for s in chunk], text=texts, padding=True, return_tensors="pt")
            with torch.no_grad():
                out = model.generate(
                    **enc, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id,
                )  # fmt: skip
            answers = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            for s, a in zip(chunk, answers, strict=True):
                hits += is_correct(s, a.strip().removeprefix(spec["answer_prefix"].strip()))
        acc = hits / PER_SKILL
        assert acc >= m[f"acc/{skill}"] - TOLERANCE, (skill, acc, m[f"acc/{skill}"])
        assert acc > 0.2, (skill, acc)  # and far above chance either way
