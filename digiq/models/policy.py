"""The generative VLM policy: prompt, action text formats, batched generation, log-probs, Best-of-N, export.

A policy maps (screenshot, AutoUI observation) to an action. It is any ``AutoModelForImageTextToText`` plus
its processor (loaded through :mod:`digiq.models.vlm`); pi_beta comes from ``digiq train-bc`` and the
improved policy from ``digiq extract-policy``. Externally every action is an **AutoUI string**
(:func:`digiq.actions.parse_action` reads it); internally the model may be trained on a shorter text:

* ``autoui``: the full AutoUI string (``Action Plan: [...] ; Action Decision: ...``), the official format;
* ``decision``: only the ``"action_type": ...`` part (AutoUI without the plan, ~20% fewer tokens);
* ``compact``: ``tap 0.79 0.68`` / ``swipe y x y x`` / ``type usb cable`` / ``back`` / ``home`` / ``enter``
  / ``complete`` / ``impossible``: 5-10 tokens instead of 45-56 with the tiny offline BPE, which makes
  behaviour cloning and generation 5x cheaper on a CPU (the simulated-device default).

Coordinates are written with ``precision`` decimals (2 is enough for the simulator's widgets). The
export (:func:`save_policy`) is a plain ``save_pretrained`` folder plus ``digiq_policy.json`` describing
the prompt template, the action format and the generation settings, so the model can be used with plain
``transformers`` (tests/test_policy.py does exactly that).

Best-of-N selection (:func:`best_of_n`) follows the official actor (DigiRL-agent/digiq @ 8181379,
``digiq/algorithms/digiq/trainer.py:235-326``): A = Q - V per candidate, invalid candidates get A = 0, argmax,
clamp A to [0, 1], keep the state when A > threshold.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from digiq.actions import Action, ActionType, goal_from_observation, parse_action
from digiq.config import ModelConfig
from digiq.errors import DigiqError
from digiq.models.families import FAMILIES
from digiq.models.prompts import TEMPLATES, family_name, previous_action_from_observation, processor_call
from digiq.models.vlm import inference_device, inference_dtype, is_peft, load_vlm, save_vlm, unwrap
from digiq.utils.io import atomic_write_json, staged_dir

POLICY_FILE = "digiq_policy.json"
POLICY_FORMAT = "digiq-policy-v1"
ActionFormat = Literal["autoui", "decision", "compact"]
ACTION_FORMATS = ("autoui", "decision", "compact")
IGNORE_INDEX = -100
# The user text of the policy prompt; kept short (every token is paid for at every training step).
USER_TEMPLATE = "Goal: {goal}\nPrevious: {previous}\nAction:"


@dataclasses.dataclass
class PolicySpec:
    """How a policy model is prompted and decoded (stored as ``digiq_policy.json`` in an export)."""

    # VLM family (selects the chat template), e.g. llava, idefics3, qwen2-vl.
    family: str = "llava"
    # Text the model emits for an action: autoui | decision | compact (see the module docstring).
    action_format: ActionFormat = "compact"
    # Decimals of tap / swipe coordinates in the emitted text.
    precision: int = 2
    # Sampling at act/evaluate time; False = greedy (deterministic).
    do_sample: bool = False
    temperature: float = 1.0
    max_new_tokens: int = 24

    def to_json(self) -> dict[str, Any]:
        head, tail, answer = TEMPLATES[self.family]
        return {
            "format": POLICY_FORMAT,
            **dataclasses.asdict(self),
            # Everything a plain-transformers user needs to rebuild the prompt:
            # prompt = prompt_head + user_template.format(goal=..., previous=...) + prompt_tail
            "prompt_head": head,
            "user_template": USER_TEMPLATE,
            "prompt_tail": tail,
            "answer_prefix": answer,
            "previous_none": "none",
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PolicySpec:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# --------------------------------------------------------------------------------------------------
# Action text formats
# --------------------------------------------------------------------------------------------------

_COMPACT_KEYS = {
    ActionType.PRESS_BACK: "back",
    ActionType.PRESS_HOME: "home",
    ActionType.PRESS_ENTER: "enter",
    ActionType.STATUS_TASK_COMPLETE: "complete",
    ActionType.STATUS_TASK_IMPOSSIBLE: "impossible",
}
_COMPACT_NAMES = {v: k for k, v in _COMPACT_KEYS.items()}
_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)"
_COMPACT_TAP = re.compile(rf"^tap\s+({_NUM})\s+({_NUM})$")
_COMPACT_SWIPE = re.compile(rf"^swipe\s+({_NUM})\s+({_NUM})\s+({_NUM})\s+({_NUM})$")


def _as_action(action: Action | str | None) -> Action | None:
    if action is None or isinstance(action, Action):
        return action
    if action.strip() == "":
        return None
    return parse_action(action)


def format_action(action: Action | str, fmt: ActionFormat = "compact", precision: int = 2) -> str:
    """The text a policy of format ``fmt`` emits for ``action`` (an INVALID action keeps its raw text)."""
    a = _as_action(action) or Action.invalid("", "empty action")
    if not a.is_valid:
        return a.raw
    if fmt == "autoui":
        return a.render(precision=precision)
    if fmt == "decision":
        return a.render_decision(precision)
    if fmt != "compact":
        raise ValueError(f"unknown action format {fmt!r}; use one of {ACTION_FORMATS}")
    if a.type is ActionType.DUAL_POINT and a.touch is not None and a.lift is not None:
        if a.is_tap:
            return f"tap {a.touch[0]:.{precision}f} {a.touch[1]:.{precision}f}"
        t, lf = a.touch, a.lift
        return f"swipe {t[0]:.{precision}f} {t[1]:.{precision}f} {lf[0]:.{precision}f} {lf[1]:.{precision}f}"
    if a.type is ActionType.TYPE:
        return f"type {a.text}"
    return _COMPACT_KEYS[a.type]


def parse_policy_output(text: str, fmt: ActionFormat = "compact") -> Action:
    """Parse generated text of format ``fmt`` into an :class:`Action` (never raises; INVALID on junk)."""
    if fmt in ("autoui", "decision"):
        return parse_action(text)
    raw = text
    s = text.strip()
    for eos in ("</s>", "<|im_end|>", "<end_of_utterance>", "<eos>"):
        s = s.split(eos, 1)[0].strip()
    if s.lower() in _COMPACT_NAMES:
        return Action.key(_COMPACT_NAMES[s.lower()])
    if s.startswith("type "):
        return Action.type_text(s[5:])
    m = _COMPACT_TAP.match(s)
    if m:
        y, x = float(m.group(1)), float(m.group(2))
        if 0 <= y <= 1 and 0 <= x <= 1:
            return Action.tap(y, x)
        return Action.invalid(raw, "tap point outside [0, 1]")
    m = _COMPACT_SWIPE.match(s)
    if m:
        v = [float(g) for g in m.groups()]
        if all(0 <= c <= 1 for c in v):
            return Action.swipe((v[0], v[1]), (v[2], v[3]))
        return Action.invalid(raw, "swipe point outside [0, 1]")
    # Fall back to the AutoUI grammar: a compact policy that emits AutoUI text still acts.
    a = parse_action(s)
    return a if a.is_valid else Action.invalid(raw, f"not a {fmt} action")


def to_autoui(text: str, fmt: ActionFormat = "compact") -> str:
    """Generated text -> the AutoUI string the rest of digiq uses (raw text when it does not parse)."""
    a = parse_policy_output(text, fmt)
    return a.render() if a.is_valid else text


# --------------------------------------------------------------------------------------------------
# Prompts and model inputs
# --------------------------------------------------------------------------------------------------


def policy_user_text(observation: str, spec: PolicySpec) -> str:
    """The user text for an AutoUI observation ``Previous Actions: <a> Goal: <g></s>``."""
    goal = goal_from_observation(observation)
    prev = _as_action(previous_action_from_observation(observation))
    previous = "none" if prev is None else format_action(prev, spec.action_format, spec.precision)
    return USER_TEMPLATE.format(goal=goal, previous=previous)


def policy_prompt(observation: str, spec: PolicySpec) -> str:
    """The full prompt text (the processor expands the family's image placeholder)."""
    head, tail, _ = TEMPLATES[spec.family]
    return head + policy_user_text(observation, spec) + tail


def chat_inputs(
    processor: Any, screenshots: Sequence[Image.Image], user_texts: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Left-padded prompt batch of any user texts in the processor's chat template (one image each)."""
    head, tail, _ = TEMPLATES[family_name(processor)]
    texts = [head + u + tail for u in user_texts]
    return processor_call(processor, [s.convert("RGB") for s in screenshots], texts)


def build_policy_inputs(
    processor: Any, screenshots: Sequence[Image.Image], observations: Sequence[str], spec: PolicySpec
) -> dict[str, torch.Tensor]:
    """Left-padded prompt batch for generation."""
    texts = [policy_prompt(o, spec) for o in observations]
    return processor_call(processor, [s.convert("RGB") for s in screenshots], texts)


def target_ids(processor: Any, target: str, spec: PolicySpec | None = None) -> list[int]:
    """Token ids of one target text: answer prefix + text + EOS (tokenised without the prompt)."""
    tok = processor.tokenizer
    family = spec.family if spec is not None else family_name(processor)
    ids = tok(TEMPLATES[family][2] + target, add_special_tokens=False)["input_ids"]
    return [*ids, tok.eos_token_id]


def build_training_batch(
    processor: Any,
    screenshots: Sequence[Image.Image],
    observations: Sequence[str],
    targets: Sequence[str],
    spec: PolicySpec,
) -> dict[str, torch.Tensor]:
    """Prompt + target tokens, **right**-padded, with ``labels`` = -100 outside the target.

    The prompt goes through the processor (image tokens, pixel values) and the target is tokenised on its
    own and appended after each row's last real prompt token, so the target tokens are identical to what
    the model must produce after the generation prompt (no BPE merges across the boundary). Right padding
    keeps position ids = 0..n-1 for the real tokens, as ``generate`` computes them for left-padded prompts.
    """
    enc = build_policy_inputs(processor, screenshots, observations, spec)
    return _append_targets(processor, enc, [target_ids(processor, t, spec) for t in targets])


def build_chat_training_batch(
    processor: Any, screenshots: Sequence[Image.Image], user_texts: Sequence[str], answers: Sequence[str]
) -> dict[str, torch.Tensor]:
    """:func:`build_training_batch` for any (image, user text) -> answer pairs (``digiq pretrain-vlm``)."""
    enc = chat_inputs(processor, screenshots, user_texts)
    return _append_targets(processor, enc, [target_ids(processor, a) for a in answers])


def _append_targets(
    processor: Any, enc: dict[str, torch.Tensor], target_lists: Sequence[list[int]]
) -> dict[str, torch.Tensor]:
    ids, mask = enc["input_ids"], enc["attention_mask"].bool()
    B, L = ids.shape
    tails = [torch.tensor(t, dtype=ids.dtype) for t in target_lists]
    lengths = [int(mask[i].sum()) + len(tails[i]) for i in range(B)]
    T = max(lengths)
    pad_id = processor.tokenizer.pad_token_id
    out_ids = torch.full((B, T), pad_id, dtype=ids.dtype)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=enc["attention_mask"].dtype)
    # Other per-token tensors (Qwen's mm_token_type_ids, PaliGemma's token_type_ids): 0 for text tokens.
    extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask") and _per_token(v, B, L)}
    extra_out = {k: torch.zeros((B, T), dtype=v.dtype) for k, v in extra.items()}
    for i in range(B):
        prompt = ids[i][mask[i]]
        n, m = len(prompt), len(tails[i])
        out_ids[i, :n] = prompt
        out_ids[i, n : n + m] = tails[i]
        labels[i, n : n + m] = tails[i]
        attn[i, : n + m] = 1
        for k, v in extra.items():
            extra_out[k][i, :n] = v[i][mask[i]]
    batch = {k: v for k, v in enc.items() if k not in extra and k not in ("input_ids", "attention_mask")}
    batch.update(extra_out)
    batch.update(input_ids=out_ids, attention_mask=attn, labels=labels)
    return batch


def _per_token(v: Any, B: int, L: int) -> bool:
    return isinstance(v, torch.Tensor) and v.dim() == 2 and tuple(v.shape) == (B, L)


# Keys of an encoded row that are per-token (right-padded by collate_encoded) and their pad values; any other
# 2-D (1, T) tensor of a row (Qwen's mm_token_type_ids, PaliGemma's token_type_ids) pads with 0.
_PAD_VALUES = {"labels": IGNORE_INDEX, "attention_mask": 0}


def encode_row(
    processor: Any, screenshot: Image.Image, observation: str, target: str, spec: PolicySpec
) -> dict[str, torch.Tensor]:
    """One training row as tensors (batch dim 1, no padding): the unit :func:`collate_encoded` batches.

    Training encodes every row ONCE (decode + image processor + tokeniser cost ~10-20% of a CPU step with the
    tiny policies, and is paid again every epoch otherwise) and then trains by index.
    """
    return build_training_batch(processor, [screenshot], [observation], [target], spec)


def collate_encoded(rows: Sequence[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Batch rows of :func:`encode_row`: per-token tensors right-padded (as build_training_batch pads),
    image tensors concatenated along dim 0 (works for (B, ...) pixel tensors and Qwen's (patches, dim) +
    (images, 3) grid alike). Equal to ``build_training_batch`` on the same rows (tests/test_policy.py)."""
    T = max(int(r["input_ids"].shape[1]) for r in rows)
    out: dict[str, torch.Tensor] = {}
    for k, v0 in rows[0].items():
        if _per_token(v0, 1, int(rows[0]["input_ids"].shape[1])):
            pad = pad_id if k == "input_ids" else _PAD_VALUES.get(k, 0)
            t = torch.full((len(rows), T), pad, dtype=v0.dtype)
            for i, r in enumerate(rows):
                t[i, : r[k].shape[1]] = r[k][0]
            out[k] = t
        else:
            out[k] = torch.cat([r[k] for r in rows], dim=0)
    return out


# --------------------------------------------------------------------------------------------------
# Losses and log-probs (pure functions on logits)
# --------------------------------------------------------------------------------------------------


def shift_logits_labels(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token alignment: logits[:, t] predicts labels[:, t + 1]."""
    return logits[:, :-1, :], labels[:, 1:]


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log p of the label tokens (B, T-1) and the mask of target positions (B, T-1).

    Only the target positions are normalised: their logit rows are gathered first (in the logits' dtype) and
    cast to float32 there, so the float32 intermediates are (#target tokens, V) instead of (B, T-1, V).
    """
    lg, lb = shift_logits_labels(logits, labels)
    mask = lb != IGNORE_INDEX
    rows = lg[mask].float()  # (N, V)
    picked = rows.gather(-1, lb[mask].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(rows, dim=-1)
    lp = torch.zeros(mask.shape, dtype=picked.dtype, device=picked.device).masked_scatter(mask, picked)
    return lp, mask


def weighted_nll(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy on target tokens, mean over the (weighted) target tokens of the batch.

    The official actor loss is ``-mean_batch(w * sum_tokens log clamp(p, 0.001, 0.99))`` (DigiRL-agent/digiq @
    8181379, ``digiq/algorithms/digiq/trainer.py:308-311``). We average over target tokens instead of summing
    per sequence (only a scale for sequences of similar length) and do not clamp p: the clamp removes the
    gradient of every token the model already predicts with p > 0.99.
    """
    lp, mask = token_logprobs(logits, labels)
    w = mask.float()
    if weights is not None:
        if weights.shape != (logits.shape[0],):
            raise ValueError(f"weights must be (B,) = ({logits.shape[0]},), got {tuple(weights.shape)}")
        w = w * weights.to(w.dtype).unsqueeze(1)
    return -(lp * w).sum() / w.sum().clamp_min(1e-8)


def masked_token_kl(logits_p: torch.Tensor, logits_q: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over target tokens of KL(p || q) between the full next-token distributions (p = policy).

    As :func:`token_logprobs`, only the target positions' rows are gathered and normalised in float32.
    """
    lp, lb = shift_logits_labels(logits_p, labels)
    lq, _ = shift_logits_labels(logits_q, labels)
    mask = lb != IGNORE_INDEX
    logp = torch.log_softmax(lp[mask].float(), -1)
    logq = torch.log_softmax(lq[mask].float(), -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    return kl.sum() / mask.sum().clamp_min(1)


def policy_logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits (B, T, V) of every position of a training batch (teacher forcing, no cache)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return model(**inputs, use_cache=False).logits


def label_span(labels: torch.Tensor) -> tuple[int, int]:
    """``(lo, hi)``: positions ``lo .. hi - 1`` hold every target token of the batch and the position before
    each (whose logits predict it); ``(0, 0)`` when the batch has no target token."""
    where = (labels != IGNORE_INDEX).any(0).nonzero()
    if where.numel() == 0:
        return 0, 0
    return max(int(where[0]) - 1, 0), int(where[-1]) + 1


def label_logits(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, labels)`` cut to the batch's target span (:func:`label_span`): the losses of this module
    on them equal the losses on ``policy_logits(model, batch)`` and ``batch["labels"]``.

    The LM head runs on the span only (``logits_to_keep`` with the span's positions), so the logits are
    (B, span, V) instead of (B, T, V): the prompt, image tokens included, is most of T. Models whose forward
    does not take ``logits_to_keep`` compute every position and the span is cut from them.
    """
    labels = batch["labels"]
    lo, hi = label_span(labels)
    if hi == 0:  # no target token: any position will do, the losses are 0
        lo, hi = 0, 1
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    base = unwrap(model)
    if "logits_to_keep" in inspect.signature(base.forward).parameters:
        keep = torch.arange(lo, hi, device=labels.device)
        logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
    else:
        logits = model(**inputs, use_cache=False).logits[:, lo:hi]
    return logits, labels[:, lo:hi]


@torch.no_grad()
def sequence_logprobs(
    model: Any,
    processor: Any,
    screenshots: Sequence[Image.Image],
    observations: Sequence[str],
    actions: Sequence[Action | str],
    spec: PolicySpec,
) -> torch.Tensor:
    """log pi(a | s) summed over the action's tokens (incl. EOS), shape (B,)."""
    targets = [format_action(a, spec.action_format, spec.precision) for a in actions]
    batch = build_training_batch(processor, screenshots, observations, targets, spec)
    batch = {k: v.to(_device(model)) for k, v in batch.items()}
    lp, _ = token_logprobs(policy_logits(model, batch), batch["labels"])
    return lp.sum(-1).cpu()


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate_texts(
    model: Any,
    processor: Any,
    screenshots: Sequence[Image.Image],
    observations: Sequence[str],
    spec: PolicySpec,
    num_samples: int = 1,
    temperature: float | None = None,
    max_new_tokens: int | None = None,
    seed: int | None = None,
    user_texts: Sequence[str] | None = None,
) -> list[list[str]]:
    """Raw generated texts (B lists of ``num_samples``); KV-cached decoding.

    ``user_texts`` replaces the policy prompt built from ``observations`` by these user texts in the chat
    template (``digiq pretrain-vlm`` asks its questions this way).

    ``temperature``: None = the spec's setting, 0 = greedy, > 0 = ancestral sampling at that temperature
    (no top-k / top-p, as the official candidate sampler). ``seed`` makes sampling reproducible without
    touching the caller's RNG stream.

    Families where :func:`fast_decoding_applies` decode with :func:`decode_from_prefill`, a fraction of
    ``generate``'s time on small models: greedy gives ``generate``'s tokens, sampling draws from the same
    distribution but not the same seeded stream. The other families decode with ``generate``.
    """
    if temperature is None:  # the export's own setting
        temperature = spec.temperature if spec.do_sample else 0.0
    if temperature <= 0 and num_samples > 1:
        raise ValueError("num_samples > 1 needs sampling (temperature > 0)")
    if user_texts is not None:
        enc = chat_inputs(processor, screenshots, user_texts)
    else:
        enc = build_policy_inputs(processor, screenshots, observations, spec)
    enc = {k: v.to(_device(model)) for k, v in enc.items()}
    budget = max_new_tokens or spec.max_new_tokens
    if fast_decoding_applies(model, spec.family):
        with _eval_mode(model):
            pre = prefill_prompts(model, enc)
        rows = torch.arange(len(screenshots)).repeat_interleave(num_samples)
        texts = decode_texts(model, processor, pre, rows, spec, temperature, budget, seed)
    else:
        texts = _generate_texts_hf(model, processor, enc, spec, num_samples, temperature, budget, seed)
    return [texts[i * num_samples : (i + 1) * num_samples] for i in range(len(screenshots))]


def _generate_texts_hf(
    model: Any,
    processor: Any,
    enc: dict[str, torch.Tensor],
    spec: PolicySpec,
    num_samples: int,
    temperature: float,
    max_new_tokens: int,
    seed: int | None,
) -> list[str]:
    """``model.generate`` (the path of the families the custom decoding loop does not cover)."""
    tok = processor.tokenizer
    kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        use_cache=True,
        num_return_sequences=num_samples,
    )
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0)
    else:
        kwargs.update(do_sample=False)
    with _eval_mode(model), _seeded(model, seed):
        if num_samples > 1 and FAMILIES[spec.family].prefix_sharing:
            out = _generate_from_one_prefill(model, enc, num_samples, FAMILIES[spec.family].mrope, kwargs)
        else:
            out = model.generate(**enc, **kwargs)
    return _texts(processor, out[:, enc["input_ids"].shape[1] :], spec)


def _texts(processor: Any, new_tokens: torch.Tensor, spec: PolicySpec) -> list[str]:
    texts = processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    answer = TEMPLATES[spec.family][2]
    texts = [t[len(answer) :] if answer and t.startswith(answer) else t for t in texts]
    return [t.strip() for t in texts]


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


@contextlib.contextmanager
def _seeded(model: Any, seed: int | None) -> Iterator[None]:
    """Seed the global RNG for the block (what ``generate`` samples from) and restore the caller's stream."""
    if seed is None:
        yield
        return
    dev = _device(model)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------------------------------
# Custom KV-cached decoding (prefix-sharing families with standard 1-D positions)
# --------------------------------------------------------------------------------------------------

# GenerationConfig fields that make ``generate`` add a logits processor (repetition penalty, forced or
# suppressed tokens, ...) with their no-op values. The custom loop applies only temperature, so a model whose
# generation config sets any of these decodes with ``generate`` instead.
_NOOP_PROCESSING: dict[str, tuple[Any, ...]] = {
    "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "sequence_bias": (None,),
    "exponential_decay_length_penalty": (None,),
    "renormalize_logits": (None, False),
    "guidance_scale": (None, 1.0),
    "watermarking_config": (None,),
    "min_p": (None,),
    "typical_p": (None, 1.0),
    "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0),
    "top_h": (None,),
    "token_healing": (None, False),
}


def fast_decoding_applies(model: Any, family: str) -> bool:
    """Whether :func:`decode_from_prefill` reproduces ``generate`` for this model.

    It needs a causal prompt whose KV cache can be copied per sample (``prefix_sharing``), positions that
    ``attention_mask.cumsum - 1`` gives (not Qwen-VL's M-RoPE, whose decoding offsets the model keeps itself),
    a forward that takes ``logits_to_keep``, and a generation config that adds no logits processor.
    """
    fam = FAMILIES[family]
    base = unwrap(model)
    if not fam.prefix_sharing or fam.mrope:
        return False
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return False
    # The prompt's cache is copied layer by layer as plain (keys, values): no sliding-window layers.
    text = base.config.get_text_config(decoder=True)
    layer_types = getattr(text, "layer_types", None) or ()
    if getattr(text, "sliding_window", None) or any(t != "full_attention" for t in layer_types):
        return False
    gc = getattr(base, "generation_config", None)
    return gc is None or all(getattr(gc, k, None) in ok for k, ok in _NOOP_PROCESSING.items())


@dataclasses.dataclass
class PromptPrefill:
    """A batch of left-padded prompts run once: per decoder layer the (keys, values) of every prompt token,
    the next-token logits after the prompt (float32), the attention mask and the last prompt position."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    logits: torch.Tensor  # (B, V)
    attention_mask: torch.Tensor  # (B, L)
    last_position: torch.Tensor  # (B,)


@torch.no_grad()
def prefill_prompts(model: Any, enc: dict[str, torch.Tensor]) -> PromptPrefill:
    """Run the prompts (images included) once, keeping only the KV cache and the last position's logits.

    Positions are the ones ``generate`` gives left-padded prompts (``attention_mask.cumsum - 1``, 0 on the
    padding); ``logits_to_keep=1`` applies the LM head to the last position only, as ``generate`` does.
    """
    mask = enc["attention_mask"]
    pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    out = model(**enc, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    kv = [(layer.keys, layer.values) for layer in cache.layers]
    return PromptPrefill(kv, out.logits[:, -1].float(), mask, pos[:, -1])


class _PreallocatedLayer(DynamicLayer):
    """A KV cache layer that writes new tokens into buffers sized for the whole decode.

    ``DynamicLayer`` concatenates the whole cache with each new token: the bulk of a decode step's time for
    small models. Here the keys / values seen by attention are views of the first ``n`` positions.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, extra: int) -> None:
        super().__init__()
        B, H, L, D = keys.shape
        self.kbuf = keys.new_empty((B, H, L + extra, D))
        self.vbuf = values.new_empty((B, H, L + extra, values.shape[-1]))
        self.kbuf[:, :, :L] = keys
        self.vbuf[:, :, :L] = values
        self.n = L
        self.device, self.dtype = keys.device, keys.dtype
        self.is_initialized = True
        self._views()

    def _views(self) -> None:
        self.keys, self.values = self.kbuf[:, :, : self.n], self.vbuf[:, :, : self.n]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        t = key_states.shape[-2]
        self.kbuf[:, :, self.n : self.n + t] = key_states
        self.vbuf[:, :, self.n : self.n + t] = value_states
        self.n += t
        self._views()
        return self.keys, self.values

    def keep_rows(self, idx: torch.Tensor) -> None:
        self.kbuf, self.vbuf = self.kbuf.index_select(0, idx), self.vbuf.index_select(0, idx)
        self._views()


@torch.no_grad()
def decode_from_prefill(
    model: Any,
    pre: PromptPrefill,
    rows: torch.Tensor,
    temperature: float,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    block_seeds: Sequence[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """New tokens (R, steps) for the prompts ``rows`` (indices into ``pre``; a prompt repeated k times gives
    k samples): greedy (``temperature`` 0) or ancestral sampling at ``temperature``, no top-k / top-p.

    The computation of ``generate``'s decoding loop without its per-step machinery (logits processors,
    stopping criteria objects, input preparation, a KV cache copied whole at every token): logits in float32,
    divided by the temperature, softmax; a row that emitted EOS continues with padding; decoding stops when
    every row has ended or after ``max_new_tokens``. Greedy decoding gives ``generate``'s tokens.

    Sampling: a token is drawn by inverting the cumulative distribution (float64) at one uniform number per
    row and step: the distribution of ``generate``'s ``torch.multinomial``, which draws an exponential number
    per vocabulary entry (most of a small model's step), so seeded samples differ from ``generate``'s
    (tests/test_policy.py checks the distribution). The uniforms are drawn for all R rows at every step, from
    the global RNG, or with ``block_seeds`` = [(seed, n), ...] (consecutive blocks of n rows) from one generator
    per block seeded with its seed: a block's samples are then those of a call on its rows alone under
    ``torch.manual_seed(seed)``, so callers can decode many seeded batches in one call.

    Rows that have produced the same tokens from the same prompt have the same next-token distribution: the
    forward pass runs once per distinct (prompt, tokens so far), a node of the prefix tree of the samples,
    and each row draws its own token from its node's distribution. The k samples of a state start as one
    node and split where they differ (at T = 1.2 a policy's samples mostly share their first tokens, the
    action type); rows that have ended leave the tree.
    """
    dev = pre.logits.device
    rows = rows.to(dev)
    R = int(rows.numel())
    do_sample = temperature > 0
    states, row_node = torch.unique(rows, return_inverse=True)  # nodes = distinct prompts at first
    cache = DynamicCache()
    cache.layers = [
        _PreallocatedLayer(k.index_select(0, states), v.index_select(0, states), max_new_tokens)
        for k, v in pre.kv
    ]
    logits = pre.logits.index_select(0, states)  # (nodes, V)
    L = pre.attention_mask.shape[1]
    mask = torch.cat(
        [
            pre.attention_mask.index_select(0, states),
            pre.attention_mask.new_ones((len(states), max_new_tokens)),
        ],
        dim=-1,
    )
    pos = pre.last_position.index_select(0, states)
    unfinished = torch.ones(R, dtype=torch.bool, device=dev)
    out = torch.full((R, max_new_tokens), pad_token_id, dtype=torch.long, device=dev)
    V = logits.shape[-1]
    if block_seeds is not None:
        if sum(n for _, n in block_seeds) != R:
            raise ValueError(f"block_seeds cover {sum(n for _, n in block_seeds)} rows, not the {R} rows")
        gens = [(torch.Generator(device=dev).manual_seed(int(sd)), int(n)) for sd, n in block_seeds]

    def uniforms() -> torch.Tensor:
        if block_seeds is None:
            return torch.rand(R, device=dev, dtype=torch.float64)
        return torch.cat([torch.rand(n, generator=g, device=dev, dtype=torch.float64) for g, n in gens])

    steps = 0
    for step in range(max_new_tokens):
        live = unfinished.nonzero().squeeze(1)  # rows still decoding; row_node[live] are their nodes
        nodes = row_node.index_select(0, live)
        if do_sample:
            u = uniforms().index_select(0, live)
            cdf = torch.softmax(logits / temperature, dim=-1).double().cumsum(-1)
            cdf = cdf.index_select(0, nodes)
            tok = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1)).squeeze(1).clamp_max(V - 1)
        else:
            tok = logits.argmax(-1).index_select(0, nodes)
        out[live, step] = tok
        steps = step + 1
        unfinished.index_fill_(0, live[tok == eos_token_id], False)
        going = tok != eos_token_id
        if step == max_new_tokens - 1 or not bool(going.any()):
            break
        live, nodes, tok = live[going], nodes[going], tok[going]
        # The new nodes: distinct (parent node, token) pairs of the rows that go on.
        keys, inverse = torch.unique(nodes * V + tok, return_inverse=True)
        parent, node_tok = keys // V, keys % V
        row_node = torch.zeros(R, dtype=torch.long, device=dev).index_copy_(0, live, inverse)
        if parent.numel() != logits.shape[0] or not bool(
            (parent == torch.arange(len(parent), device=dev)).all()
        ):
            for layer in cache.layers:
                layer.keep_rows(parent)
            mask, pos = mask.index_select(0, parent), pos.index_select(0, parent)
        pos = pos + 1
        logits = (
            model(
                input_ids=node_tok.unsqueeze(1),
                attention_mask=mask[:, : L + step + 1],
                position_ids=pos.unsqueeze(1),
                **{_cache_kw(model): cache},
                use_cache=True,
                logits_to_keep=1,
            )
            .logits[:, -1]
            .float()
        )
    return out[:, :steps]


def decode_texts(
    model: Any,
    processor: Any,
    pre: PromptPrefill,
    rows: torch.Tensor | Sequence[int],
    spec: PolicySpec,
    temperature: float,
    max_new_tokens: int | None = None,
    seed: int | None = None,
    block_seeds: Sequence[tuple[int, int]] | None = None,
) -> list[str]:
    """Raw texts generated from ``pre`` for the prompts ``rows`` (one text per entry; repeat a row for more
    samples of that prompt): :func:`decode_from_prefill`, seeded like :func:`generate_texts` (``seed``) or
    per block of rows (``block_seeds``)."""
    tok = processor.tokenizer
    rows = torch.as_tensor(rows, dtype=torch.long)
    if rows.numel() == 0:
        return []
    with _eval_mode(model), _seeded(model, seed):
        new = decode_from_prefill(
            model,
            pre,
            rows,
            float(temperature),
            max_new_tokens or spec.max_new_tokens,
            tok.eos_token_id,
            tok.pad_token_id,
            block_seeds,
        )
    return _texts(processor, new.cpu(), spec)


# Per-token inputs besides the ids: cut with the prompt, repeated with the samples.
_PER_TOKEN = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


def _generate_from_one_prefill(
    model: Any, enc: dict[str, torch.Tensor], k: int, mrope: bool, kwargs: dict[str, Any]
) -> torch.Tensor:
    """``generate(num_return_sequences=k)`` that encodes each prompt (image included) once instead of k times.

    ``generate`` repeats every input k times before its first forward, so the vision tower and the prompt's
    prefill run k times per state (15 of the 16 candidates per state in Digi-Q's sampling are such repeats).
    Here the prompt minus its last token is run once, its KV cache repeated k times, and ``generate``
    continues from it: it runs the last prompt token and decodes, as it would have. The positions of the
    prefill are the ones ``generate`` gives left-padded prompts (``attention_mask.cumsum - 1``); Qwen-VL's
    M-RoPE positions are computed by the model, which keeps the per-row offset for decoding in
    ``rope_deltas`` (repeated here as the cache is). Only the cache is needed from the prefill:
    ``logits_to_keep=1`` spares the LM head on every other position. Tests check the outputs equal
    ``generate``'s.
    """
    mask = enc["attention_mask"]
    head = {key: (v[:, :-1] if key in _PER_TOKEN else v) for key, v in enc.items()}
    if not mrope:
        pos = mask[:, :-1].long().cumsum(-1) - 1
        head["position_ids"] = pos.masked_fill(mask[:, :-1] == 0, 1)
    if "logits_to_keep" in inspect.signature(unwrap(model).forward).parameters:
        head["logits_to_keep"] = 1
    cache = model(**head, use_cache=True).past_key_values
    cache.batch_repeat_interleave(k)
    base = unwrap(model).model
    if mrope and getattr(base, "rope_deltas", None) is not None:
        base.rope_deltas = base.rope_deltas.repeat_interleave(k, 0)
    rest = {key: enc[key].repeat_interleave(k, 0) for key in _PER_TOKEN if key in enc}
    kwargs = {**kwargs, "num_return_sequences": 1, _cache_kw(model): cache}
    return model.generate(**rest, **kwargs)


def _cache_kw(model: Any) -> str:
    """transformers 5 renamed ``past_key_values`` to ``cache`` (the old name warns until it is removed)."""
    return "cache" if "cache" in inspect.signature(unwrap(model).forward).parameters else "past_key_values"


def generate_actions(
    model: Any,
    processor: Any,
    screenshots: Sequence[Image.Image],
    observations: Sequence[str],
    num_samples: int = 1,
    temperature: float | None = None,
    max_new_tokens: int | None = None,
    seed: int | None = None,
    spec: PolicySpec | None = None,
) -> list[list[str]]:
    """Batched generation -> AutoUI action strings (B lists of ``num_samples``).

    Unparsable outputs are returned as their raw text, which :func:`digiq.actions.parse_action` reads as an
    INVALID action (a no-op on the device; A = 0 in Best-of-N).
    """
    spec = spec or PolicySpec(family=family_name(processor))
    texts = generate_texts(
        model, processor, screenshots, observations, spec, num_samples, temperature, max_new_tokens, seed
    )
    return [[to_autoui(t, spec.action_format) for t in row] for row in texts]


def prefill_policy(
    model: Any,
    processor: Any,
    screenshots: Sequence[Image.Image],
    observations: Sequence[str],
    spec: PolicySpec,
) -> PromptPrefill | None:
    """The policy prompts of a batch of states run once (:func:`prefill_prompts`), to draw any number of
    actions per state with :func:`sample_actions`; None where :func:`fast_decoding_applies` does not hold."""
    if not fast_decoding_applies(model, spec.family):
        return None
    enc = build_policy_inputs(processor, screenshots, observations, spec)
    with _eval_mode(model):
        return prefill_prompts(model, {k: v.to(_device(model)) for k, v in enc.items()})


def sample_actions(
    model: Any,
    processor: Any,
    pre: PromptPrefill,
    rows: Sequence[int],
    spec: PolicySpec,
    temperature: float,
    seed: int | None = None,
    max_new_tokens: int | None = None,
    block_seeds: Sequence[tuple[int, int]] | None = None,
) -> list[str]:
    """One AutoUI action per entry of ``rows`` (state indices into ``pre``), drawn at ``temperature``: what
    ``generate_actions`` returns for those states, without running their prompts again. ``block_seeds``:
    see :func:`decode_from_prefill`."""
    texts = decode_texts(
        model, processor, pre, list(rows), spec, temperature, max_new_tokens, seed, block_seeds
    )
    return [to_autoui(t, spec.action_format) for t in texts]


# --------------------------------------------------------------------------------------------------
# Best-of-N selection (pure)
# --------------------------------------------------------------------------------------------------


def best_of_n(
    q: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None = None, threshold: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pick the candidate to imitate per state: ``(index (B,), advantage (B,), keep (B,))``.

    Official actor (DigiRL-agent/digiq @ 8181379, ``digiq/algorithms/digiq/trainer.py:248-294``): A_i = Q(s,
    a_i) - V(s); invalid candidates get A = 0; argmax_i; A clamped to [0, 1]; imitate when A > threshold (0.05
    WebShop, 0.10 general). Ties go to the lowest index (the dataset action at 0 wins a tie). A kept state
    never points at an invalid candidate (with threshold >= 0 that already holds since invalid A = 0).
    """
    if q.dim() != 2 or v.shape != (q.shape[0],):
        raise ValueError(f"expected q (B, N) and v (B,), got {tuple(q.shape)} and {tuple(v.shape)}")
    if valid is None:
        valid = torch.ones_like(q, dtype=torch.bool)
    if valid.shape != q.shape:
        raise ValueError(f"valid must have q's shape {tuple(q.shape)}, got {tuple(valid.shape)}")
    adv = torch.where(valid, q - v.unsqueeze(1), torch.zeros_like(q))
    index = adv.argmax(dim=1)  # torch.argmax returns the first maximal index
    best = adv.gather(1, index.unsqueeze(1)).squeeze(1).clamp(0.0, 1.0)
    keep = (best > threshold) & valid.gather(1, index.unsqueeze(1)).squeeze(1)
    return index, best, keep


# --------------------------------------------------------------------------------------------------
# Export / load
# --------------------------------------------------------------------------------------------------


def save_policy(
    model: Any,
    processor: Any,
    out_dir: str | Path,
    spec: PolicySpec,
    extra: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Export: merged ``save_pretrained`` weights + processor + ``digiq_policy.json`` (atomic folder); a
    finished policy at ``out_dir`` is replaced only with ``overwrite``.

    An FSDP-sharded model is written from ``state_dict``, gathered by
    :func:`digiq.models.vlm.export_state` on every process (see :func:`digiq.models.vlm.save_vlm`)."""
    out_dir = Path(out_dir)
    m = getattr(model, "module", model)  # DDP
    with staged_dir(out_dir, overwrite=overwrite) as tmp:
        save_vlm(m if is_peft(m) else unwrap(m), processor, tmp, merge_lora=True, state_dict=state_dict)
        atomic_write_json(tmp / POLICY_FILE, {**spec.to_json(), **(extra or {})})
    return out_dir


def read_spec(path: str | Path, default: PolicySpec | None = None) -> PolicySpec:
    p = Path(path) / POLICY_FILE
    if p.is_file():
        return PolicySpec.from_json(json.loads(p.read_text()))
    if default is None:
        raise DigiqError(f"{path} has no {POLICY_FILE}: not a policy exported by digiq")
    return default


def load_policy(
    path: str | Path, device: str | torch.device = "auto", dtype: str = "auto", spec: PolicySpec | None = None
):
    """``(model, processor, spec)`` from an export (or any VLM folder / ``tiny:`` id with ``spec``), for
    inference: on ``device`` (``auto`` = a GPU when visible) in ``dtype`` (``auto`` = bfloat16 on a GPU,
    float32 on the CPU; see :func:`digiq.models.vlm.inference_dtype`)."""
    path_s = str(path)
    if not path_s.startswith("tiny:") and not Path(path_s).exists():
        raise DigiqError(f"policy not found: {path_s}")
    device = inference_device(device)
    model, processor = load_vlm(ModelConfig(name_or_path=path_s, dtype=inference_dtype(dtype, device)))
    if path_s.startswith("tiny:"):
        spec = spec or PolicySpec(family=processor.digiq_family)
    else:
        spec = read_spec(path_s, spec or PolicySpec(family=processor.digiq_family))
    return model.to(device).eval(), processor, spec


def load_policy_fn(
    path: str | Path,
    temperature: float | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    batch_size: int = 64,
    max_new_tokens: int | None = None,
    dtype: str = "auto",
) -> Callable[[list[dict]], list[str]]:
    """The simulator's rollout callable for an exported policy: dicts -> AutoUI strings.

    Greedy unless the export (or ``temperature`` > 0) asks for sampling; sampled calls are seeded by
    ``seed`` plus a call counter, so a rollout is reproducible.
    """
    model, processor, spec = load_policy(path, device, dtype)
    if temperature is not None:
        spec = dataclasses.replace(spec, do_sample=temperature > 0, temperature=temperature or 1.0)
    if max_new_tokens is not None:
        spec = dataclasses.replace(spec, max_new_tokens=max_new_tokens)
    calls = [0]
    # Greedy decoding is a deterministic function of (screen pixels, prompt): memoise it. Rollouts revisit
    # the same (screen, goal, previous action) many times (every episode of a task under a greedy policy is
    # the same), so evaluation generates once per distinct input. Sampling is never memoised.
    memo: dict[tuple[bytes, tuple[int, int], str], str] = {}

    def key(b: dict) -> tuple[bytes, tuple[int, int], str]:
        im = b["screenshot"]
        return hashlib.blake2b(im.tobytes(), digest_size=16).digest(), im.size, b["observation"]

    def policy_fn(batch: list[dict]) -> list[str]:
        keys = [key(b) for b in batch] if not spec.do_sample else [None] * len(batch)
        todo = [i for i, k in enumerate(keys) if k is None or k not in memo]
        fresh: dict[int, str] = {}
        for start in range(0, len(todo), batch_size):
            chunk = [batch[i] for i in todo[start : start + batch_size]]
            t = spec.temperature if spec.do_sample else 0.0
            rows = generate_actions(
                model,
                processor,
                [b["screenshot"] for b in chunk],
                [b["observation"] for b in chunk],
                temperature=t,
                seed=seed + calls[0] if spec.do_sample else None,
                spec=spec,
            )
            calls[0] += 1
            for i, r in zip(todo[start : start + batch_size], rows):
                fresh[i] = r[0]
                if keys[i] is not None:
                    memo[keys[i]] = r[0]
        return [fresh[i] if i in fresh else memo[keys[i]] for i in range(len(batch))]

    return policy_fn
