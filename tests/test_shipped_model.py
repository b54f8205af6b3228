"""The GUI-pretrained models shipped in data/pretrained/ (gui-tiny, gui-tiny-web): small, documented, and as good
as their cards say, re-measured with plain transformers on screens generated now (tolerance below)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from digiq.models.shipped import GUI_TINY, GUI_TINY_WEB, REBUILD, REPO_ROOT
from digiq.sim.synthetic import make_sample

SHIPPED = (GUI_TINY, GUI_TINY_WEB)
# Accuracy re-measured on 60 fresh questions per skill may fall below the card's (100 others) by sampling
# noise: one binomial standard error at p = 0.5 with n = 60 is 0.065; 0.15 is more than two of them.
TOLERANCE = 0.15
PER_SKILL = 60


def _card(name: str) -> dict:
    return json.loads((REPO_ROOT / name / "pretraining.json").read_text())


@pytest.mark.parametrize("name", SHIPPED)
def test_the_shipped_model_is_small_and_has_its_card(name: str) -> None:
    FOLDER = REPO_ROOT / name
    files = {p.name: p.stat().st_size for p in FOLDER.iterdir()}
    assert {"model.safetensors", "config.json", "README.md", "pretraining.json", "digiq_policy.json"} <= set(
        files
    )
    assert sum(files.values()) < 30 * 2**20  # well under the 100 MB the repository allows
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in files)  # safetensors only
    record = _card(name)
    m = record["metrics"]
    card = (FOLDER / "README.md").read_text()
    # The card states the command, seed, steps, wall time and accuracy, and they are the recorded ones.
    assert REBUILD[name] in card and record["command"] == REBUILD[name]
    assert f"seed: {record['config']['seed']}" in card and f"steps: {int(m['steps'])}" in card
    assert f"{m['train_seconds']:.0f} s training" in card and "GFLOP/s" in card
    skills = ["ground", "refer", "read", "state", "screen", "parse", "type"]
    if name == GUI_TINY_WEB:
        skills += ["web_ground", "web_refer"]
        from digiq.envs.miniwob import DEFAULT_TASKS

        # It saw web pages, never one of the tasks the MiniWoB++ pipeline solves.
        assert not set(record["config"]["web"]["tasks"]) & set(DEFAULT_TASKS)
    for skill in skills:
        assert re.search(rf"\| {skill} \| {m[f'acc/{skill}']:.3f} \|", card), skill


def _accuracy(folder: Path, samples: list) -> float:
    """Plain transformers (no digiq loader): greedy answers, scored like the card."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from digiq.sim.synthetic import is_correct

    model = AutoModelForImageTextToText.from_pretrained(str(folder)).eval()
    processor = AutoProcessor.from_pretrained(str(folder))
    spec = json.loads((folder / "digiq_policy.json").read_text())
    tok = processor.tokenizer
    tok.padding_side = "left"
    hits = 0
    for b in range(0, len(samples), 20):
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
    return hits / len(samples)


@pytest.mark.miniwob
@pytest.mark.slow
def test_gui_tiny_web_grounds_on_fresh_web_pages_as_its_card_says(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Web grounding re-measured on pages of page seeds the pretraining never used."""
    import random

    pytest.importorskip("miniwob")
    if not (Path("/usr/bin/chromium").exists() and Path("/usr/bin/chromedriver").exists()):
        pytest.skip("needs Debian's chromium and chromium-driver")
    from digiq.envs.web_screens import WebScreen, WebScreensConfig, collect_web_screens, make_web_sample

    record = _card(GUI_TINY_WEB)
    tasks = record["config"]["web"]["tasks"]
    cfg = WebScreensConfig(
        tasks=tasks, num_screens=len(tasks), seed=7, scratch_dir=str(tmp_path_factory.mktemp("b"))
    )
    import io

    from PIL import Image

    bank = [
        WebScreen(Image.open(io.BytesIO(r["png"])).convert("RGB"), json.loads(r["labels"]))
        for r in collect_web_screens(cfg, progress=False)
    ]
    samples = [make_web_sample(random.Random(f"test:web:{i}"), "web_ground", bank) for i in range(PER_SKILL)]
    acc = _accuracy(REPO_ROOT / GUI_TINY_WEB, samples)
    assert acc >= record["metrics"]["acc/web_ground"] - TOLERANCE, acc


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_the_shipped_model_grounds_and_refers_as_its_card_says(name: str) -> None:
    """Plain transformers (no digiq loader) answers fresh grounding and referring questions."""
    import random

    m = _card(name)["metrics"]
    for skill in ("ground", "refer"):
        # A seed the card's evaluation never used.
        samples = [make_sample(random.Random(f"test:{skill}:{i}"), skill) for i in range(PER_SKILL)]
        acc = _accuracy(REPO_ROOT / name, samples)
        assert acc >= m[f"acc/{skill}"] - TOLERANCE, (skill, acc, m[f"acc/{skill}"])
        assert acc > 0.2, (skill, acc)  # and far above chance either way
