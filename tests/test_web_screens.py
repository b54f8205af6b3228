"""Web screens for pretraining (issue #13 item 4): labels from the DOM, never the pipeline's tasks."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from PIL import Image

from digiq.config import ConfigError
from digiq.envs.miniwob import DEFAULT_TASKS
from digiq.envs.web_screens import WEB_TASKS, WebScreen, WebScreensConfig, make_web_sample
from digiq.sim.synthetic import is_correct, sample_stream_item
from digiq.stages.pretrain_vlm import stream_item


def test_web_tasks_never_include_the_pipeline_tasks() -> None:
    assert not set(WEB_TASKS) & set(DEFAULT_TASKS)
    WebScreensConfig().validate()
    with pytest.raises(ConfigError, match="click-tab"):
        WebScreensConfig(tasks=["click-widget", "click-tab"]).validate()


def fake_bank() -> list[WebScreen]:
    labels = [
        {"text": "Section #1", "box": [0.1, 0.1, 0.2, 0.5]},
        {"text": "Submit", "box": [0.6, 0.2, 0.7, 0.4]},
        {"text": "Outer", "box": [0.3, 0.0, 0.9, 1.0]},  # contains Submit: the innermost label names a point
    ]
    return [WebScreen(Image.new("RGB", (160, 210), "white"), labels)]


def test_web_samples_ground_inside_the_element_and_refer_to_the_innermost_label() -> None:
    rng, bank = random.Random(0), fake_bank()
    grounds = [make_web_sample(rng, "web_ground", bank) for _ in range(30)]
    for s in grounds:
        assert is_correct(s, s.answer)  # the centre is inside the box it names
        assert not is_correct(s, "tap 0.99 0.99")
    assert {s.box for s in grounds} == {(0.1, 0.1, 0.2, 0.5), (0.6, 0.2, 0.7, 0.4), (0.3, 0.0, 0.9, 1.0)}
    refers = [make_web_sample(rng, "web_refer", bank) for _ in range(200)]
    assert {"Section #1", "Submit", "Outer", "nothing"} <= {s.answer for s in refers}
    for s in refers:
        if s.question.startswith("What is at"):
            y, x = map(float, s.question[len("What is at ") : -1].split())
            in_submit = 0.6 <= y <= 0.7 and 0.2 <= x <= 0.4
            assert (s.answer == "Submit") == in_submit or abs(y - 0.6) < 0.01 or abs(y - 0.7) < 0.01


def test_the_stream_without_web_screens_is_the_synthetic_stream() -> None:
    skills, weights = ["ground", "refer", "parse"], [1.0, 1.0, 1.0]
    for i in range(5):
        a = stream_item(3, 7, i, skills, weights, 180, 320, None)
        b = sample_stream_item(3, 7, i, skills, weights, 180, 320)
        assert (a.question, a.answer, a.skill) == (b.question, b.answer, b.skill)
    mixed = [
        stream_item(3, 7, i, [*skills, "web_ground"], [*weights, 3.0], 180, 320, fake_bank())
        for i in range(40)
    ]
    assert {s.skill for s in mixed} >= {"web_ground", "ground"}


@pytest.mark.miniwob
def test_collected_screens_carry_dom_labels(tmp_path_factory: pytest.TempPathFactory) -> None:
    pytest.importorskip("miniwob")
    if not (Path("/usr/bin/chromium").exists() and Path("/usr/bin/chromedriver").exists()):
        pytest.skip("needs Debian's chromium and chromium-driver")
    from digiq.envs.web_screens import collect_web_screens

    cfg = WebScreensConfig(
        tasks=["click-widget", "read-table"], num_screens=6, scratch_dir=str(tmp_path_factory.mktemp("b"))
    )
    rows = collect_web_screens(cfg, progress=False)
    assert len(rows) == 6 and {r["task"] for r in rows} == {"click-widget", "read-table"}
    assert {r["split"] for r in rows} == {"train", "eval"}
    for r in rows:
        labels = json.loads(r["labels"])
        assert len(labels) >= 2 and all(0 <= v <= 1 for lab in labels for v in lab["box"])
