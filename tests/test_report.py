"""``digiq report`` and ``digiq.viz``: DOM contents against the critic computed directly, headless Chromium."""

from __future__ import annotations

import html.parser
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from killresume import digiq_env
from PIL import Image

from digiq.actions import Action, ActionType
from digiq.data.features import FeatureCache, write_cache
from digiq.data.schema import load_dataset, trajectory_bounds
from digiq.models.critic import Critic, CriticArch, load_critic, save_critic
from digiq.sim.phone import SimConfig, SimPhone
from digiq.stages import report
from digiq.stages.collect import Config as CollectConfig
from digiq.stages.collect import run as collect_run
from digiq.viz import HIGHLIGHT, draw_actions

ROOT = Path(__file__).resolve().parents[1]
DS, DA, N = 6, 10, 4


class DomParser(html.parser.HTMLParser):
    """Collects trajectories, steps and candidate rows (with their cell texts) from the report page."""

    def __init__(self) -> None:
        super().__init__()
        self.trajs: list[str] = []
        self.steps: list[dict] = []
        self.rows: list[dict] = []
        self.imgs = 0
        self.external: list[str] = []
        self._cell: dict | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        cls = (a.get("class") or "").split()
        if tag == "section" and "traj" in cls:
            self.trajs.append(a["data-traj"])
        elif tag == "div" and "step" in cls:
            self.steps.append({"row": int(a["data-row"]), "cands": []})
        elif tag == "tr" and "cand" in cls:
            row = {"classes": cls, "index": int(a["data-index"]), "attrs": a, "cells": {}}
            self.steps[-1]["cands"].append(row)
            self.rows.append(row)
        elif tag == "td" and self.rows and cls:
            name = next((c for c in cls if c in ("q", "v", "adv", "qstar", "action")), cls[0])
            self._cell = {"row": self.rows[-1], "name": name, "text": ""}
        elif tag == "img":
            self.imgs += 1
            if not a.get("src", "").startswith("data:image/"):
                self.external.append(a.get("src", ""))
        if tag in ("script", "link") or (tag == "img" and "http" in a.get("src", "")[:8]):
            self.external.append(tag)

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell["text"] += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            self._cell["row"]["cells"][self._cell["name"]] = self._cell["text"].strip()
            self._cell = None


def parse(path: Path) -> DomParser:
    p = DomParser()
    p.feed(path.read_text())
    return p


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """A small simulated dataset with N=4 candidates, a random feature cache and a random critic."""
    tmp = tmp_path_factory.mktemp("report")
    data = tmp / "data"
    collect_run(
        CollectConfig(
            output_dir=str(data),
            num_trajectories=8,
            num_candidates=N,
            seed=1,
            sim=SimConfig(width=90, height=160),
        )
    )
    ds = load_dataset(data)
    g = torch.Generator().manual_seed(0)
    state = torch.randn(len(ds), DS, generator=g)
    actions = torch.randn(len(ds), N, DA, generator=g)
    feats = write_cache(tmp / "feats", state, actions, meta={"dataset": str(data)}, shard_rows=16)
    torch.manual_seed(0)
    critic = Critic(CriticArch(DS, DA, q_hidden=(16,), v_hidden=(16,)))
    save_critic(critic, tmp / "critic", extra={"gamma": 0.9})
    return {"tmp": tmp, "data": data, "feats": feats, "critic": tmp / "critic", "num_rows": len(ds)}


def _run_report(setup: dict, out: Path, **kw) -> dict:
    cfg = report.Config(dataset=str(setup["data"]), output_dir=str(out), **kw)
    cfg.validate()
    return report.run(cfg)


