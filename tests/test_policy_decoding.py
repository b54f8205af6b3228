"""The policy's custom KV-cached decoding loop (greedy = ``generate``; samples from the exact distribution,
seeded per block), the prompt prefill's LM head on one position, and the BC losses on target rows only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import digiq.models.policy as P
from digiq.actions import Action, ActionType, make_observation
from digiq.models.policy import (
    IGNORE_INDEX,
    PolicySpec,
    build_training_batch,
    masked_token_kl,
    policy_logits,
    token_logprobs,
    weighted_nll,
)

ROOT = Path(__file__).resolve().parents[1]
GUI_TINY = ROOT / "data" / "pretrained" / "gui-tiny"

OBS = [
    make_observation("Turn on wifi", None),
    make_observation("Open the settings", Action.tap(0.5, 0.25)),
    make_observation('Go to shopmart.com, search for "usb cable"', Action.type_text("usb cable")),
    make_observation("Turn off bluetooth", Action.key(ActionType.PRESS_HOME)),
]
TARGETS = ["tap 0.12 0.34", "back", "type usb cable", "swipe 0.75 0.50 0.35 0.50"]


def _screens(n: int) -> list[Image.Image]:
    return [Image.new("RGB", (90, 160), (40 * i % 255, 120, 200 - 30 * i % 200)) for i in range(n)]


@pytest.fixture(scope="module")
def gui_tiny():
    return P.load_policy(GUI_TINY, device="cpu")


def _hf_generate(model, processor, spec, shots, obs, k: int, temperature: float, seed: int, budget: int):
    enc = P.build_policy_inputs(processor, shots, obs, spec)
    tok = processor.tokenizer
    kw = dict(
        max_new_tokens=budget,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        num_return_sequences=k,
    )
    kw.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else kw.update(
        do_sample=False
    )
    torch.manual_seed(seed)
    out = model.generate(**enc, **kw)
    return P._texts(processor, out[:, enc["input_ids"].shape[1] :], spec)


# --------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llava", "idefics3"])
def test_greedy_decoding_equals_generate_without_calling_it(family, monkeypatch) -> None:
    from digiq.models.vlm import build_tiny_vlm

    model, processor = build_tiny_vlm(family, seed=0)
    model.eval()
    spec = PolicySpec(family=family, max_new_tokens=10)
    shots = _screens(4)
    ref = _hf_generate(model, processor, spec, shots, OBS, 1, 0.0, 0, spec.max_new_tokens)
    assert P.fast_decoding_applies(model, family)

    def refuse(*a, **k):
        raise AssertionError("generate called")

    monkeypatch.setattr(type(model), "generate", refuse)
    got = P.generate_texts(model, processor, shots, OBS, spec, temperature=0.0)
    assert [g[0] for g in got] == ref


def test_greedy_decoding_of_the_shipped_policy_equals_generate(gui_tiny) -> None:
    # A trained model: actions of different lengths end at different steps (rows leave the tree).
    model, processor, spec = gui_tiny
    shots = _screens(4)
    ref = _hf_generate(model, processor, spec, shots, OBS, 1, 0.0, 0, spec.max_new_tokens)
    got = P.generate_texts(model, processor, shots, OBS, spec, temperature=0.0)
    assert [g[0] for g in got] == ref
    assert len({len(r) for r in ref}) > 1, ref


def test_families_outside_the_loop_keep_generate(monkeypatch) -> None:
    from digiq.models.vlm import build_tiny_vlm

    for family in ("qwen2-vl", "paligemma"):
        model, _ = build_tiny_vlm(family, seed=0)
        assert not P.fast_decoding_applies(model, family)
    model, _ = build_tiny_vlm("llava", seed=0)
    monkeypatch.setattr(model.generation_config, "repetition_penalty", 1.1)
    assert not P.fast_decoding_applies(model, "llava")


def _exact_next(model, enc: dict, prefix: list[int], temperature: float) -> torch.Tensor:
    """p(next token | prompt, prefix) at ``temperature``, from one plain forward pass (no cache)."""
    ids = torch.cat([enc["input_ids"], torch.tensor([prefix], dtype=torch.long)], dim=1)
    mask = torch.ones_like(ids)
    extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, **extra).logits[0, -1].double()
    return torch.softmax(logits / temperature, -1)


def _chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson's test of counts against probs; cells expecting < 5 are pooled into one."""
    n = counts.sum()
    exp = probs / probs.sum() * n
    big = exp >= 5
    obs_c = np.append(counts[big], counts[~big].sum())
    exp_c = np.append(exp[big], exp[~big].sum())
    if exp_c[-1] < 5:  # merge the pooled tail into the smallest cell
        obs_c, exp_c = obs_c[:-1], exp_c[:-1]
        obs_c[-1] += counts[~big].sum()
        exp_c[-1] += exp[~big].sum()
    stat = float(((obs_c - exp_c) ** 2 / exp_c).sum())
    dof = len(obs_c) - 1  # chi-square survival function = regularised upper incomplete gamma
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2)))


