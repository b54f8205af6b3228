"""Text inputs and frame stacking for the critic (the official critic's inputs), on imported AitW files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from aitw_helpers import GOALS, import_file, two_task_file

from digiq.actions import Action
from digiq.config import load_config
from digiq.data.features import FeatureCache
from digiq.data.schema import load_dataset
from digiq.models import critic_text as ct
from digiq.models.critic import load_critic
from digiq.models.tiny_text import save_tiny_text_encoder
from digiq.stages import train_critic as tc

HORIZON = 3


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_text_encoder(str(tmp_path_factory.mktemp("enc") / "tiny-roberta"))


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("aitw")
    return import_file(two_task_file(root, per_goal=6, horizon=HORIZON), root)


def test_row_texts_layout() -> None:
    tap, typ = Action.tap(0.5, 0.5).render(), Action.type_text("usb cable").render()
    junk = "not an action"
    t = ct.row_texts(["g1", "g1", "g2"], [tap, typ, junk], [[tap, typ], [typ], [junk, tap]], [0, 0, 1], 2)
    s = t.strings
    # row 0: step 0 -> empty previous action; row 1: previous = row 0's tap; row 2: a new trajectory
    assert [s["type"][i] for i in t.prev_type.tolist()] == ["", "DUAL_POINT", ""]
    assert [s["text"][i] for i in t.prev_text.tolist()] == ["", "", ""]
    assert [s["goal"][i] for i in t.goal.tolist()] == ["g1", "g1", "g2"]
    # candidates: (type, text); padding -> ""; an unparsable action goes whole to both encoders
    assert [[s["type"][i] for i in r] for r in t.cand_type.tolist()] == [
        ["DUAL_POINT", "TYPE"], ["TYPE", ""], [junk, "DUAL_POINT"]]  # fmt: skip
    assert [[s["text"][i] for i in r] for r in t.cand_text.tolist()] == [
        ["", "usb cable"], ["usb cable", ""], [junk, ""]]  # fmt: skip
    assert len(s["type"]) == len(set(s["type"]))  # each unique string once


def test_per_batch_encoding_equals_tables(encoder: str, imported) -> None:
    """A fine-tuned encoder's per-batch unique-string pass gives exactly the per-row embeddings."""
    ds, feats = imported
    torch.manual_seed(0)
    for separate in (True, False):
        enc = ct.TextEncoders.load(encoder, separate, 64)
        fc, d = FeatureCache.open(feats), load_dataset(ds)
        t = ct.row_texts(list(d["task"]), list(d["action"]), list(d["candidates"]), list(d["traj_id"]), 3)
        tables = ct.embed_tables(enc, t.strings)
        frozen = ct.CriticInputs(fc.state, fc.actions, None, t, tables)
        live = ct.CriticInputs(fc.state, fc.actions, None, t, None)
        idx, cols = torch.tensor([0, 5, 5, 17, 2]), torch.tensor([0, 2, 1, 1, 0])
        with torch.no_grad():
            a, b = ct.gather(frozen, idx, cols), ct.gather(live, idx, cols, enc)
        torch.testing.assert_close(a.state_text, b.state_text, atol=1e-6, rtol=0)
        torch.testing.assert_close(a.action_text, b.action_text, atol=1e-6, rtol=0)
        # by hand: the goal part of row 17 is the encoder's output for its task string
        with torch.no_grad():
            g = enc.encode("goal", [d[17]["task"]])[0]
        H = enc.hidden_size
        torch.testing.assert_close(b.state_text[3, 2 * H :], g, atol=1e-6, rtol=0)


def _train(ds: Path, feats: Path, out: Path, *extra: str) -> dict[str, float]:
    cfg = load_config(
        tc.Config,
        None,
        [f"dataset={ds}", f"features={feats}", f"output_dir={out}", "batch_size=32", "steps_per_epoch=100",
         "epochs=2", "critic.q_hidden=[32,32]", "critic.v_hidden=[32,32]", "optim.lr=3e-3", "device=cpu",
         "critic.frame_stack=true", "critic.q_input=state_action", "wandb.mode=disabled", *extra],
    )  # fmt: skip
    return tc.run(cfg)


