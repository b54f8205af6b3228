"""Twin MLP Q/V heads on frozen VLM features (Digi-Q Stage 2 critic).

Q_i(s, a) reads f(s, a) (the VLM feature of the screenshot with action a) and V_i(s) reads f(s), i = 1, 2.
Both twins of a head live in one :class:`EnsembleMLP` whose layers are batched matmuls over a leading twin
dimension, so a forward pass is one kernel per layer for both twins (faster than two ``nn.Linear`` stacks
at the batch sizes we train with; see scripts/bench_critic.py).

Differences from the official critic (DigiRL-agent/digiq @ 8181379, ``digiq/models/critic.py:29-72``; the
files named below are in that repository), all deliberate:

- the target network starts as an exact copy of the online network (:func:`make_target`); the official
  ``target_critic`` is a second, independently random initialisation (``autoui_agent.py:73-74``);
- the twins are aggregated with ``min`` by default (clipped double-Q); ``aggregate="max"`` is the official
  ``torch.maximum`` used when scoring actions (``trainer.py:264-265``). The official TD backup does not
  aggregate at all: head i is backed up from target head i (``trainer.py:148-152,173-175``), which
  train-critic reproduces with ``critic.target_pairing: per_head`` (``aggregate: max`` alone does not);
- optional LayerNorm after each hidden layer (the official MLPs have none) and input normalisation with
  feature mean/std measured on the training split and stored with the critic (raw VLM hidden states have
  a few huge-magnitude channels);
- ``q_param="dueling"`` (optional, beyond the paper and the official code): Q(s, a) = sg[V(s)] + A(f(s, a)),
  see :meth:`Critic.q_all`;
- text encoders and frame stacking are optional (``text_encoder``, ``frame_stack``,
  :mod:`digiq.models.critic_text`): with them the inputs are the official ones (``critic.py:156-157``),
  without them V reads f(s) alone, which for imported data (single-frame BLIP-2 features) cannot tell two
  goals on the same screen apart.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from digiq.data.features import FeatureCache
from digiq.data.transitions import check_candidate_counts
from digiq.errors import DataError
from digiq.utils.io import atomic_save_safetensors, atomic_write_json, require_complete, staged_dir

WEIGHTS_FILE = "critic.safetensors"
CONFIG_FILE = "critic.json"
TEXT_DIR = "text_encoder"


@dataclasses.dataclass
class CriticArch:
    """Everything needed to rebuild a :class:`Critic` (stored as critic.json next to the weights)."""

    state_dim: int
    action_dim: int
    q_hidden: tuple[int, ...] = (1024, 1024)
    v_hidden: tuple[int, ...] = (1024, 1024)
    layer_norm: bool = True
    aggregate: Literal["min", "max", "mean"] = "min"
    num_twins: int = 2
    # Frames of state features V (and Q, with q_input=state_action) reads: 2 = [prev, cur] (official
    # offpolicy_train_loop.py:15-25). state_dim stays the width of one frame.
    frame_stack: int = 1
    # What Q reads besides the action feature: 'state_action' = the V input first (official critic.py:157).
    q_input: Literal["action", "state_action"] = "action"
    # How Q is built from its head: 'direct' = the head's output (official); 'dueling' = V(s), detached,
    # plus the head's output, so the head only fits A(s, a) = Q(s, a) - V(s) (see Critic.q_all).
    q_param: Literal["direct", "dueling"] = "direct"
    # Text encoder (Hugging Face name or folder, "" = none) and its pooled width; see critic_text.py.
    text_encoder: str = ""
    text_dim: int = 0
    text_separate: bool = True
    text_max_length: int = 128
    text_finetune: bool = False

    @property
    def v_in(self) -> int:
        return self.frame_stack * self.state_dim + 3 * self.text_dim

    @property
    def q_in(self) -> int:
        return (self.v_in if self.q_input == "state_action" else 0) + 2 * self.text_dim + self.action_dim

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["q_hidden"], d["v_hidden"] = list(self.q_hidden), list(self.v_hidden)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CriticArch:
        d = dict(d)
        d["q_hidden"], d["v_hidden"] = tuple(d["q_hidden"]), tuple(d["v_hidden"])
        return cls(**d)


@dataclasses.dataclass
class CriticTextConfig:
    """train-critic's ``critic.text`` settings: the official critic's text inputs (critic_text.py)."""

    # Hugging Face text encoder (AutoModel name or folder; official: roberta-base, default.yaml:19) that
    # embeds the goal, the previous action's type and typed text, and each candidate's type and typed text
    # (official critic.py:16-26,156-157). Empty: no text inputs.
    encoder: str = ""
    # One encoder per role (goal, action type, typed text) as the official three roberta-base; false = one
    # encoder shared by all roles (a third of the parameters, one pass per batch).
    separate: bool = True
    # Train the encoders with the heads (official: the critic's optimiser covers them, trainer.py:54-55).
    # false = frozen: each unique string is embedded once and cached next to the features.
    finetune: bool = False
    # Tokens per string (goals and typed texts are short).
    max_length: int = 128
    # Strings per encoder pass when embedding the frozen tables.
    batch_size: int = 256


@dataclasses.dataclass
class CriticNetConfig:
    """train-critic's ``critic`` settings; :meth:`arch` turns them into a :class:`CriticArch`."""

    # Hidden widths of each twin Q head on f(s, a) (official: 10752-3840x3, with RoBERTa inputs).
    q_hidden: tuple[int, ...] = (1024, 1024)
    # Hidden widths of each twin V head on f(s) (official: 2304x3).
    v_hidden: tuple[int, ...] = (1024, 1024)
    # LayerNorm after every hidden layer (the official MLPs have none); stabilises TD on raw VLM features.
    layer_norm: bool = True
    # Twin aggregation when scoring (Q, V, advantages) and, with target_pairing=aggregate, in the TD
    # targets: min = clipped double-Q; 'max' is the official scoring rule (trainer.py:264-265).
    aggregate: Literal["min", "max", "mean"] = "min"
    # TD targets: 'aggregate' backs up both heads from the twin-aggregated target heads; 'per_head' backs
    # up head i from target head i only (q_i <- r + gamma (1-d) V_targ_i(s'), v_i <- Q_targ_i(s, a')), the
    # official backup (trainer.py:148-152,173-175).
    target_pairing: Literal["aggregate", "per_head"] = "aggregate"
    # State features as frames [prev, cur] (step 0: [cur, cur]), as official offpolicy_train_loop.py:15-25.
    frame_stack: bool = False
    # Q's input: the action feature alone, or the V input first (official critic.py:157: state_action).
    q_input: Literal["action", "state_action"] = "action"
    # 'dueling': Q(s, a) = sg[V(s)] + A(f(s, a)), so the Q head fits advantages, not the between-state
    # spread of the TD targets (beyond the paper; docs/experiments/2026-12-07-sim-v1.md measures it); 'direct' = the official Q.
    q_param: Literal["direct", "dueling"] = "direct"
    text: CriticTextConfig = dataclasses.field(default_factory=CriticTextConfig)
    # Standardise inputs with the feature mean/std of the training split (stored inside the critic).
    normalize_inputs: bool = True

    def arch(self, state_dim: int, action_dim: int) -> CriticArch:
        """The architecture these settings give on features of widths ``state_dim`` / ``action_dim``."""
        return CriticArch(
            state_dim=state_dim, action_dim=action_dim, q_hidden=tuple(self.q_hidden),
            v_hidden=tuple(self.v_hidden), layer_norm=self.layer_norm, aggregate=self.aggregate,
            frame_stack=2 if self.frame_stack else 1, q_input=self.q_input, q_param=self.q_param,
            text_encoder=self.text.encoder, text_separate=self.text.separate,
            text_max_length=self.text.max_length, text_finetune=self.text.finetune,
        )  # fmt: skip