def test_samples_follow_the_models_distribution(gui_tiny) -> None:
    """4,000 samples of one state at T = 1.2: the first token against softmax(logits / T) of a plain forward
    pass, and the second token given the most frequent first one (a path through the prefix tree) against
    its exact conditional. A sampler that ignored the temperature, or drew from another row's distribution,
    fails these tests by hundreds of standard deviations."""
    model, processor, spec = gui_tiny
    shots, obs = _screens(1), [OBS[1]]
    T, n = 1.2, 4000
    enc = P.build_policy_inputs(processor, shots, obs, spec)
    pre = P.prefill_prompts(model, enc)
    tok = processor.tokenizer
    torch.manual_seed(11)
    out = P.decode_from_prefill(model, pre, torch.zeros(n, dtype=torch.long), T, 2, tok.eos_token_id, 0)
    V = pre.logits.shape[-1]
    p1 = _exact_next(model, enc, [], T).numpy()
    c1 = np.bincount(out[:, 0].numpy(), minlength=V)
    assert _chi2_pvalue(c1, p1) > 1e-3
    # the same test would reject the distribution at T = 1
    assert _chi2_pvalue(c1, _exact_next(model, enc, [], 1.0).numpy()) < 1e-6
    first = int(np.argmax(c1))
    assert first != tok.eos_token_id
    second = out[out[:, 0] == first, 1].numpy()
    p2 = _exact_next(model, enc, [first], T).numpy()
    assert _chi2_pvalue(np.bincount(second, minlength=V), p2) > 1e-3


def test_block_seeds_equal_separate_seeded_calls(gui_tiny) -> None:
    model, processor, spec = gui_tiny
    shots = _screens(4)
    pre = P.prefill_policy(model, processor, shots, OBS, spec)
    rows_a, rows_b = [0, 0, 0, 1, 1, 1], [2, 2, 3, 3, 3]
    alone_a = P.sample_actions(model, processor, pre, rows_a, spec, 1.2, seed=5)
    alone_b = P.sample_actions(model, processor, pre, rows_b, spec, 1.2, seed=9)
    together = P.sample_actions(
        model, processor, pre, rows_a + rows_b, spec, 1.2, block_seeds=[(5, len(rows_a)), (9, len(rows_b))]
    )
    assert together == alone_a + alone_b
    # and generate_actions on the same states with the same seed draws the same actions
    via_generate = P.generate_actions(model, processor, shots[:2], OBS[:2], 3, 1.2, seed=5, spec=spec)
    assert [a for row in via_generate for a in row] == alone_a
    assert len(set(together)) > 3


