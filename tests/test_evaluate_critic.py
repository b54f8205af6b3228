"""`digiq evaluate mode=offline policy=none`: a critic's offline report on held-out imported trajectories,
and `digiq report` showing the text inputs such a critic reads."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from aitw_helpers import GOALS, import_file, two_task_file

from digiq.config import ConfigError, load_config
from digiq.data.features import FeatureCache
from digiq.data.schema import load_dataset
from digiq.models import critic_text as ct
from digiq.models.critic import load_critic
from digiq.models.tiny_text import save_tiny_text_encoder
from digiq.stages import evaluate, report
from digiq.stages import train_critic as tc
from digiq.utils.stats import auc

HORIZON = 3


def test_auc_hand_values() -> None:
    # positives 0.35, 0.8 vs negatives 0.1, 0.4: pairs won 3 of 4
    assert auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert auc(np.array([2.0, 2.0, 2.0]), np.array([1, 0, 1])) == 0.5  # all tied
    assert np.isnan(auc(np.array([1.0, 2.0]), np.array([1, 1])))


@pytest.fixture(scope="module")
def critics(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("eval")
    ds, feats = import_file(two_task_file(root, per_goal=6, horizon=HORIZON), root)
    enc = save_tiny_text_encoder(str(root / "tiny-roberta"))
    out = {}
    # The plain critic's test holds for any weights (V cannot see the goal), so a few steps suffice.
    for name, extra in (
        ("text", [f"critic.text.encoder={enc}", "critic.text.separate=false", "steps_per_epoch=50"]),
        ("plain", ["steps_per_epoch=2", "epochs=1"]),
    ):
        cfg = load_config(
            tc.Config,
            None,
            [f"dataset={ds}", f"features={feats}", f"output_dir={root / name}", "batch_size=32",
             "epochs=2", "critic.q_hidden=[32,32]", "critic.v_hidden=[32,32]",
             "optim.lr=3e-3", "device=cpu", "critic.frame_stack=true", "critic.q_input=state_action",
             "wandb.mode=disabled", "val_fraction=0.25", *extra],
        )  # fmt: skip
        tc.run(cfg)
        out[name] = root / name / "critic"
    return root, ds, feats, out


def _evaluate(root: Path, ds: Path, feats: Path, critic: Path, name: str, *extra: str) -> dict:
    cfg = load_config(
        evaluate.Config,
        None,
        ["mode=offline", "policy=none", f"dataset={ds}", f"features={feats}", f"critic_dir={critic}",
         f"output_dir={root / name}", *extra],
    )  # fmt: skip
    res = evaluate.run(cfg)
    assert json.loads((root / name / "metrics.json").read_text())["critic/rows"] == res["critic/rows"]
    return res


@pytest.mark.slow
def test_offline_critic_report(critics) -> None:
    root, ds, feats, paths = critics
    res = _evaluate(root, ds, feats, paths["text"], "eval_text", "threshold=0.0")
    # held out: the critic's own val_fraction (0.25 of 12 trajectories = the last 3, both goals among them)
    assert res["critic/row_set"].startswith("heldout (last 0.25") and res["critic/trajectories"] == 3
    assert res["critic/rows"] == 3 * HORIZON
    d = load_dataset(ds)
    rows = np.arange(len(d) - 3 * HORIZON, len(d))
    success = np.asarray([d[int(r)]["task"] == GOALS[0] for r in rows])
    assert res["critic/success_fraction"] == pytest.approx(success.mean())
    # the goal-aware critic ranks every successful trajectory's steps above the failed one's
    assert res["critic/auc_v_success"] == 1.0 and res["critic/auc_v_success_first_step"] == 1.0
    assert res["critic/pearson_v_mc"] > 0.95 and res["critic/pearson_q_mc"] > 0.95

    # The advantage and Best-of-N numbers recomputed here from the critic's Q and V.
    critic = load_critic(paths["text"])
    fc = FeatureCache.open(feats)
    q, v = ct.score(
        critic, ct.build_inputs(critic, fc.state, fc.actions, d), torch.as_tensor(rows), slice(None)
    )
    q, v = q.double().numpy(), v.double().numpy()
    adv = q[:, 0] - v
    assert res["critic/advantage_mean"] == pytest.approx(adv.mean(), abs=1e-6)
    assert res["critic/advantage_positive_fraction"] == pytest.approx((adv > 0).mean())
    assert res["critic/advantage_quantiles"]["p50"] == pytest.approx(np.median(adv), abs=1e-6)
    a = q - v[:, None]  # no padding in this file: every candidate valid
    best = a.argmax(1)
    kept = np.clip(a.max(1), 0, 1) > 0.0
    assert res["critic/best_of_n_kept_fraction"] == pytest.approx(kept.mean())
    assert res["critic/best_of_n_replaces_logged"] == pytest.approx((best != 0).mean())

    # Without the goal, V is the same for both goals' steps: AUC exactly one half, whatever was learned.
    plain = _evaluate(root, ds, feats, paths["plain"], "eval_plain")
    assert plain["critic/auc_v_success"] == 0.5 and plain["critic/auc_v_success_first_step"] == 0.5


def test_critic_only_needs_a_critic(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="policy=none"):
        load_config(evaluate.Config, None, ["mode=offline", "policy=none", f"dataset={tmp_path}"])


@pytest.mark.slow
def test_report_shows_text_inputs(critics) -> None:
    root, ds, feats, paths = critics
    out = root / "report"
    cfg = report.Config(dataset=str(ds), output_dir=str(out), features=str(feats), critic_dir=str(paths["text"]),
                        max_trajectories=2)  # fmt: skip
    cfg.validate()
    report.run(cfg)
    page = (out / "index.html").read_text()
    lines = re.findall(r'<p class="text-inputs">(.*?)</p>', page)
    assert len(lines) == 2 * HORIZON
    assert "goal &ldquo;Turn on wifi&rdquo;" in lines[0]
    assert "previous action &ldquo;&rdquo; | &ldquo;&rdquo;" in lines[0]  # step 0: no previous action
    assert "previous action &ldquo;DUAL_POINT&rdquo; | &ldquo;&rdquo;" in lines[1]
    assert "2: &ldquo;TYPE&rdquo; | &ldquo;usb cable&rdquo;" in lines[1]  # step 1's TYPE candidate
    # a critic without text inputs shows none
    cfg2 = report.Config(dataset=str(ds), output_dir=str(root / "report2"), features=str(feats),
                         critic_dir=str(paths["plain"]), max_trajectories=1)  # fmt: skip
    report.run(cfg2)
    assert 'class="text-inputs"' not in (root / "report2" / "index.html").read_text()


def test_offline_best_of_n_never_picks_an_unparsable_candidate(tmp_path: Path, monkeypatch) -> None:
    """A "garbage output" candidate whose Q is the largest: extract-policy masks it (A = 0, the official
    actor's rule), and so must the offline report; the logged action, the best valid one, is kept."""
    pt = two_task_file(tmp_path, per_goal=2, horizon=HORIZON)
    data = torch.load(pt, weights_only=False)
    for traj in data:
        for step in traj:
            step["action_list"][2] = "garbage output"
    torch.save(data, pt)
    ds, feats = import_file(pt, tmp_path)
    cfg = load_config(
        tc.Config,
        None,
        [f"dataset={ds}", f"features={feats}", f"output_dir={tmp_path / 'c'}", "batch_size=8", "steps_per_epoch=1",
         "epochs=1", "critic.q_hidden=[8]", "critic.v_hidden=[8]", "device=cpu", "wandb.mode=disabled"],
    )  # fmt: skip
    tc.run(cfg)
    real = evaluate.score

    def rigged(critic, inputs, idx, cols):
        q, v = real(critic, inputs, idx, cols)
        q = v[:, None] + torch.tensor([0.5, -1.0, 5.0])  # logged 0.5 above V, garbage 5 above V
        return q, v

    monkeypatch.setattr(evaluate, "score", rigged)
    res = _evaluate(tmp_path, ds, feats, tmp_path / "c" / "critic", "eval", "rows=all", "threshold=0.1")
    assert res["critic/rows"] == 4 * HORIZON
    assert res["critic/best_of_n_replaces_logged"] == 0.0
    assert res["critic/best_of_n_kept_fraction"] == 1.0
    assert res["critic/best_of_n_valid_candidate_fraction"] == pytest.approx(2 / 3)