def test_report_dom_matches_critic(setup) -> None:
    out = setup["tmp"] / "report"
    summary = _run_report(
        setup, out, features=str(setup["feats"]), critic_dir=str(setup["critic"]), max_trajectories=3
    )
    assert (out / "_COMPLETE").exists() and (out / "plots" / "q_vs_mc.png").exists()
    dom = parse(out / "index.html")
    ds = load_dataset(setup["data"])
    bounds = trajectory_bounds(ds)[:3]
    assert len(dom.trajs) == 3
    assert [s["row"] for s in dom.steps] == [r for s, e in bounds for r in range(s, e)]
    assert all(len(s["cands"]) == N for s in dom.steps)
    assert len(dom.rows) == N * sum(e - s for s, e in bounds)
    assert not dom.external, f"external resources in the page: {dom.external}"
    assert dom.imgs == len(dom.steps) + 2  # one screenshot per step + two plots

    # Q, V, Q-V and Q* on the page equal the critic / simulator computed here directly.
    critic = load_critic(setup["critic"])
    cache = FeatureCache.open(setup["feats"])
    phone = SimPhone(SimConfig())
    with torch.no_grad():
        for step in dom.steps:
            r = step["row"]
            q = critic.q(cache.actions[r]).double().numpy()
            v = float(critic.v(cache.state[r]))
            qstar = phone.q_star(ds[r]["state_key"], ds[r]["candidates"], 0.9)  # gamma from critic.json
            chosen = [c["index"] for c in step["cands"] if "chosen" in c["classes"]]
            assert chosen == [int(np.argmax(q))]
            assert [c["index"] for c in step["cands"] if "dataset" in c["classes"]] == [0]
            for c in step["cands"]:
                i = c["index"]
                assert float(c["cells"]["q"]) == pytest.approx(q[i], abs=6e-5)
                assert float(c["attrs"]["data-q"]) == pytest.approx(q[i], rel=1e-6, abs=1e-7)
                assert float(c["cells"]["v"]) == pytest.approx(v, abs=6e-5)
                assert float(c["cells"]["adv"]) == pytest.approx(q[i] - v, abs=1e-4)
                assert float(c["cells"]["qstar"]) == pytest.approx(qstar[i], abs=6e-5)
    assert summary["shown_trajectories"] == 3 and summary["gamma"] == 0.9
    assert summary["num_candidates"] == N


def test_report_without_critic(setup) -> None:
    out = setup["tmp"] / "report_plain"
    summary = _run_report(setup, out, max_trajectories=2, q_star="skip", image_format="jpeg")
    dom = parse(out / "index.html")
    assert len(dom.trajs) == 2
    assert dom.rows and all("chosen" not in r["classes"] and "q" not in r["cells"] for r in dom.rows)
    assert "data:image/jpeg" in (out / "index.html").read_text()
    assert not (out / "plots").exists() and "q_mc_pearson" not in summary


def test_report_rejects_mismatched_cache(setup) -> None:
    from digiq.errors import DataError

    bad = write_cache(setup["tmp"] / "feats_short", torch.zeros(3, DS), torch.zeros(3, N, DA), overwrite=True)
    with pytest.raises(DataError, match="rows"):
        _run_report(setup, setup["tmp"] / "r_bad", features=str(bad), critic_dir=str(setup["critic"]))
    assert not (setup["tmp"] / "r_bad").exists()


def test_draw_actions_marks_each_kind() -> None:
    base = Image.new("RGB", (100, 200), (255, 255, 255))
    acts = [
        Action.tap(0.25, 0.5),
        Action.swipe((0.8, 0.2), (0.5, 0.2)),
        Action.type_text("shoes"),
        Action.key(ActionType.PRESS_BACK),
        "garbage",
    ]
    out = draw_actions(base, acts, highlight=0, width=200)
    assert out.size == (200, 400) and base.getpixel((50, 50)) == (255, 255, 255)
    px = np.asarray(out)
    hi = np.all(px == np.array(HIGHLIGHT), axis=-1)
    ys, xs = np.nonzero(hi)
    # The highlighted tap is drawn around its point (y=0.25 -> 100 px, x=0.5 -> 100 px).
    assert hi.sum() > 20 and abs(ys.mean() - 100) < 15 and abs(xs.mean() - 100) < 20
    # Something was drawn in each region: swipe arrow column, bottom label (type), top badge (key).
    assert (px[200:320, 30:50] != 255).any()
    assert (px[370:, :] != 255).any() and (px[:30, :] != 255).any()
    with pytest.raises(ValueError, match="labels"):
        draw_actions(base, acts, labels=["a"])


CHROMIUM = next(
    (shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None
)


@pytest.mark.slow
@pytest.mark.chromium
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary found")
def test_report_renders_in_chromium(setup, tmp_path) -> None:
    """The CLI writes the page; headless Chromium renders it non-blank with the highlight colour visible."""
    out = tmp_path / "report"
    env = digiq_env()
    cmd = [
        sys.executable, "-m", "digiq", "report", f"dataset={setup['data']}", f"features={setup['feats']}",
        f"critic_dir={setup['critic']}", f"output_dir={out}", "max_trajectories=2",
    ]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    shot = tmp_path / "shot.png"
    subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--force-color-profile=srgb",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
         f"file://{out / 'index.html'}"],
        check=True, capture_output=True, timeout=120, env=env,
    )  # fmt: skip
    px = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    assert px.shape[:2] == (2000, 1200)
    assert px.std() > 20, "the rendered page is blank"
    close = lambda rgb: (np.abs(px - np.array(rgb)).sum(-1) <= 6).sum()  # noqa: E731
    assert close(report.CHOSEN_BG) > 500, "no highlighted (argmax-Q) table row visible"
    assert close(HIGHLIGHT) > 50, "highlight colour missing from tags / drawings"