def test_candidates_reuse_the_prefill_and_do_not_depend_on_batches_per_call(gui_tiny, tmp_path) -> None:
    """The stage's candidates are what seeded generate_actions calls give (first draw, then re-draws of
    the invalid ones per (seed, batch, attempt)), whatever the number of seeded batches per call."""
    from accelerate import Accelerator

    from digiq.actions import parse_action
    from digiq.data.schema import load_dataset
    from digiq.stages import candidates, collect

    collect.run(_collect_cfg(collect, tmp_path / "sim"))
    ds = load_dataset(tmp_path / "sim").select(range(5))
    acc = Accelerator(cpu=True)
    base = dict(
        dataset=str(tmp_path / "sim"),
        output_dir=str(tmp_path / "c"),
        policy=str(GUI_TINY),
        num_candidates=4,
        batch_size=2,
        max_resamples=2,
        device="cpu",
        seed=3,
    )
    got = {}
    for per_call in (1, 2, 3):
        got[per_call], _ = candidates.policy_candidates(
            ds, candidates.Config(**base, batches_per_call=per_call), acc
        )
    assert got[1] == got[2] == got[3]
    # the reference: the old stage loop on generate_actions (which now decodes with the same loop)
    model, processor, spec = gui_tiny
    shots, obs, acts = ds["screenshot"], ds["observation"], ds["action"]
    ref = []
    for b, start in enumerate(range(0, 5, 2)):
        rows = list(range(start, min(5, start + 2)))
        sh, ob = [shots[i] for i in rows], [obs[i] for i in rows]
        s = P.generate_actions(model, processor, sh, ob, 3, 1.2, seed=candidates._seed(3, b, 0), spec=spec)
        for attempt in (1, 2):
            bad = [(i, j) for i in range(len(rows)) for j in range(3) if not parse_action(s[i][j]).is_valid]
            if not bad:
                break
            redo = P.generate_actions(
                model,
                processor,
                [sh[i] for i, _ in bad],
                [ob[i] for i, _ in bad],
                1,
                1.2,
                seed=candidates._seed(3, b, attempt),
                spec=spec,
            )
            for (i, j), r in zip(bad, redo):
                s[i][j] = r[0]
        ref.extend([acts[r], *s[i]] for i, r in enumerate(rows))
    assert got[1] == ref


def _collect_cfg(collect, out: Path):
    from digiq.config import load_config

    return load_config(
        collect.Config,
        None,
        [f"output_dir={out}", "num_trajectories=3", "seed=0", "sim.width=90", "sim.height=160"],
    )


# --------------------------------------------------------------------------------------------------
# The prefill keeps one position's logits
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llava", "idefics3", "qwen2-vl"])
def test_prefill_runs_the_lm_head_on_one_position(family) -> None:
    from digiq.models.vlm import build_tiny_vlm

    model, processor = build_tiny_vlm(family, seed=0)
    model.eval()
    spec = PolicySpec(family=family, max_new_tokens=5)
    shots = _screens(3)
    seen: list[tuple[int, ...]] = []
    handle = model.lm_head.register_forward_pre_hook(lambda _m, a: seen.append(tuple(a[0].shape)))
    try:
        sampled = P.generate_texts(
            model, processor, shots, OBS[:3], spec, num_samples=2, temperature=1e-6, seed=0
        )
    finally:
        handle.remove()
    enc = P.build_policy_inputs(processor, shots, OBS[:3], spec)
    L = enc["input_ids"].shape[1]
    assert L > 8
    assert all(s[1] == 1 for s in seen), seen  # the prefill included: never L (or L - 1) positions
    greedy = P.generate_texts(model, processor, shots, OBS[:3], spec, temperature=0.0)
    assert sampled == [[g[0]] * 2 for g in greedy]


# --------------------------------------------------------------------------------------------------
# Losses on target rows only
# --------------------------------------------------------------------------------------------------


