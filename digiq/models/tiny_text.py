"""The text every ``tiny:`` model's tokenizer is trained on, and that tokenizer.

Kept apart from :mod:`digiq.models.tiny` because it reads the prompts (:mod:`digiq.models.prompts`), which
read the family registry, which points at the tiny builders: here it sits above all three.
"""

from __future__ import annotations

import functools
import random
from importlib.resources import files

from digiq.actions import Action, ActionType, make_observation
from digiq.models import prompts
from digiq.models.tiny import build_tokenizer

# The families whose chat templates the tokenizer trains on, in this order. Frozen rather than "every
# registered family": adding a family must not change the tokenizer (so the prompts and weights) of the
# existing tiny models.
CORPUS_FAMILIES = ("llava", "qwen2-vl", "qwen2.5-vl", "idefics3", "smolvlm", "paligemma")


def frozen_sim_goals() -> list[str]:
    """The simulated device's goals, frozen as package data: see the header of the file for why."""
    text = (files("digiq.models") / "assets" / "tiny_tokenizer_goals.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line and not line.startswith("#")]


@functools.lru_cache(maxsize=1)
def default_corpus() -> tuple[str, ...]:
    """Text the tiny BPE is trained on: AutoUI action strings, our prompts, chat templates and sim goals.

    Short tokens for these strings keep prompts short and let the behaviour-cloned policy (train-bc) emit
    actions in few decoding steps.
    """
    rng = random.Random(0)
    texts: list[str] = []
    goals = [
        "Turn on wifi",
        "Turn off bluetooth",
        "Open the settings",
        'Go to shopmart.com, search for "usb cable", and select the first entry',
        *frozen_sim_goals(),
    ]
    actions: list[Action] = []
    for _ in range(400):
        y, x = rng.random(), rng.random()
        actions.append(Action.tap(y, x))
        actions.append(Action.swipe((y, x), (rng.random(), rng.random())))
    for word in ("usb cable", "yoga mat", "desk lamp", "phone case", "hello world", "wifi", "settings"):
        actions.append(Action.type_text(word))
    for t in (ActionType.PRESS_BACK, ActionType.PRESS_HOME, ActionType.PRESS_ENTER):
        actions.append(Action.key(t))
    actions += [Action(ActionType.STATUS_TASK_COMPLETE), Action(ActionType.STATUS_TASK_IMPOSSIBLE)]
    for i, a in enumerate(actions):
        goal = goals[i % len(goals)]
        prev = actions[(i * 7) % len(actions)]
        texts.append(a.render())
        texts.append(make_observation(goal, prev))
        for rendering in ("text", "overlay"):
            q = prompts.action_text(a, rendering)
            texts.append(prompts.user_prefix(goal, prev) + q + prompts.ANSWER_INSTRUCTION)
    texts.append(prompts.user_prefix(goals[0], None) + prompts.STATE_QUESTION + prompts.ANSWER_INSTRUCTION)
    for fam in CORPUS_FAMILIES:
        head, tail, ans = prompts.TEMPLATES[fam]
        for word in ("Yes", "No"):
            texts.extend([head + "x" + tail + ans + word + "</s>"] * 20)
    texts.extend(goals * 5)
    return tuple(texts)


def default_tokenizer(vocab_size: int = 2048):
    """The tokenizer of every ``tiny:`` model: :func:`build_tokenizer` on :func:`default_corpus`."""
    return build_tokenizer(default_corpus(), vocab_size)


def save_tiny_text_encoder(
    path: str, hidden: int = 32, layers: int = 1, heads: int = 2, seed: int = 0
) -> str:
    """A tiny random RoBERTa (with pooler) and the tiny tokenizer saved to ``path``, loadable offline with
    ``AutoModel`` / ``AutoTokenizer``: the stand-in for ``roberta-base`` in tests and benchmarks."""
    import torch
    from transformers import RobertaConfig, RobertaModel

    tok = default_tokenizer()
    pad = int(tok.pad_token_id)
    config = RobertaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        # RoBERTa numbers positions from pad + 1: room for 128 tokens (the critic's default max_length).
        max_position_embeddings=pad + 130,
        pad_token_id=pad,
        bos_token_id=int(tok.bos_token_id),
        eos_token_id=int(tok.eos_token_id),
    )
    torch.manual_seed(seed)
    RobertaModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path
