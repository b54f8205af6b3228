"""Exact, fast VLM features for Stage 2: f(s) and f(s, a_i) for a state and N candidate actions.

The official pipeline extracts LLaVA features through gradio endpoints (about 8 h) or a forked vLLM (about 1
h), sampling at temperature 0.2 (DigiRL-agent/digiq @ 8181379,
``postprocess_data/vlm_infer/gradio_based/host.py:78-84,98``), so its features are noisy. Here a feature is
the hidden state of one text-model layer at the last prompt token (the position that predicts the Yes/No
answer, :func:`digiq.models.vlm.extract_features`), computed deterministically in eval mode without the LM
head.

Two ways to compute the same numbers:

* **prefix-shared** (``text`` rendering, decoder-only families with causal attention over the prompt):
  the prompt is ``prefix + suffix`` (:func:`digiq.models.prompts.split_prompt`) and the prefix (chat
  header, image tokens, goal, previous action) is the same for the state-only prompt and for all N actions.
  It is encoded ONCE (vision tower included); its KV cache is expanded to M = N + 1 along the batch and the
  M right-padded suffixes run on top of it. Right padding keeps every real suffix token at the positions
  it has in the full prompt (``Lp + j``), so no position id needs shifting; the feature is gathered at the
  last real token of each suffix. Qwen2-VL's M-RoPE positions are not ``0..L-1`` after an image: the text
  after the prefix continues at ``max(prefix positions) + 1`` on all three axes, which we pass explicitly.
* **full forwards**: batched left-padded forwards of the whole prompt (``overlay``, where the image
  differs per action, and families whose prefix cannot be shared, e.g. PaliGemma's bidirectional
  prefix-LM attention).

Both equal a plain per-pair full forward (:func:`reference_features`) within fp32 tolerance (tested).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from digiq.actions import Action
from digiq.models.families import FAMILIES
from digiq.models.prompts import Rendering, make_inputs, processor_call, split_prompt
from digiq.models.vlm import extract_features, hidden_at, resolve_layer, unwrap
from digiq.utils.logging import get_logger

log = get_logger(__name__)


def _text(x: Action | str | None) -> str | None:
    """A hashable identity of a prompt part (an Action renders to the string the prompt is built from)."""
    return x.render() if isinstance(x, Action) else x


@torch.no_grad()
def reference_features(
    model: Any,
    processor: Any,
    screenshot: Image.Image,
    goal: str,
    previous_action: Action | str | None,
    action: Action | str | None,
    rendering: Rendering = "text",
    layer: int | None = None,
) -> torch.Tensor:
    """One plain full forward of one (state, action) prompt -> feature (D,). ``action=None``: f(s)."""
    inputs = make_inputs(processor, [screenshot], [goal], [previous_action], [action], rendering)
    dev = next(unwrap(model).parameters()).device
    inputs = {k: v.to(dev) for k, v in inputs.items()}
    return extract_features(model, inputs, layer)[0]


def _common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    k = min(len(s) for s in seqs)
    first = seqs[0]
    for i in range(k):
        t = first[i]
        if any(s[i] != t for s in seqs[1:]):
            return i
    return k


class Featurizer:
    """Computes ``(f(s), [f(s, a_1) .. f(s, a_N)])`` per state; see the module docstring.

    ``batch_size`` bounds the prompts in one forward (suffixes per prefix, or full prompts).
    ``prefix_sharing=False`` forces full forwards (the baseline in ``scripts/bench_features.py``).
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        layer: int | None = None,
        rendering: Rendering = "text",
        batch_size: int = 32,
        prefix_sharing: bool = True,
    ) -> None:
        self.model = model
        self.hf = unwrap(model)
        self.hf.eval()
        self.base = self.hf.model  # *Model under *ForConditionalGeneration: no LM head
        self.processor = processor
        self.family = processor.digiq_family
        self.layer = resolve_layer(model, layer)
        self.rendering = rendering
        self.batch_size = max(1, int(batch_size))
        self.device = next(self.hf.parameters()).device
        params = inspect.signature(self.base.forward).parameters
        # transformers 5.x renamed past_key_values -> cache (the old name is deprecated until 5.40).
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        # FamilySpec.prefix_sharing: causal attention over the whole prompt, image tokens inside the prefix.
        self.prefix_sharing = prefix_sharing and rendering == "text" and FAMILIES[self.family].prefix_sharing
        if prefix_sharing and rendering == "text" and not self.prefix_sharing:
            log.warning(
                "prefix sharing is not supported for VLM family %r; using full forwards (slower, same values)",
                self.family,
            )
        self.num_prefix_fallbacks = 0

    # ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def features(
        self,
        screenshot: Image.Image,
        goal: str,
        previous_action: Action | str | None,
        actions: Sequence[Action | str],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(state (D,), actions (N, D))`` in the model's dtype, on the model's device."""
        items: list[Action | str | None] = [None, *actions]
        feats = None
        if self.prefix_sharing:
            feats = self._prefix_shared(screenshot, goal, previous_action, items)
            if feats is None:
                self.num_prefix_fallbacks += 1
        if feats is None:
            feats = self._full(
                [screenshot] * len(items), [goal] * len(items), [previous_action] * len(items), items
            )
        return feats[0], feats[1:]

    @torch.no_grad()
    def features_many(
        self, rows: Sequence[tuple[Image.Image, str, Action | str | None, Sequence[Action | str]]]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`features` for several states; full forwards are batched across states."""
        if self.prefix_sharing:
            return [self.features(*r) for r in rows]
        flat_img, flat_goal, flat_prev, flat_act, sizes = [], [], [], [], []
        for img, goal, prev, acts in rows:
            items = [None, *acts]
            flat_img += [img] * len(items)
            flat_goal += [goal] * len(items)
            flat_prev += [prev] * len(items)
            flat_act += items
            sizes.append(len(items))
        feats = self._full(flat_img, flat_goal, flat_prev, flat_act)
        out, i = [], 0
        for n in sizes:
            out.append((feats[i], feats[i + 1 : i + n]))
            i += n
        return out

    # ----------------------------------------------------------------------------------------------
    def _full(self, images, goals, prevs, actions) -> torch.Tensor:
        """Batched, left-padded full-prompt forwards (the image is re-encoded for every prompt).

        Identical prompts (same screenshot object, goal, previous action and action text) are computed once:
        a behaviour policy's N candidates repeat keys such as "back" or "complete" (16 candidates hold 13.8
        distinct ones on the simulated device). The copies are the same row of the output, so the values are
        those of a forward of that prompt alone (padding never changes a row: tests/test_vlm.py).
        """
        keys = [
            (id(im), g, _text(p), _text(a)) for im, g, p, a in zip(images, goals, prevs, actions, strict=True)
        ]
        first: dict[tuple, int] = {}
        where, uniq = [], []  # where[i]: output row of prompt i; uniq: the first prompt of each output row
        for i, k in enumerate(keys):
            if k not in first:
                first[k] = len(uniq)
                uniq.append(i)
            where.append(first[k])
        outs = []
        for s in range(0, len(uniq), self.batch_size):
            rows = uniq[s : s + self.batch_size]
            inputs = make_inputs(
                self.processor,
                [images[i] for i in rows],
                [goals[i] for i in rows],
                [prevs[i] for i in rows],
                [actions[i] for i in rows],
                self.rendering,
            )
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            outs.append(extract_features(self.model, inputs, self.layer))
        return torch.cat(outs)[torch.as_tensor(where, device=outs[0].device)]

    def _prefix_shared(self, screenshot, goal, prev, items) -> torch.Tensor | None:
        """Encode the prefix once and run every suffix on its KV cache; None if the split is not clean."""
        from transformers import DynamicCache

        tok = self.processor.tokenizer
        prefix_text, _ = split_prompt(self.family, goal, prev, None, "text")
        full_texts = [prefix_text + split_prompt(self.family, goal, prev, a, "text")[1] for a in items]
        # Token ids of the full prompts (image placeholder unexpanded, special tokens as the processor adds
        # them). The shared part is their longest common prefix that is also a prefix of the prefix text's
        # ids: tokenizers may merge across the text boundary (SentencePiece's leading space), so we never
        # assume tokenize(prefix) + tokenize(suffix) == tokenize(prefix + suffix).
        full_ids = tok(full_texts)["input_ids"]
        prefix_ids = tok([prefix_text])["input_ids"][0]
        k = _common_prefix_len([*full_ids, prefix_ids])
        drop = len(prefix_ids) - k
        if any(len(f) <= k for f in full_ids):
            return None
        inputs = processor_call(self.processor, [screenshot], [prefix_text])
        ids = inputs["input_ids"][0]
        Lp = ids.shape[0] - drop
        # The processor expanded the image placeholder inside the prefix; the text after the image must be
        # the same tokens as in our text-only tokenization, else the split is not clean: fall back.
        tail = len(prefix_ids) - self._last_image_pos(prefix_ids) - 1
        if tail <= drop or ids[-tail:].tolist() != prefix_ids[-tail:]:
            return None
        if drop:
            inputs = {
                key: (v[:, :Lp] if key in ("input_ids", "attention_mask", "mm_token_type_ids") else v)
                for key, v in inputs.items()
            }
        inputs.pop("token_type_ids", None)
        inputs = {key: v.to(self.device) for key, v in inputs.items()}
        pos_kw: dict[str, Any] = {}
        text_start = Lp
        if FAMILIES[self.family].mrope:
            position_ids, deltas = self._rope_index(inputs)
            pos_kw["position_ids"] = position_ids
            text_start = Lp + int(deltas.reshape(-1)[0])
        # The prefix runs only the layers below the feature layer (hidden_at stops there), so its KV cache
        # holds those layers, which are all the suffixes' shortened passes read.
        cache = DynamicCache(config=self.hf.config)
        hidden_at(
            self.base,
            self.layer,
            **inputs,
            **pos_kw,
            use_cache=True,
            return_dict=True,
            **{self._cache_kw: cache},
        )
        kv = [(layer[0], layer[1]) for layer in cache][: self.layer]

        suffixes = [f[k:] for f in full_ids]
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        feats = []
        for s in range(0, len(suffixes), self.batch_size):
            chunk = suffixes[s : s + self.batch_size]
            m, Ls = len(chunk), max(len(c) for c in chunk)
            sids = torch.full((m, Ls), pad, dtype=torch.long)
            smask = torch.zeros((m, Ls), dtype=torch.long)
            for i, c in enumerate(chunk):  # right padding: real tokens sit at Lp + j as in the full prompt
                sids[i, : len(c)] = torch.tensor(c)
                smask[i, : len(c)] = 1
            mask = torch.cat([torch.ones((m, Lp), dtype=torch.long), smask], dim=1).to(self.device)
            pos = (text_start + torch.arange(Ls)).expand(m, Ls).to(self.device)
            if FAMILIES[self.family].mrope:
                pos = pos.unsqueeze(0).expand(3, m, Ls)  # text tokens: the same position on t, h, w
            chunk_cache = DynamicCache(
                [(k_.expand(m, -1, -1, -1), v_.expand(m, -1, -1, -1)) for k_, v_ in kv],
                config=self.hf.config,
            )
            h = hidden_at(
                self.base,
                self.layer,
                input_ids=sids.to(self.device),
                attention_mask=mask,
                position_ids=pos,
                use_cache=True,
                return_dict=True,
                **{self._cache_kw: chunk_cache},
            )
            last = smask.sum(dim=1).to(self.device) - 1
            feats.append(h[torch.arange(m, device=self.device), last])
        return torch.cat(feats)

    def _last_image_pos(self, ids: Sequence[int]) -> int:
        image_ids = {
            getattr(self.processor, "image_token_id", None),
            getattr(self.hf.config, "image_token_id", None),
            getattr(self.hf.config, "image_token_index", None),
            getattr(self.hf.config, "vision_end_token_id", None),
        } - {None}
        pos = [i for i, t in enumerate(ids) if t in image_ids]
        return pos[-1] if pos else -1

    def _rope_index(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Qwen-VL M-RoPE positions of the prefix and its delta (text continues at Lp + delta)."""
        fn = self.base.get_rope_index
        accepted = inspect.signature(fn).parameters
        kw = {
            k: inputs[k]
            for k in ("input_ids", "mm_token_type_ids", "image_grid_thw", "attention_mask")
            if k in inputs and k in accepted
        }
        position_ids, deltas = fn(**kw)
        return position_ids, deltas
