"""Policy layer: action formats, Best-of-N selection, BC loss/step, generation, export round trip."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from digiq.actions import Action, ActionType, make_observation, parse_action
from digiq.models.policy import (
    IGNORE_INDEX,
    PolicySpec,
    best_of_n,
    build_training_batch,
    collate_encoded,
    encode_row,
    format_action,
    generate_actions,
    generate_texts,
    masked_token_kl,
    parse_policy_output,
    policy_logits,
    policy_prompt,
    save_policy,
    sequence_logprobs,
    target_ids,
    weighted_nll,
)

ACTIONS = [
    Action.tap(0.7852, 0.6779),
    Action.swipe((0.75, 0.5), (0.35, 0.5)),
    Action.type_text("usb cable"),
    Action.key(ActionType.PRESS_BACK),
    Action.key(ActionType.PRESS_HOME),
    Action.key(ActionType.PRESS_ENTER),
    Action(ActionType.STATUS_TASK_COMPLETE),
    Action(ActionType.STATUS_TASK_IMPOSSIBLE),
]


def _rounded(a: Action, p: int) -> Action:
    if a.type is not ActionType.DUAL_POINT:
        return a
    r = lambda pt: (round(pt[0], p), round(pt[1], p))  # noqa: E731
    return Action(a.type, r(a.touch), r(a.lift))


@pytest.mark.parametrize("fmt", ["compact", "decision", "autoui"])
def test_action_formats_round_trip(fmt: str) -> None:
    for a in ACTIONS:
        text = format_action(a, fmt, precision=2)
        assert parse_policy_output(text, fmt) == _rounded(a, 2), text
        # the same action given as an AutoUI string
        assert format_action(a.render(), fmt, 2) == text
    assert format_action(ACTIONS[0], "compact", 2) == "tap 0.79 0.68"
    for junk in ("", "tap 0.5", "tap 1.5 0.2", "fly away", "swipe 0.1 0.2 0.3"):
        assert not parse_policy_output(junk, fmt).is_valid


def test_best_of_n_against_hand_values() -> None:
    q = torch.tensor(
        [
            [0.50, 0.90, 0.70],  # best = 1, A = 0.5 -> keep
            [0.45, 0.42, 0.30],  # best = 0 (dataset action), A = 0.05 -> below 0.10
            [
                0.10,
                3.00,
                0.20,
            ],  # index 1 invalid (A := 0); best valid is 2 with A = -0.2 -> argmax is the invalid 0
            [0.90, 0.90, 0.20],  # tie between 0 and 1: the dataset action wins; A = 2.0 clamped to 1
            [0.20, 0.10, 0.15],  # all negative -> nothing kept
        ]
    )
    v = torch.tensor([0.40, 0.40, 0.40, -1.10, 0.60])
    valid = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 0, 1], [1, 1, 1], [1, 1, 1]], dtype=torch.bool)
    index, adv, keep = best_of_n(q, v, valid, threshold=0.10)
    assert index.tolist() == [1, 0, 1, 0, 0]
    assert torch.allclose(adv, torch.tensor([0.5, 0.05, 0.0, 1.0, 0.0]), atol=1e-6)
    assert keep.tolist() == [True, False, False, True, False]
    # a lower threshold keeps row 1; invalid-only picks are never kept even with a negative threshold
    _, _, keep2 = best_of_n(q, v, valid, threshold=-1.0)
    assert keep2.tolist() == [True, True, False, True, True]
    with pytest.raises(ValueError):
        best_of_n(q, v[:2], valid)


def test_weighted_nll_and_kl_match_references() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor(
        [[IGNORE_INDEX, IGNORE_INDEX, 3, 4, 1], [IGNORE_INDEX, 2, 2, IGNORE_INDEX, IGNORE_INDEX]]
    )
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1))
    assert torch.allclose(weighted_nll(logits, labels), ref, atol=1e-6)
    # weight 0 on row 1 = the loss of row 0 alone
    ref0 = torch.nn.functional.cross_entropy(logits[0, 1:4], labels[0, 2:5])
    assert torch.allclose(weighted_nll(logits, labels, torch.tensor([1.0, 0.0])), ref0, atol=1e-6)
    assert float(masked_token_kl(logits, logits, labels)) == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(2, 5, 7)
    p = torch.softmax(logits[0, 2], -1)
    kl_one = (p * (p.log() - torch.log_softmax(other[0, 2], -1))).sum()
    lab1 = torch.full_like(labels, IGNORE_INDEX)
    lab1[0, 3] = 1
    assert torch.allclose(masked_token_kl(logits, other, lab1), kl_one, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# With a tiny VLM
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    from digiq.models.vlm import build_tiny_vlm

    model, processor = build_tiny_vlm("idefics3", seed=0)
    return model, processor, PolicySpec(family="idefics3", max_new_tokens=8)


def _screens(n: int) -> list[Image.Image]:
    return [Image.new("RGB", (90, 160), (40 * i % 255, 120, 200 - 30 * i % 200)) for i in range(n)]


OBS = [
    make_observation("Turn on wifi", None),
    make_observation("Open the settings", Action.tap(0.5, 0.25)),
    make_observation("Turn off bluetooth", Action.key(ActionType.PRESS_HOME)),
    make_observation('Go to shopmart.com, search for "usb cable"', Action.type_text("usb cable")),
]
TARGETS = ["tap 0.12 0.34", "back", "type usb cable", "swipe 0.75 0.50 0.35 0.50"]


def test_training_batch_places_target_after_prompt(tiny) -> None:
    _, processor, spec = tiny
    batch = build_training_batch(processor, _screens(4), OBS, TARGETS, spec)
    tok = processor.tokenizer
    for i, t in enumerate(TARGETS):
        lab = batch["labels"][i]
        ids = lab[lab != IGNORE_INDEX].tolist()
        assert ids == target_ids(processor, t, spec)
        assert tok.decode(ids, skip_special_tokens=True).strip() == t
        # the target follows the prompt directly; padding only on the right
        n_real = int(batch["attention_mask"][i].sum())
        assert batch["attention_mask"][i, :n_real].all() and not batch["attention_mask"][i, n_real:].any()
        first = int((lab != IGNORE_INDEX).nonzero()[0])
        assert first + len(ids) == n_real
    assert "Goal: Turn on wifi\nPrevious: none\nAction:" in policy_prompt(OBS[0], spec)
    assert "Previous: tap 0.50 0.25" in policy_prompt(OBS[1], spec)


def test_collate_encoded_rows_equals_the_batched_encoding(tiny) -> None:
    # Training pre-encodes rows one at a time and collates by index: it must give the exact batch.
    _, processor, spec = tiny
    screens = _screens(4)
    ref = build_training_batch(processor, screens, OBS, TARGETS, spec)
    rows = [encode_row(processor, screens[i], OBS[i], TARGETS[i], spec) for i in range(4)]
    got = collate_encoded(rows, processor.tokenizer.pad_token_id)
    assert set(got) == set(ref)
    for k in ref:
        assert got[k].shape == ref[k].shape, k
        assert torch.equal(got[k], ref[k]), k


def test_bc_steps_change_params_and_loss_falls(tiny) -> None:
    import copy

    model, processor, spec = tiny
    model = copy.deepcopy(model).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = build_training_batch(processor, _screens(4), OBS, TARGETS, spec)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(8):
        loss = weighted_nll(policy_logits(model, batch), batch["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.5, losses
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) > 0.9 * len(before)


def test_generation_batched_equals_single_and_is_seeded(tiny) -> None:
    model, processor, spec = tiny
    shots = _screens(3)
    together = generate_texts(model, processor, shots, OBS[:3], spec, temperature=0.0)
    alone = [
        generate_texts(model, processor, [s], [o], spec, temperature=0.0)[0] for s, o in zip(shots, OBS[:3])
    ]
    assert together == alone
    a = generate_actions(model, processor, shots, OBS[:3], 3, temperature=1.2, seed=7, spec=spec)
    b = generate_actions(model, processor, shots, OBS[:3], 3, temperature=1.2, seed=7, spec=spec)
    assert a == b and len(a) == 3 and all(len(r) == 3 for r in a)
    lp = sequence_logprobs(model, processor, shots[:2], OBS[:2], [Action.tap(0.1, 0.2), "back"], spec)
    assert lp.shape == (2,) and bool((lp < 0).all())


def _train_a_little(model, processor, spec, steps: int = 60):
    """Teach the tiny model one action per goal so greedy decoding emits valid, distinct actions."""
    import copy

    model = copy.deepcopy(model).train()
    batch = build_training_batch(processor, _screens(4), OBS, TARGETS, spec)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        weighted_nll(policy_logits(model, batch), batch["labels"]).backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.mark.slow
def test_export_loads_with_plain_transformers_and_matches_act(tiny, tmp_path) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from digiq.stages.act import act

    model, processor, spec = tiny
    model = _train_a_little(model, processor, spec)
    out = save_policy(model, processor, tmp_path / "policy", spec)
    meta = json.loads((out / "digiq_policy.json").read_text())
    shot = _screens(4)[1]
    ours = act(
        *__import__("digiq.models.policy", fromlist=["load_policy"]).load_policy(out),
        shot,
        "Open the settings",
        Action.tap(0.5, 0.25).render(),
    )
    # plain transformers: the prompt from the JSON, greedy decoding
    hf = AutoModelForImageTextToText.from_pretrained(str(out)).eval()
    proc = AutoProcessor.from_pretrained(str(out))
    user = meta["user_template"].format(goal="Open the settings", previous="tap 0.50 0.25")
    prompt = meta["prompt_head"] + user + meta["prompt_tail"]
    enc = proc(images=[[shot]], text=[prompt], return_tensors="pt")
    gen = hf.generate(
        **enc,
        max_new_tokens=meta["max_new_tokens"],
        do_sample=False,
        pad_token_id=proc.tokenizer.pad_token_id,
        eos_token_id=proc.tokenizer.eos_token_id,
    )
    text = proc.tokenizer.decode(gen[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert text == ours["raw"]
    assert parse_policy_output(text, meta["action_format"]).render() == ours["action"]
    assert ours["valid"] and parse_action(ours["action"]) == Action.key(ActionType.PRESS_BACK)


def test_greedy_policy_fn_memoises_by_screen_and_prompt(tiny, tmp_path, monkeypatch) -> None:
    import digiq.models.policy as P

    model, processor, spec = tiny
    out = save_policy(model, processor, tmp_path / "policy", spec)
    fn = P.load_policy_fn(out, temperature=0.0)
    screens = _screens(4)
    batch = [{"screenshot": screens[i], "observation": OBS[i]} for i in range(4)]
    first = fn(batch)
    seen: list[int] = []
    real = P.generate_actions

    def counting(m, p, shots, *args, **kwargs):
        seen.append(len(shots))
        return real(m, p, shots, *args, **kwargs)

    monkeypatch.setattr(P, "generate_actions", counting)
    # the same inputs (new PIL objects, same pixels) come from the memo; only the new screen is generated
    again = [{"screenshot": s.copy(), "observation": o} for s, o in zip(screens, OBS)]
    new = {"screenshot": Image.new("RGB", (90, 160), (1, 2, 3)), "observation": OBS[0]}
    got = fn([*again, new])
    assert got[:4] == first and seen == [1]
    assert got[4] == real(model, processor, [new["screenshot"]], [OBS[0]], temperature=0.0, spec=spec)[0][0]
    # sampling is never memoised
    fs = P.load_policy_fn(out, temperature=1.0)
    fs(batch)
    seen.clear()
    fs(batch)
    assert seen == [4]


@pytest.mark.parametrize("family", ["llava", "qwen2-vl", "idefics3"])
def test_samples_share_one_prefill_per_state(family) -> None:
    """k samples per state run the prompt's prefill (its hundreds of image tokens included) once per state,
    where generate(num_return_sequences=k) runs it k times, and decode as generate does: at a vanishing
    temperature every sample is the greedy output."""
    import digiq.models.policy as P
    from digiq.models.vlm import build_tiny_vlm, decoder_layers

    model, processor = build_tiny_vlm(family)
    spec = PolicySpec(family=family, action_format="compact", max_new_tokens=6)
    shots = _screens(3)
    calls: list[tuple[int, int]] = []  # (rows, tokens) of every pass through the first decoder layer

    def record(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        calls.append((int(hidden.shape[0]), int(hidden.shape[1])))

    handle = decoder_layers(model.model)[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        greedy = generate_texts(model, processor, shots, OBS[:3], spec, temperature=0.0)
        prompt_len = calls[0][1]
        calls.clear()
        sampled = generate_texts(
            model, processor, shots, OBS[:3], spec, num_samples=4, temperature=1e-6, seed=0
        )
    finally:
        handle.remove()
    prefill_tokens = sum(r * t for r, t in calls if t > 1)
    # once per state (generate would run 4 * 3 * prompt_len): the custom loop prefills whole prompts, the
    # generate path (Qwen-VL) all but the last token, which generate then runs per sample
    per_state = prompt_len if P.fast_decoding_applies(model, family) else prompt_len - 1
    assert prefill_tokens == 3 * per_state
    assert sampled == [[g[0]] * 4 for g in greedy]