class EnsembleMLP(nn.Module):
    """``T`` independent MLPs ``in -> hidden... -> 1`` evaluated as batched matmuls: (..., in) -> (..., T).

    Layer weights are (T, in, out); each twin is initialised like ``nn.Linear`` (U(-1/sqrt(in), 1/sqrt(in)))
    from its own random draws. LayerNorm (optional) has per-twin affine parameters.
    """

    def __init__(self, in_dim: int, hidden: tuple[int, ...], num: int = 2, layer_norm: bool = True) -> None:
        super().__init__()
        dims = [in_dim, *hidden, 1]
        self.num = num
        self.layer_norm = layer_norm
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.ln_weights = nn.ParameterList()
        self.ln_biases = nn.ParameterList()
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            bound = 1.0 / math.sqrt(d_in)
            self.weights.append(nn.Parameter(torch.empty(num, d_in, d_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(num, 1, d_out).uniform_(-bound, bound)))
        if layer_norm:
            for h in hidden:
                self.ln_weights.append(nn.Parameter(torch.ones(num, 1, h)))
                self.ln_biases.append(nn.Parameter(torch.zeros(num, 1, h)))

    def layer_shapes(self) -> list[tuple[int, int]]:
        return [(int(w.shape[1]), int(w.shape[2])) for w in self.weights]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        h = x.reshape(1, -1, x.shape[-1])  # (1, B, in): broadcast over the twin dim in the first matmul
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(b, h.expand(self.num, -1, -1) if i == 0 else h, w)  # (T, B, out)
            if i < last:
                if self.layer_norm:
                    h = torch.addcmul(self.ln_biases[i], F.layer_norm(h, h.shape[-1:]), self.ln_weights[i])
                h = F.relu(h)
        return h.squeeze(-1).transpose(0, 1).reshape(*lead, self.num)


def aggregate_twins(values: torch.Tensor, how: str) -> torch.Tensor:
    """(..., T) -> (...): ``min`` (default, clipped double-Q), ``max`` (official) or ``mean``."""
    if how == "min":
        return values.amin(dim=-1)
    if how == "max":
        return values.amax(dim=-1)
    if how == "mean":
        return values.mean(dim=-1)
    raise ValueError(f"unknown twin aggregation {how!r}; use min, max or mean")


class Critic(nn.Module):
    """Twin Q heads on f(s, a) and twin V heads on f(s), with stored input normalisation."""

    def __init__(self, arch: CriticArch, text: nn.Module | None = None) -> None:
        super().__init__()
        self.arch = arch
        if bool(arch.text_encoder) != (text is not None):
            raise ValueError("a critic with text_encoder set needs its TextEncoders (and one without, none)")
        self.text = text
        if text is not None and not arch.text_finetune:
            text.requires_grad_(False)
        self.q_net = EnsembleMLP(arch.q_in, tuple(arch.q_hidden), arch.num_twins, arch.layer_norm)
        self.v_net = EnsembleMLP(arch.v_in, tuple(arch.v_hidden), arch.num_twins, arch.layer_norm)
        # Identity normalisation until set_normalization() is called with train-split statistics.
        self.register_buffer("state_mean", torch.zeros(arch.state_dim))
        self.register_buffer("state_std", torch.ones(arch.state_dim))
        self.register_buffer("action_mean", torch.zeros(arch.action_dim))
        self.register_buffer("action_std", torch.ones(arch.action_dim))

    def train(self, mode: bool = True) -> Critic:
        """Train/eval the heads; the text encoders stay in eval mode (no dropout): a string has one
        embedding per step, which embedding each unique string once per batch relies on."""
        super().train(mode)
        if self.text is not None:
            self.text.eval()
        return self

    @torch.no_grad()
    def set_normalization(
        self,
        state_mean: torch.Tensor,
        state_std: torch.Tensor,
        action_mean: torch.Tensor,
        action_std: torch.Tensor,
    ) -> None:
        """Store feature statistics; std is floored at 1e-6 so constant channels do not blow up."""
        self.state_mean.copy_(state_mean)
        self.state_std.copy_(state_std.clamp_min(1e-6))
        self.action_mean.copy_(action_mean)
        self.action_std.copy_(action_std.clamp_min(1e-6))

    def v_input(self, state_feats: torch.Tensor, state_text: torch.Tensor | None = None) -> torch.Tensor:
        """The V head's input (..., v_in): ``[state_text, normalised frames]`` (official order, critic.py:156).

        Each frame is standardised with the same single-frame statistics; text embeddings (pooled outputs,
        tanh-bounded for RoBERTa) are not normalised, so a fine-tuned encoder is not tied to stale stats.
        """
        x = state_feats.to(self.state_mean.dtype)
        if self.arch.frame_stack > 1:
            x = ((x.unflatten(-1, (self.arch.frame_stack, -1)) - self.state_mean) / self.state_std).flatten(
                -2
            )
        else:
            x = (x - self.state_mean) / self.state_std
        if self.arch.text_dim:
            if state_text is None:
                raise ValueError("this critic reads text embeddings: pass state_text")
            x = torch.cat([state_text.to(x.dtype), x], dim=-1)
        return x

    def q_all(
        self,
        action_feats: torch.Tensor,
        state_feats: torch.Tensor | None = None,
        state_text: torch.Tensor | None = None,
        action_text: torch.Tensor | None = None,
        v: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-twin Q: action feats (..., Da) (+ the state's inputs for q_input=state_action or
        q_param=dueling) -> (..., T). ``v``: this critic's V per twin on the same states, when the caller
        already has it (:meth:`forward`); a dueling Q then adds it instead of computing V again.

        ``q_param=dueling``: Q_i(s, a) = sg[V_i(s)] + A_i(f(s, a)) (a dueling parameterisation, Wang et al.
        2016, with the state value detached). Q's regression targets r + gamma V(s') vary far more between
        states than between the candidates of one state, and a head fitting them spends itself on that
        between-state part; with V(s) subtracted the head fits only what ranks the candidates. Gradients
        of J_Q reach the advantage head alone; V keeps its own loss J_V, so its fixed point is unchanged.
        """
        if self.arch.q_param == "dueling":
            if state_feats is None:
                raise ValueError("this critic's Q adds V(s) (q_param=dueling): pass state_feats")
            v = (self.v_all(state_feats, state_text) if v is None else v).detach()
            if v.dim() < action_feats.dim():  # one state for k candidates: (B, T) -> (B, 1, T)
                v = v.unsqueeze(-2)
            return v + self._q_head(action_feats, state_feats, state_text, action_text)
        return self._q_head(action_feats, state_feats, state_text, action_text)

    def _q_head(
        self,
        action_feats: torch.Tensor,
        state_feats: torch.Tensor | None,
        state_text: torch.Tensor | None,
        action_text: torch.Tensor | None,
    ) -> torch.Tensor:
        x = (action_feats.to(self.action_mean.dtype) - self.action_mean) / self.action_std
        parts = []
        if self.arch.q_input == "state_action":
            if state_feats is None:
                raise ValueError(
                    "this critic's Q reads the state too (q_input=state_action): pass state_feats"
                )
            sx = self.v_input(state_feats, state_text)
            if sx.dim() < x.dim():  # one state for k candidates: (B, Dv) -> (B, k, Dv)
                sx = sx.unsqueeze(-2).expand(*x.shape[:-1], -1)
            parts.append(sx)
        if self.arch.text_dim:
            if action_text is None:
                raise ValueError("this critic reads text embeddings: pass action_text")
            parts.append(action_text.to(x.dtype))
        return self.q_net(torch.cat([*parts, x], dim=-1) if parts else x)

    def v_all(self, state_feats: torch.Tensor, state_text: torch.Tensor | None = None) -> torch.Tensor:
        """Per-twin V: (..., F*Ds) (+ (..., 3H) text) -> (..., T)."""
        return self.v_net(self.v_input(state_feats, state_text))

    def q(self, action_feats: torch.Tensor, *args: torch.Tensor | None) -> torch.Tensor:
        """Twin-aggregated Q(s, a): (..., Da) -> (...); extra inputs as :meth:`q_all`."""
        return aggregate_twins(self.q_all(action_feats, *args), self.arch.aggregate)

    def v(self, state_feats: torch.Tensor, state_text: torch.Tensor | None = None) -> torch.Tensor:
        """Twin-aggregated V(s): (..., Ds) -> (...)."""
        return aggregate_twins(self.v_all(state_feats, state_text), self.arch.aggregate)

    def advantage(self, action_feats: torch.Tensor, state_feats: torch.Tensor) -> torch.Tensor:
        """A(s, a_i) = Q(s, a_i) - V(s) for action feats (B, N, Da) and state feats (B, Ds) -> (B, N)
        (critics without text inputs; see :func:`digiq.models.critic_text.score` otherwise)."""
        return self.q(action_feats, state_feats) - self.v(state_feats).unsqueeze(-1)

    def save(self, path: str | Path, extra: dict[str, Any] | None = None, *, overwrite: bool = False) -> Path:
        """Shorthand for :func:`save_critic`."""
        return save_critic(self, path, extra, overwrite=overwrite)

    def forward(
        self,
        state_feats: torch.Tensor,
        action_feats: torch.Tensor,
        state_text: torch.Tensor | None = None,
        action_text: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q per twin on f(s,a), V per twin on f(s)), both (B, T): one call so DDP sees every head.

        V is computed once and serves a dueling Q too."""
        v = self.v_all(state_feats, state_text)
        return self.q_all(action_feats, state_feats, state_text, action_text, v=v), v


def make_target(critic: Critic) -> Critic:
    """The target network: an exact copy of ``critic`` with gradients off (official: a fresh random init)."""
    target = copy.deepcopy(critic)
    target.requires_grad_(False)
    return target.eval()


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """Polyak averaging ``theta_targ <- (1 - tau) theta_targ + tau theta`` (parameters; buffers copied).

    The official update uses tau = 0.10 once per optimiser step (``autoui_agent.py:334-337``).
    """
    t_params = list(target.parameters())
    s_params = [p.detach() for p in source.parameters()]
    if len(t_params) != len(s_params):
        raise ValueError("soft_update: target and source have different parameter lists")
    torch._foreach_lerp_(t_params, s_params, tau)
    for tb, sb in zip(target.buffers(), source.buffers()):
        tb.copy_(sb)


def save_critic(
    critic: Critic, path: str | Path, extra: dict[str, Any] | None = None, *, overwrite: bool = False
) -> Path:
    """Write ``<path>/critic.safetensors`` + ``critic.json`` atomically (staged dir + completion marker); a
    finished critic at ``path`` is replaced only with ``overwrite``."""
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in critic.state_dict().items()}
    with staged_dir(path, overwrite=overwrite) as tmp:
        atomic_save_safetensors(state, tmp / WEIGHTS_FILE)
        if critic.text is not None:  # config + tokenizer; the weights are in WEIGHTS_FILE
            critic.text.save_config(tmp / TEXT_DIR)
        atomic_write_json(tmp / CONFIG_FILE, {"arch": critic.arch.to_json(), **(extra or {})})
    return path