def _values(out: Path, ds: Path, feats: Path) -> torch.Tensor:
    critic = load_critic(out / "critic")
    fc, d = FeatureCache.open(feats), load_dataset(ds)
    inputs = ct.build_inputs(critic, fc.state, fc.actions, d)
    _, v = ct.score(critic, inputs, torch.arange(len(d)), 0)
    return v.view(-1, HORIZON), [d[i * HORIZON]["task"] for i in range(len(d) // HORIZON)]


@pytest.mark.slow
def test_goal_reaches_v_only_with_text(encoder: str, imported, tmp_path: Path) -> None:
    """Two goals on the same screens: with text inputs V tells them apart, without it V is identical."""
    ds, feats = imported
    _train(ds, feats, tmp_path / "text", f"critic.text.encoder={encoder}", "critic.text.separate=false")
    v, goals = _values(tmp_path / "text", ds, feats)
    win = torch.tensor([g == GOALS[0] for g in goals])
    assert win.any() and (~win).any()
    # MC returns: the winning goal 0.95^2, 0.95, 1 along the trajectory, the other 0
    assert (v[win].min(0).values > v[~win].max(0).values + 0.5).all(), v
    torch.testing.assert_close(v[win].mean(0), torch.tensor([0.9025, 0.95, 1.0]), atol=0.1, rtol=0)
    # the frozen embeddings were cached with the features, once
    assert len(list(feats.glob("text-*.safetensors"))) == 1

    # holds for any weights (the goal never reaches V), so a couple of steps suffice
    _train(ds, feats, tmp_path / "plain", "steps_per_epoch=2", "epochs=1")
    v0, _ = _values(tmp_path / "plain", ds, feats)
    assert torch.equal(v0[win], v0[~win][: int(win.sum())])  # the same inputs: the same V, whatever the goal


@pytest.mark.slow
def test_finetuned_encoder_is_trained(encoder: str, imported, tmp_path: Path) -> None:
    from transformers import AutoModel

    ds, feats = imported
    _train(
        ds,
        feats,
        tmp_path / "ft",
        f"critic.text.encoder={encoder}",
        "critic.text.finetune=true",
        "epochs=1",
        "steps_per_epoch=40",
    )
    critic = load_critic(tmp_path / "ft" / "critic")
    base = AutoModel.from_pretrained(encoder)
    for role in ct.ROLES:  # three separate encoders (official layout), each trained by the critic's Adam
        moved = critic.text.encoder(role).pooler.dense.weight - base.pooler.dense.weight
        assert moved.abs().max() > 1e-3, role
    v, goals = _values(tmp_path / "ft", ds, feats)
    win = torch.tensor([g == GOALS[0] for g in goals])
    assert v[win][:, -1].min() > v[~win][:, -1].max() + 0.5, v


class _Interrupted(Exception):
    pass


@pytest.mark.slow
def test_finetuned_text_critic_resumes_bitwise(encoder: str, imported, tmp_path: Path, monkeypatch) -> None:
    """Killed after its epoch-1 checkpoint and resumed: encoders, heads, target and Adam state bit for bit."""
    from safetensors.torch import load_file

    from digiq.training.checkpoint import latest_checkpoint

    ds, feats = imported
    extra = (f"critic.text.encoder={encoder}", "critic.text.finetune=true", "steps_per_epoch=10", "epochs=2")
    _train(ds, feats, tmp_path / "full", *extra)
    real_save = tc.save_checkpoint

    def save_then_die(out, step, *args, position, **kwargs):
        if position["epoch"] == 2:
            raise _Interrupted
        return real_save(out, step, *args, position=position, **kwargs)

    monkeypatch.setattr(tc, "save_checkpoint", save_then_die)
    with pytest.raises(_Interrupted):
        _train(ds, feats, tmp_path / "part", *extra)
    monkeypatch.setattr(tc, "save_checkpoint", real_save)
    _train(ds, feats, tmp_path / "part", *extra, "resume=true")
    for name in ("model", "target", "optimizer"):
        a = load_file(str(latest_checkpoint(tmp_path / "full") / f"{name}.safetensors"))
        b = load_file(str(latest_checkpoint(tmp_path / "part") / f"{name}.safetensors"))
        assert a.keys() == b.keys()
        if name != "optimizer":  # the encoders are in the checkpoint
            assert any(k.startswith("text.") for k in a), sorted(a)[:5]
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
