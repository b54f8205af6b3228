"""The official critic's inputs beyond the VLM feature: text embeddings and frame-stacked image features.

The official critic (DigiRL-agent/digiq @ 8181379, ``digiq/models/critic.py:16-26,113-128,156-157``) reads

    V input: [prev action type, prev typed text, goal, image_features of [prev, cur] frames]     (5120-d)
    Q input: [V input, candidate action type, candidate typed text, q_rep_out]                 (10752-d)

with the three text parts the pooled output of ``roberta-base`` encoders (one for the goal, one for action
types, one for typed text; the type and text encoders are shared by the previous and the candidate action),
fine-tuned by the critic's optimiser. It re-tokenises and re-encodes every string on every forward: five
encoder passes per critic call, and the actor step calls the critic 16 times.

Here every row's strings are turned once into integer ids into per-role tables of *unique* strings
(:class:`RowTexts`). A frozen encoder embeds each unique string once (:func:`embed_tables`, cached next to
the features); a fine-tuned encoder embeds, per batch, only the unique strings of that batch, one pass per
encoder (:func:`gather`). ``scripts/bench_critic.py`` measures the difference.

Row layout: step 0 has no previous action; its previous type and text are the empty string (the official
observation then has an empty "Previous Actions:" part, which the official parser passes whole to both
encoders). An action that does not parse is passed whole to both the type and the text encoder, as the
official ``critic.py:113-128``. The encoders run without dropout (the critic keeps them in eval mode), so
a string has one embedding per step: embedding each unique string once is then exact, not an
approximation of per-occurrence dropout noise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from digiq.actions import ActionType, parse_action
from digiq.errors import model_unavailable
from digiq.utils.logging import get_logger

log = get_logger(__name__)

ROLES = ("type", "text", "goal")
# Module names per role ("type" would shadow nn.Module.type).
_KEYS = {"type": "action_type", "text": "typed_text", "goal": "goal", "shared": "shared"}
ENCODER_DIR = "text_encoder"


def action_strings(action: str) -> tuple[str, str]:
    """(type string, typed text) of an action as the official critic feeds them to its encoders."""
    a = parse_action(action)
    if a.type is ActionType.INVALID:
        return action, action  # official critic.py:113-128: the whole string to both encoders
    return a.type.value, a.text


class TextEncoders(nn.Module):
    """Hugging Face text encoders (``AutoModel``) per role, or one shared by all roles; pooled outputs.

    ``separate=True`` is the official layout: three encoders (goal, action type, typed text).
    """

    def __init__(self, models: dict[str, nn.Module], tokenizer: Any, max_length: int) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict({_KEYS[r]: m for r, m in models.items()})
        # Right padding: the pooled output reads the first position, which left padding would make a pad
        # token (and a string's embedding would then depend on the batch it was encoded in).
        tokenizer.padding_side = "right"
        self.tokenizer = tokenizer
        self.max_length = max_length
        first = next(iter(models.values()))
        self.hidden_size = int(first.config.hidden_size)

    @property
    def shared(self) -> bool:
        return "shared" in self.encoders

    @classmethod
    def load(cls, name: str, separate: bool, max_length: int, weights: bool = True) -> TextEncoders:
        """Encoders from a hub name or folder; ``weights=False`` builds them from the config only (the
        weights then come from a saved critic's state dict)."""
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        roles = ROLES if separate else ("shared",)
        try:
            tok = AutoTokenizer.from_pretrained(name)
            if weights:
                models = {r: AutoModel.from_pretrained(name) for r in roles}
            else:
                config = AutoConfig.from_pretrained(name)
                models = {r: AutoModel.from_config(config) for r in roles}
        except (OSError, ValueError) as e:  # not found (offline: not cached), or not a text model
            raise model_unavailable("critic.text.encoder", name, e, "text encoder") from e
        return cls(models, tok, max_length)

    def save_config(self, directory: str | Path) -> None:
        """Config and tokenizer (no weights: those are in the critic's safetensors)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        next(iter(self.encoders.values())).config.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)

    def encoder(self, role: str) -> nn.Module:
        return self.encoders["shared" if self.shared else _KEYS[role]]

    def encode(self, role: str, strings: Sequence[str]) -> torch.Tensor:
        """(len(strings), H) float32: the pooled output (the first token's state where a model has no
        pooler), as the official ``pooler_output`` (critic.py:113-128)."""
        model = self.encoder(role)
        device = next(model.parameters()).device
        if len(strings) == 0:
            return torch.zeros(0, self.hidden_size, device=device)
        enc = self.tokenizer(
            list(strings), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        ids, mask = enc["input_ids"], enc["attention_mask"]
        if ids.shape[1] == 0 or not bool(mask.any(dim=1).all()):
            # An empty string (step 0's previous action, a non-TYPE action's text) is no tokens for a
            # tokenizer without special tokens: give it one attended pad token (roberta-base adds <s></s>).
            if ids.shape[1] == 0:
                ids = torch.full((len(strings), 1), int(self.tokenizer.pad_token_id or 0))
                mask = torch.zeros_like(ids)
            mask = mask.clone()
            mask[~mask.any(dim=1), 0] = 1
        enc = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        out = model(**enc)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            pooled = out.last_hidden_state[:, 0]
        return pooled.float()


@dataclasses.dataclass
class RowTexts:
    """Per-row ids into per-role tables of unique strings (``strings[role][id]``)."""

    strings: dict[str, list[str]]
    goal: torch.Tensor  # (R,) into strings["goal"]
    prev_type: torch.Tensor  # (R,) into strings["type"]
    prev_text: torch.Tensor  # (R,) into strings["text"]
    cand_type: torch.Tensor  # (R, N) into strings["type"]
    cand_text: torch.Tensor  # (R, N) into strings["text"]

    def to(self, device: torch.device | str) -> RowTexts:
        return dataclasses.replace(
            self, **{f: getattr(self, f).to(device) for f in ("goal", "prev_type", "prev_text", "cand_type",
                                                            "cand_text")}
        )  # fmt: skip

    def key(self) -> str:
        """A digest of the string tables (names the cached frozen embeddings)."""
        h = hashlib.sha256(json.dumps(self.strings, sort_keys=True).encode())
        return h.hexdigest()[:16]


def previous_rows(traj_ids: Sequence[int]) -> np.ndarray:
    """The row of s_{t-1} in the same trajectory, the row itself at step 0 (rows are contiguous per
    trajectory, in step order)."""
    traj = np.asarray(traj_ids)
    prev = np.arange(len(traj)) - 1
    first = np.r_[True, traj[1:] != traj[:-1]] if len(traj) else np.zeros(0, bool)
    return np.where(first, np.arange(len(traj)), prev).astype(np.int64)


def row_texts(
    goals: Sequence[str], actions: Sequence[str], candidates: Sequence[Sequence[str]], traj_ids: Sequence[int],
    num_candidates: int,
) -> RowTexts:  # fmt: skip
    """Ids of every row's goal, previous action (type, text) and candidates 0..N-1 (type, text).

    Candidate 0 is the dataset action; missing candidates (padding) get the empty string.
    """
    tables: dict[str, dict[str, int]] = {r: {} for r in ROLES}

    def sid(role: str, s: str) -> int:
        t = tables[role]
        if s not in t:
            t[s] = len(t)
        return t[s]

    R, N = len(goals), num_candidates
    prev = previous_rows(traj_ids)
    goal = np.zeros(R, np.int64)
    p_type, p_text = np.zeros(R, np.int64), np.zeros(R, np.int64)
    c_type, c_text = np.zeros((R, N), np.int64), np.zeros((R, N), np.int64)
    parsed: dict[str, tuple[str, str]] = {}

    def split(a: str) -> tuple[str, str]:
        if a not in parsed:
            parsed[a] = action_strings(a)
        return parsed[a]

    for r in range(R):
        goal[r] = sid("goal", goals[r])
        ty, tx = ("", "") if prev[r] == r else split(actions[prev[r]])
        p_type[r], p_text[r] = sid("type", ty), sid("text", tx)
        cands = list(candidates[r]) or [actions[r]]
        for i in range(N):
            ty, tx = split(cands[i]) if i < len(cands) else ("", "")
            c_type[r, i], c_text[r, i] = sid("type", ty), sid("text", tx)
    strings = {role: list(t) for role, t in tables.items()}  # insertion order = id order
    as_t = torch.from_numpy
    return RowTexts(strings, as_t(goal), as_t(p_type), as_t(p_text), as_t(c_type), as_t(c_text))


@torch.no_grad()
def embed_tables(
    encoders: TextEncoders, strings: dict[str, list[str]], batch_size: int = 256
) -> dict[str, torch.Tensor]:
    """Every unique string of every role embedded once: ``{role: (U_role, H)}`` (frozen encoders)."""
    out = {}
    for role in ROLES:
        parts = [encoders.encode(role, strings[role][i : i + batch_size])
                 for i in range(0, len(strings[role]), batch_size)]  # fmt: skip
        out[role] = torch.cat(parts) if parts else torch.zeros(0, encoders.hidden_size)
    return out


def cached_tables(
    encoders: TextEncoders,
    texts: RowTexts,
    cache_dir: str | Path | None,
    encoder_id: str,
    batch_size: int = 256,
) -> dict[str, torch.Tensor]:
    """:func:`embed_tables`, read from / written to ``cache_dir/text-<digest>.safetensors`` when given.

    The digest covers the encoder's identity (name, max_length, a checksum of its weights) and the string
    tables, so another encoder or another dataset never reads these embeddings. A read-only cache folder
    only costs the recomputation.
    """
    from safetensors.torch import load_file, save_file

    h = hashlib.sha256()
    h.update(f"{encoder_id}|{encoders.max_length}|{texts.key()}".encode())
    with torch.no_grad():
        for p in encoders.parameters():  # a cheap checksum: sum and first values of every tensor
            h.update(np.float64(p.detach().double().sum().item()).tobytes())
            h.update(p.detach().reshape(-1)[:4].double().cpu().numpy().tobytes())
    name = f"text-{h.hexdigest()[:20]}.safetensors"
    path = Path(cache_dir) / name if cache_dir else None
    if path is not None and path.is_file():
        got = load_file(str(path))
        if all(r in got and len(got[r]) == len(texts.strings[r]) for r in ROLES):
            return {r: got[r] for r in ROLES}
    tables = embed_tables(encoders, texts.strings, batch_size)
    if path is not None:
        try:
            tmp = path.with_suffix(".tmp")
            save_file({r: t.contiguous().cpu() for r, t in tables.items()}, str(tmp))
            tmp.replace(path)
        except OSError as e:
            log.warning("could not cache text embeddings in %s (%s); they are recomputed next time", path, e)
    return tables


@dataclasses.dataclass
class CriticInputs:
    """What a critic reads for rows of a dataset: base features, previous rows, text ids and tables."""

    state: torch.Tensor  # (R, Ds) image/state features
    actions: torch.Tensor  # (R, N, Da) per-candidate VLM features
    prev_idx: torch.Tensor | None = None  # (R,) frame stacking [prev, cur] when set
    texts: RowTexts | None = None
    tables: dict[str, torch.Tensor] | None = None  # frozen encoders: {role: (U, H)}


@dataclasses.dataclass
class Batch:
    """Critic inputs of a batch: ``state`` (B, F*Ds), ``state_text`` (B, 3H) | None, ``action`` (B, Da) or
    (B, k, Da), ``action_text`` (B, 2H) or (B, k, 2H) | None."""

    state: torch.Tensor
    state_text: torch.Tensor | None
    action: torch.Tensor | None
    action_text: torch.Tensor | None


def _lookup(
    inputs: CriticInputs, encoders: TextEncoders | None, wanted: dict[str, list[torch.Tensor]]
) -> dict[str, list[torch.Tensor]]:
    """Embeddings for lists of id tensors per role: table lookups (frozen), or one encoder pass per
    encoder over the batch's unique strings (fine-tuned)."""
    assert inputs.texts is not None
    if inputs.tables is not None:
        return {
            r: [inputs.tables[r][i.to(inputs.tables[r].device)] for i in ids] for r, ids in wanted.items()
        }
    if encoders is None:
        raise ValueError("text inputs without frozen tables need the critic's text encoders")
    strings = inputs.texts.strings
    out: dict[str, list[torch.Tensor]] = {}
    groups = [list(wanted)] if encoders.shared else [[r] for r in wanted]
    for roles in groups:
        # One pass per encoder over the unique (role, id) pairs of the whole batch, state and candidates
        # together; offsets keep the ids of roles sharing one encoder apart.
        offsets, base = {}, 0
        for r in roles:
            offsets[r] = base
            base += len(strings[r])
        pieces = [(r, ids) for r in roles for ids in wanted[r]]
        glob = torch.cat([ids.reshape(-1).cpu() + offsets[r] for r, ids in pieces])
        uniq, inverse = torch.unique(glob, return_inverse=True)
        texts = []
        for u in uniq.tolist():
            r = next(r for r in reversed(roles) if u >= offsets[r])
            texts.append(strings[r][u - offsets[r]])
        emb = encoders.encode(roles[0], texts)  # shared: the one encoder; separate: roles == [role]
        inverse = inverse.to(emb.device)
        pos = 0
        for r, ids in pieces:
            n = ids.numel()
            out.setdefault(r, []).append(emb[inverse[pos : pos + n]].reshape(*ids.shape, -1))
            pos += n
    return out


def gather(
    inputs: CriticInputs,
    idx: torch.Tensor,
    cols: int | torch.Tensor | slice | None,
    encoders: TextEncoders | None = None,
) -> Batch:
    """Critic inputs of rows ``idx`` and candidate column(s) ``cols`` (an int, a per-row (B,) tensor, a
    slice of columns, or None for the state only)."""
    s = inputs.state[idx]
    if inputs.prev_idx is not None:
        s = torch.cat([inputs.state[inputs.prev_idx[idx]], s], dim=-1)
    a = None
    if cols is not None:
        a = inputs.actions[idx, cols]
    if inputs.texts is None:
        return Batch(s, None, a, None)
    t = inputs.texts
    tidx = idx.to(t.goal.device)
    wanted: dict[str, list[torch.Tensor]] = {"type": [t.prev_type[tidx]], "text": [t.prev_text[tidx]],
                                             "goal": [t.goal[tidx]]}  # fmt: skip
    if cols is not None:
        c = cols.to(t.goal.device) if isinstance(cols, torch.Tensor) else cols
        wanted["type"].append(t.cand_type[tidx, c])
        wanted["text"].append(t.cand_text[tidx, c])
    emb = _lookup(inputs, encoders, wanted)
    dev = s.device
    # Official order (critic.py:156-157): [prev type, prev text, goal, image] and [..., act type, act text, q_rep]
    s_txt = torch.cat([emb["type"][0], emb["text"][0], emb["goal"][0]], dim=-1).to(dev)
    a_txt = None
    if cols is not None:
        a_txt = torch.cat([emb["type"][1], emb["text"][1]], dim=-1).to(dev)
    return Batch(s, s_txt, a, a_txt)


def build_inputs(
    critic: nn.Module,
    state: torch.Tensor,
    actions: torch.Tensor,
    ds: Any,
    cache_dir: str | Path | None = None,
    tables: bool = True,
    batch_size: int = 256,
) -> CriticInputs:
    """The inputs ``critic`` reads for every row of dataset ``ds`` (rows aligned with ``state``/``actions``).

    ``tables=True`` embeds every unique string once with the critic's (now fixed) encoders: always right
    when scoring; in training only for frozen encoders (a fine-tuned encoder embeds per batch).
    """
    arch = critic.arch
    cols = ds.select_columns([c for c in ("traj_id", "task", "action", "candidates") if c in ds.column_names])
    traj = list(cols["traj_id"])
    prev = torch.from_numpy(previous_rows(traj)).to(state.device) if arch.frame_stack > 1 else None
    texts, tabs = None, None
    if arch.text_encoder:
        texts = row_texts(
            list(cols["task"]), list(cols["action"]), list(cols["candidates"]), traj, int(actions.shape[1])
        )
        if tables:
            tabs = cached_tables(critic.text, texts, cache_dir, arch.text_encoder, batch_size)
            tabs = {r: t.to(state.device) for r, t in tabs.items()}
        texts = texts.to(state.device)
    return CriticInputs(state, actions, prev, texts, tabs)


@torch.no_grad()
def score(
    critic: nn.Module, inputs: CriticInputs, idx: torch.Tensor, cols: int | torch.Tensor | slice
) -> tuple[torch.Tensor, torch.Tensor]:
    """Twin-aggregated (Q of the selected column(s), V) for rows ``idx``: float32 tensors."""
    b = gather(inputs, idx, cols, critic.text)
    q = critic.q(b.action.float(), b.state.float(), b.state_text, b.action_text)
    return q.float(), critic.v(b.state.float(), b.state_text).float()