def load_critic(path: str | Path, device: str | torch.device = "cpu") -> Critic:
    """Rebuild a critic written by :func:`save_critic`."""
    path = require_complete(path, "critic")
    meta = json.loads((path / CONFIG_FILE).read_text())
    arch = CriticArch.from_json(meta["arch"])
    text = None
    if arch.text_encoder:
        from digiq.models.critic_text import TextEncoders

        text = TextEncoders.load(
            str(path / TEXT_DIR), arch.text_separate, arch.text_max_length, weights=False
        )
    critic = Critic(arch, text)
    state = load_file(str(path / WEIGHTS_FILE))
    try:
        critic.load_state_dict(state)
    except RuntimeError as e:
        raise DataError(f"{path / WEIGHTS_FILE}: weights do not match {CONFIG_FILE}: {e}") from e
    return critic.to(device).eval()


def critic_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON written next to a saved critic (arch + whatever the trainer added, e.g. gamma)."""
    return json.loads((Path(path) / CONFIG_FILE).read_text())


def resolve_critic_dir(path: str | Path) -> Path:
    """A :func:`save_critic` folder, or a train-critic output_dir holding one in ``critic/``."""
    p = Path(path)
    if (p / CONFIG_FILE).exists():
        return p
    if (p / "critic" / CONFIG_FILE).exists():
        return p / "critic"
    raise DataError(f"critic not found: {p} holds neither {CONFIG_FILE} nor critic/{CONFIG_FILE}")


def open_critic_and_features(
    critic_dir: str | Path,
    features: str | Path,
    ds: Any,
    dataset: str | Path,
    candidates: list[list[str]] | None = None,
) -> tuple[Critic, FeatureCache, dict[str, Any]]:
    """A trained critic and the feature cache it will score, checked against the dataset ``ds``.

    The checks train-critic makes before training, made again before a critic is used: the cache belongs to
    this dataset (row count and Arrow fingerprint), its N fits the candidate lists (when given), and its
    widths are the critic's, so a mismatch is a DataError naming both sides instead of a matmul shape error
    or, worse, silently scoring another dataset's features. Returns ``(critic, cache, critic metadata)``.
    """
    cdir = resolve_critic_dir(critic_dir)
    cache = FeatureCache.open(features)
    cache.check_against(len(ds), dataset_path=dataset, fingerprint=getattr(ds, "_fingerprint", None))
    if candidates is not None:
        check_candidate_counts(candidates, cache.num_candidates, dataset, features, ds)
    critic = load_critic(cdir)
    if (cache.state_dim, cache.action_dim) != (critic.arch.state_dim, critic.arch.action_dim):
        raise DataError(
            f"feature dims of {features} (state {cache.state_dim}, action {cache.action_dim}) do not match "
            f"the critic {cdir} (state {critic.arch.state_dim}, action {critic.arch.action_dim}); "
            "was the cache made with another model/layer than the critic was trained on?"
        )
    return critic, cache, critic_metadata(cdir)
