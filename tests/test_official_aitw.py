"""configs/*/official-aitw.yaml: they parse and validate, and one critic step with the official config on
an official-format file gives the losses of the official formulas, computed here by hand."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from aitw_helpers import ensemble_mlp_numpy, import_file, two_task_file

from digiq.config import load_config
from digiq.models.tiny_text import save_tiny_text_encoder
from digiq.stages import extract_policy as ep
from digiq.stages import train_critic as tc
from digiq.training.critic_learner import CriticLearner

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL = ROOT / "configs" / "train-critic" / "official-aitw.yaml"
HORIZON = 3


def test_configs_parse_and_hold_the_papers_values() -> None:
    cfg = load_config(tc.Config, OFFICIAL)
    c = cfg.critic
    assert (cfg.gamma, cfg.tau, cfg.batch_size, cfg.optim.lr, cfg.optim.max_grad_norm) == (
        0.95,
        0.1,
        128,
        1e-5,
        0.01,
    )
    assert c.q_hidden == (10752, 3840, 3840, 3840) and c.v_hidden == (2304, 2304, 2304)
    assert (c.aggregate, c.target_pairing, c.frame_stack, c.q_input) == (
        "max",
        "per_head",
        True,
        "state_action",
    )
    assert (c.text.encoder, c.text.separate, c.text.finetune) == ("roberta-base", True, True)
    assert not c.layer_norm and not c.normalize_inputs
    # the Q / V input widths of the official critic (critic.py:156-157) with roberta-base and the released
    # features: 3 x 768 + 2 x 1408 = 5120 and 5120 + 2 x 768 + 4096 = 10752
    from digiq.models.critic import CriticArch

    arch = CriticArch(
        1408, 4096, frame_stack=2, q_input="state_action", text_encoder="roberta-base", text_dim=768
    )
    assert (arch.v_in, arch.q_in) == (5120, 10752)
    recommended = load_config(tc.Config, ROOT / "configs" / "train-critic" / "aitw.yaml")
    assert recommended.critic.text.encoder == "roberta-base" and recommended.critic.frame_stack
    ex = load_config(ep.Config, ROOT / "configs" / "extract-policy" / "official-aitw.yaml")
    assert (ex.threshold, ex.optim.lr, ex.optim.max_grad_norm, ex.train.batch_size) == (0.05, 1e-4, 0.01, 128)
    # every value line of the official config cites its source
    for line in OFFICIAL.read_text().splitlines():
        if re.match(r"^\s*\w+:\s*\S", line) and not line.lstrip().startswith(
            ("dataset", "features", "output_dir")
        ):
            assert "#" in line, line


def _official_type_text(action: str) -> tuple[str, str]:
    """action_type and typed_text fields of an AutoUI action string, read with regexes here."""
    ty = re.search(r'"action_type":\s*"([A-Z_]+)"', action).group(1)
    tx = re.search(r'"typed_text":\s*"([^"]*)"', action)
    return ty, (tx.group(1) if tx and ty == "TYPE" else "")


def _pooled(critic: torch.nn.Module, role: str, text: str) -> np.ndarray:
    """One string through one encoder, unbatched (the official critic's per-string pooled output)."""
    enc = critic.text
    toks = enc.tokenizer([text], return_tensors="pt")
    if toks["input_ids"].shape[1] == 0:  # the tiny tokenizer has no special tokens: one attended pad
        toks = {"input_ids": torch.tensor([[enc.tokenizer.pad_token_id]]), "attention_mask": torch.ones(1, 1)}
    with torch.no_grad():
        out = enc.encoder(role)(input_ids=toks["input_ids"], attention_mask=toks["attention_mask"])
    return out.pooler_output[0].double().numpy()


def _inputs(critic, steps: list[list[dict]], row: int) -> tuple[np.ndarray, np.ndarray]:
    """(V input, Q input of the logged action) of a row: the official layout (critic.py:156-157)."""
    traj, t = divmod(row, HORIZON)
    step = steps[traj][t]
    prev = steps[traj][t - 1] if t else None
    p_ty, p_tx = _official_type_text(prev["action"]) if prev else ("", "")
    a_ty, a_tx = _official_type_text(step["action"])
    img_prev = (prev or step)["image_features"]
    v_in = np.concatenate([_pooled(critic, "type", p_ty), _pooled(critic, "text", p_tx),
                           _pooled(critic, "goal", step["task"]), img_prev, step["image_features"]])  # fmt: skip
    q_in = np.concatenate([v_in, _pooled(critic, "type", a_ty), _pooled(critic, "text", a_tx),
                           step["q_rep_out_list"][0]])  # fmt: skip
    return v_in, q_in


def _next_v_input(critic, steps: list[list[dict]], row: int) -> np.ndarray:
    """V input of s' as the official trainer builds it: from the step's own next_observation (previous action
    and goal, the critic's regexes, critic.py:104-105) and next_image_features stacked [cur, next]
    (offpolicy_train_loop.py:22; trainer.py:149), not from the following row."""
    traj, t = divmod(row, HORIZON)
    step = steps[traj][t]
    prev = re.search(r"Previous Actions: (.*?)Goal:", step["next_observation"]).group(1)
    goal = re.search(r"Goal: (.*?)</s>", step["next_observation"]).group(1)
    p_ty, p_tx = _official_type_text(prev)
    return np.concatenate([_pooled(critic, "type", p_ty), _pooled(critic, "text", p_tx), _pooled(critic, "goal", goal),
                           step["image_features"], step["next_image_features"]])  # fmt: skip


@pytest.mark.slow
def test_one_official_step_equals_hand_computation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pt = two_task_file(tmp_path, per_goal=3, horizon=HORIZON)
    steps = torch.load(pt, weights_only=False)
    ds, feats = import_file(pt, tmp_path)
    enc = save_tiny_text_encoder(str(tmp_path / "tiny-roberta"))
    seen: dict = {}
    real_step = CriticLearner.step

    def spy(self, data, batch):
        seen.update(
            critic=copy.deepcopy(self.critic), target=copy.deepcopy(self.target), idx=batch.idx.clone()
        )
        loss, parts = real_step(self, data, batch)
        seen.update(loss=loss, parts=parts)
        return loss, parts

    monkeypatch.setattr(CriticLearner, "step", spy)
    # The official config; only the widths shrink (10752-wide layers do not fit a unit test) and the
    # encoder is a tiny random RoBERTa instead of roberta-base.
    cfg = load_config(
        tc.Config,
        OFFICIAL,
        [f"dataset={ds}", f"features={feats}", f"output_dir={tmp_path / 'critic'}", f"critic.text.encoder={enc}",
         "critic.q_hidden=[24,8,8,8]", "critic.v_hidden=[16,8,8]", "steps_per_epoch=1", "epochs=1", "device=cpu",
         "wandb.mode=disabled"],
    )  # fmt: skip
    tc.run(cfg)
    critic, target, idx = seen["critic"], seen["target"], seen["idx"].numpy()
    assert len(idx) == 128
    gamma = 0.95
    q_pred, v_pred, y_q, y_v = [], [], [], []
    for row in idx.tolist():
        traj, t = divmod(row, HORIZON)
        step = steps[traj][t]
        v_in, q_in = _inputs(critic, steps, row)
        v_in_next = _next_v_input(target, steps, row)  # the last step's is masked by done
        _, q_in_t = _inputs(target, steps, row)
        q_pred.append(ensemble_mlp_numpy(critic.q_net, q_in[None])[0])
        v_pred.append(ensemble_mlp_numpy(critic.v_net, v_in[None])[0])
        # per-head backup (trainer.py:148-152,173-175): head i from target head i, no aggregation
        y_q.append(
            float(step["reward"])
            + gamma * (1 - float(step["done"])) * ensemble_mlp_numpy(target.v_net, v_in_next[None])[0]
        )
        y_v.append(ensemble_mlp_numpy(target.q_net, q_in_t[None])[0])
    q_pred, v_pred, y_q, y_v = map(np.asarray, (q_pred, v_pred, y_q, y_v))  # (128, 2) each
    lq = sum(np.mean((q_pred[:, i] - y_q[:, i]) ** 2) for i in range(2))  # MSE(q1) + MSE(q2) (trainer.py:189)
    lv = sum(np.mean((v_pred[:, i] - y_v[:, i]) ** 2) for i in range(2))
    assert seen["parts"]["loss_q"].item() == pytest.approx(lq, abs=1e-6)
    assert seen["parts"]["loss_v"].item() == pytest.approx(lv, abs=1e-6)
    assert seen["loss"].item() == pytest.approx(lq + lv, abs=1e-6)
    # scoring takes the max over the twins (trainer.py:264-265)
    from digiq.models.critic import load_critic

    assert load_critic(tmp_path / "critic" / "critic").arch.aggregate == "max"