def _old_token_logprobs(logits, labels):
    lg, lb = logits[:, :-1, :], labels[:, 1:]
    mask = lb != IGNORE_INDEX
    lp = torch.log_softmax(lg.float(), dim=-1).gather(-1, lb.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return lp * mask, mask


def _old_kl(logits_p, logits_q, labels):
    lp, lb = logits_p[:, :-1, :], labels[:, 1:]
    lq = logits_q[:, :-1, :]
    mask = (lb != IGNORE_INDEX).float()
    logp, logq = torch.log_softmax(lp.float(), -1), torch.log_softmax(lq.float(), -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    return (kl * mask).sum() / mask.sum().clamp_min(1.0)


def _labels(B: int, T: int, V: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    labels = torch.full((B, T), IGNORE_INDEX)
    for i in range(B):
        start = int(torch.randint(T // 2, T - 3, (1,), generator=g))
        n = int(torch.randint(1, T - start, (1,), generator=g))
        labels[i, start : start + n] = torch.randint(0, V, (n,), generator=g)
    return labels


def test_losses_equal_the_full_computation() -> None:
    torch.manual_seed(0)
    B, T, V = 4, 30, 97
    logits = torch.randn(B, T, V, requires_grad=True)
    other = torch.randn(B, T, V)
    labels = _labels(B, T, V)
    w = torch.tensor([1.0, 0.5, 0.0, 2.0])
    lp, mask = token_logprobs(logits, labels)
    lp_old, mask_old = _old_token_logprobs(logits, labels)
    assert torch.equal(mask, mask_old)
    assert torch.allclose(lp, lp_old, atol=1e-6)
    new = weighted_nll(logits, labels, w)
    (g_new,) = torch.autograd.grad(new, logits)
    lp_o, m_o = _old_token_logprobs(logits, labels)
    ww = m_o.float() * w.unsqueeze(1)
    old = -(lp_o * ww).sum() / ww.sum()
    (g_old,) = torch.autograd.grad(old, logits)
    assert torch.allclose(new, old, atol=1e-6) and torch.allclose(g_new, g_old, atol=1e-6)
    assert torch.allclose(masked_token_kl(logits, other, labels), _old_kl(logits, other, labels), atol=1e-6)
    none = torch.full_like(labels, IGNORE_INDEX)
    assert (
        float(masked_token_kl(logits, other, none)) == 0.0
        and float(token_logprobs(logits.detach(), none)[0].sum()) == 0
    )


def test_losses_normalise_only_target_rows(monkeypatch) -> None:
    """The float32 normaliser sees (#target tokens, V), not (B, T - 1, V)."""
    B, T, V = 4, 30, 97
    logits, other, labels = torch.randn(B, T, V), torch.randn(B, T, V), _labels(B, T, V)
    n_targets = int((labels[:, 1:] != IGNORE_INDEX).sum())
    shapes: list[tuple[int, ...]] = []
    for name in ("log_softmax", "logsumexp"):
        real = getattr(torch, name)

        def spy(x, *a, _real=real, **k):
            shapes.append(tuple(x.shape))
            return _real(x, *a, **k)

        monkeypatch.setattr(torch, name, spy)
    weighted_nll(logits, labels)
    masked_token_kl(logits, other, labels)
    assert shapes and all(s == (n_targets, V) for s in shapes), (shapes, n_targets)


def test_label_logits_runs_the_lm_head_on_the_target_span() -> None:
    from digiq.models.vlm import build_tiny_vlm

    model, processor = build_tiny_vlm("idefics3", seed=0)
    spec = PolicySpec(family="idefics3")
    batch = build_training_batch(processor, _screens(4), OBS, TARGETS, spec)
    seen: list[tuple[int, ...]] = []
    handle = model.lm_head.register_forward_pre_hook(lambda _m, a: seen.append(tuple(a[0].shape)))
    try:
        logits, labels = P.label_logits(model, batch)
        loss = weighted_nll(logits, labels)
        (g_new,) = torch.autograd.grad(loss, model.lm_head.weight)
    finally:
        handle.remove()
    T = batch["input_ids"].shape[1]
    span = logits.shape[1]
    assert seen == [(4, span, model.lm_head.in_features)] and span < T / 2, (seen, T)
    full = policy_logits(model, batch)
    ref = weighted_nll(full, batch["labels"])
    (g_ref,) = torch.autograd.grad(ref, model.lm_head.weight)
    assert torch.allclose(loss, ref, atol=1e-6) and torch.allclose(g_new, g_ref, atol=1e-6)
    assert float(masked_token_kl(logits, logits.detach() + 0.1 * torch.randn_like(logits), labels)) > 0
