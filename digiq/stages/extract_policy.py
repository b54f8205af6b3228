"""Stage 3: Best-of-N policy extraction from pi_beta with a frozen critic.

    digiq extract-policy dataset=data/sim_cands features=runs/feats critic_dir=runs/critic/critic \\
        init_policy=runs/bc/policy output_dir=runs/extract
    digiq extract-policy ... num_candidates=4          # the N ablation (1 = dataset action only)
    digiq extract-policy ... scorer=q_star             # oracle: exact Q* of the simulated device
    digiq extract-policy ... scorer=q_beta             # a perfect Digi-Q critic: the behaviour's Q^beta

For every state the N stored candidates (``candidates`` column, index 0 = dataset action; feature-cache
``actions[:, i]`` = f(s, candidates[i])) are scored by the critic, and the policy imitates
``argmax_i Q(s, a_i)`` when ``Q - V`` exceeds ``threshold`` (:func:`digiq.models.policy.best_of_n`, the
official actor of DigiRL-agent/digiq @ 8181379, ``digiq/algorithms/digiq/trainer.py:248-294``: invalid
candidates get A = 0, A clamped to [0, 1], threshold 0.05 WebShop / 0.10 general). The critic is frozen, so
the selection is computed once, before training (the official re-scores 16 resampled indices per batch, the
same set for every row; with all N scored at once the result is the same selection without the sampling
noise). Training is cross-entropy on the selected action's tokens starting from pi_beta
(:func:`digiq.training.policy_loop.train_policy`), logging the token KL to pi_beta. ``extraction_loss: awr``
weights the best candidate of every state by ``exp(A / awr_beta)`` instead (the official ``awr`` knob uses
beta = 0.01).

``scorer: q_star`` replaces the learned critic by the simulator's exact Q* (V = mean Q* over the valid
candidates of the state, a Monte-Carlo V of the candidate sampler): the extraction's upper bound given the
candidates, useful to separate critic error from extraction error. ``scorer: q_beta`` scores with the
behaviour policy's own Q^beta and V^beta (the simulator's ``BehaviourValues``), the fixed point of
Digi-Q's in-sample critic: what the same extraction gives with a critic that has no approximation error.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from digiq.actions import parse_action
from digiq.config import LoraConfig, ModelConfig, WandbConfig, check, save_config
from digiq.data.schema import dataset_info, load_dataset, undecoded_view
from digiq.envs.registry import env_for_dataset
from digiq.errors import DataError
from digiq.models.critic import open_critic_and_features
from digiq.models.critic_text import build_inputs, score
from digiq.models.policy import best_of_n, read_spec
from digiq.models.vlm import inference_dtype, load_vlm
from digiq.training.accelerator import train_dtype
from digiq.training.output import begin_output
from digiq.training.policy_loop import (
    PolicyExamples,
    PolicyOptimConfig,
    TrainLoopConfig,
    start_policy_run,
    train_policy,
)
from digiq.utils.io import atomic_save_safetensors
from digiq.utils.logging import get_logger

log = get_logger(__name__)
# Splits its work over the processes of a launcher (digiq.cli).
DISTRIBUTED = True


@dataclasses.dataclass
class ExtractOptimConfig(PolicyOptimConfig):
    # Smaller than BC's: start from pi_beta and move it toward the selected actions.
    lr: float = 3e-4


@dataclasses.dataclass
class Config:
    # Dataset with candidates (digiq candidates / sim collect num_candidates>0 / import).
    dataset: str = "data/sim_candidates"
    # Feature cache aligned with the dataset rows (digiq cache-features / import); scorer=critic only.
    features: str = ""
    # Trained critic folder (digiq train-critic writes <output_dir>/critic); scorer=critic only.
    critic_dir: str = ""
    # pi_beta: the export of digiq train-bc (<output_dir>/policy).
    init_policy: str = "runs/bc/policy"
    output_dir: str = "runs/extract"
    # critic = the learned Q/V heads on cached features; q_star = the simulator's exact Q* (oracle ablation).
    # q_beta = the exact values of the simulator's default behaviour policy (a perfect Digi-Q critic).
    scorer: Literal["critic", "q_star", "q_beta"] = "critic"
    # Score the first N stored candidates ('all' = every stored one). N = 1: the dataset action only
    # (advantage-filtered BC).
    num_candidates: int | Literal["all"] = "all"
    # Imitate the best candidate when its clamped advantage exceeds this (official 0.05 webshop, 0.10 general).
    threshold: float = 0.10
    # best_of_n = the Digi-Q actor; awr = best candidate of every state weighted by exp(A / awr_beta).
    extraction_loss: Literal["best_of_n", "awr"] = "best_of_n"
    awr_beta: float = 0.05
    # Cap of the AWR weights (exp overflows quickly at small beta).
    awr_max_weight: float = 20.0
    # Discount of the exact Q* / Q^beta (scorer=q_star / q_beta); the critic's own gamma is used otherwise.
    gamma: float = 0.95
    # scorer=q_beta: behaviour actions sampled per graph state to estimate its successor distribution.
    q_beta_samples: int = 100
    # How init_policy is loaded for training (dtype, attention, gradient checkpointing); its name_or_path
    # stays empty: the model is init_policy. The frozen pi_beta copy for the KL log is loaded in bfloat16
    # on a GPU (it only runs forwards), in float32 on the CPU.
    model: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(name_or_path=""))
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    train: TrainLoopConfig = dataclasses.field(default_factory=lambda: TrainLoopConfig(epochs=2.0))
    optim: ExtractOptimConfig = dataclasses.field(default_factory=ExtractOptimConfig)
    # Log the token-level KL(pi || pi_beta) on training batches (keeps a frozen copy of pi_beta in memory).
    log_kl: bool = True
    seed: int = 0
    # Continue from the newest checkpoint in output_dir (set by --resume).
    resume: bool = False
    # Replace a finished (or interrupted) run in output_dir instead of refusing it.
    overwrite: bool = False
    wandb: WandbConfig = dataclasses.field(default_factory=WandbConfig)

    def validate(self) -> None:
        check(bool(self.dataset) and bool(self.init_policy), "dataset and init_policy must be set")
        check(
            self.model.name_or_path in ("", self.init_policy),
            "model.name_or_path is not used (the policy trained is init_policy); leave it empty",
        )
        if self.scorer == "critic":
            check(
                bool(self.features) and bool(self.critic_dir),
                "scorer=critic needs features=<cache> and critic_dir=<dir>",
            )
        check(
            self.num_candidates == "all" or self.num_candidates >= 1,
            f"num_candidates must be >= 1 or 'all', got {self.num_candidates!r}",
        )
        # q_star's V is the mean Q* over the state's candidates: with one candidate every advantage is 0 and no
        # state could pass the filter. q_beta and the critic have a V of their own and do have an N = 1 arm.
        check(
            self.scorer != "q_star" or self.num_candidates != 1,
            "scorer=q_star scores against the mean over the candidates, so num_candidates=1 leaves nothing to "
            "imitate; use num_candidates >= 2, or scorer=q_beta for an exact scorer at N = 1",
        )
        check(self.awr_beta > 0 and self.awr_max_weight > 0, "awr_beta and awr_max_weight must be > 0")
        check(0 <= self.gamma < 1, "gamma must be in [0, 1)")
        check(self.q_beta_samples >= 1, f"q_beta_samples must be >= 1, got {self.q_beta_samples}")
        self.train.validate()
        self.optim.validate()


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------


def candidate_table(
    candidates: list[list[str]], actions: list[str], n: int | Literal["all"], source: str
) -> list[list[str]]:
    """The first ``n`` candidates per row (``"all"``: as many as every row has), checked: same count, index 0
    = dataset action."""
    if not candidates or any(len(c) == 0 for c in candidates):
        i = next((k for k, c in enumerate(candidates) if len(c) == 0), 0)
        raise DataError(f"{source}: row {i} has no candidates; run `digiq candidates` first")
    width = min(len(c) for c in candidates) if n == "all" else n
    for i, c in enumerate(candidates):
        if len(c) < width:
            raise DataError(f"{source}: row {i} has {len(c)} candidates, fewer than num_candidates={width}")
        if c[0] != actions[i]:
            raise DataError(
                f"{source}: row {i}: candidates[0] is not the dataset action (index 0 must be it)"
            )
    return [c[:width] for c in candidates]


@torch.no_grad()
def critic_scores(
    critic_path: str,
    features: str,
    ds: Any,
    dataset: str,
    n: int,
    candidates: list[list[str]],
    chunk: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q (R, n), v (R,), feature-valid (R, n)) from a trained critic on the cached features, after the
    checks of :func:`digiq.models.critic.open_critic_and_features`."""
    critic, cache, _ = open_critic_and_features(critic_path, features, ds, dataset, candidates)
    if cache.num_candidates < n:
        raise DataError(
            f"{features}: the cache holds {cache.num_candidates} candidates per row, fewer than {n}"
        )
    num_rows = len(ds)
    # Text / frame-stacked inputs when the critic reads them; each unique string embedded once.
    inputs = build_inputs(critic, cache.state, cache.actions, ds, features)
    qs, vs = [], []
    for s in range(0, num_rows, chunk):
        q, v = score(critic, inputs, torch.arange(s, min(s + chunk, num_rows)), slice(0, n))
        qs.append(q)
        vs.append(v)
    valid = cache.valid[:, :n] if cache.valid is not None else torch.ones(num_rows, n, dtype=torch.bool)
    return torch.cat(qs), torch.cat(vs), valid


def q_star_scores(
    state_keys: list[str],
    table: list[list[str]],
    gamma: float,
    valid: torch.Tensor,
    source: str | None = None,
):
    """Exact Q* of the environment that wrote the rows (``source``, the dataset's; None = the simulator);
    V = mean Q* over the state's valid candidates."""
    spec = env_for_dataset(source)
    q_star = spec.require("q_star", "scorer=q_star")(spec.open())
    q = torch.zeros(len(table), len(table[0]))
    for i, (key, cands) in enumerate(zip(state_keys, table)):
        if not key:
            raise DataError(f"row {i}: empty state_key; scorer=q_star needs simulated data")
        q[i] = torch.as_tensor(np.asarray(q_star(key, cands, gamma), dtype=np.float32))
    w = valid.float()
    v = (q * w).sum(1) / w.sum(1).clamp_min(1.0)
    return q, v


def q_beta_scores(
    state_keys: list[str],
    table: list[list[str]],
    gamma: float,
    samples: int,
    seed: int,
    source: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The default behaviour policy's Q^beta on the candidates and its V^beta(s): Digi-Q's critic at its
    fixed point (J_V backs up the dataset action, so V -> V^beta and Q -> Q^beta). ``source``: the
    environment that wrote the rows (None = the simulator)."""
    spec = env_for_dataset(source)
    bv = spec.require("behaviour_values", "scorer=q_beta")(spec.open(), gamma, samples, seed)
    q = torch.zeros(len(table), len(table[0]))
    v = torch.zeros(len(table))
    for i, (key, cands) in enumerate(tqdm(list(zip(state_keys, table)), desc="Q^beta", leave=False)):
        if not key:
            raise DataError(f"row {i}: empty state_key; scorer=q_beta needs simulated data")
        q[i] = torch.as_tensor(bv.q(key, cands).astype(np.float32))
        v[i] = bv.v(key)
    return q, v


def select(
    q: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, cfg: Config
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, dict[str, float]]:
    """(rows, candidate index, advantage, weights, stats) of the states to imitate."""
    index, adv, keep = best_of_n(q, v, valid, cfg.threshold)
    raw_adv = (q - v.unsqueeze(1)).gather(1, index.unsqueeze(1)).squeeze(1)
    stats = {
        "kept_fraction": float(keep.float().mean()),
        "mean_advantage_kept": float(adv[keep].mean()) if keep.any() else 0.0,
        "mean_advantage_best": float(adv.mean()),
        "mean_advantage_dataset": float((q[:, 0] - v).mean()),
        "kept_non_dataset_fraction": float((index[keep] != 0).float().mean()) if keep.any() else 0.0,
        "valid_candidate_fraction": float(valid.float().mean()),
    }
    if cfg.extraction_loss == "best_of_n":
        rows = torch.nonzero(keep).squeeze(1)
        weights = None
    else:  # AWR on every state whose best candidate is valid
        ok = valid.gather(1, index.unsqueeze(1)).squeeze(1)
        rows = torch.nonzero(ok).squeeze(1)
        weights = (
            torch.exp(raw_adv[rows] / cfg.awr_beta).clamp(max=cfg.awr_max_weight).numpy().astype(np.float32)
        )
    return rows.numpy(), index.numpy(), adv.numpy(), weights, stats


def run(cfg: Config) -> dict[str, Any]:
    out, accelerator, plan = start_policy_run(cfg, "extract-policy")
    is_main, resume_from = accelerator.is_main_process, plan.resume_from
    ds = load_dataset(cfg.dataset)
    cols = ds.select_columns(["action", "candidates", "state_key"])
    actions = cols["action"]
    table = candidate_table(cols["candidates"], actions, cfg.num_candidates, cfg.dataset)
    n = len(table[0])
    valid = torch.tensor([[parse_action(a).is_valid for a in row] for row in table], dtype=torch.bool)
    if cfg.scorer == "critic":
        q, v, fvalid = critic_scores(
            cfg.critic_dir, cfg.features, ds, str(cfg.dataset), n, list(cols["candidates"])
        )
        valid &= fvalid
    elif cfg.scorer == "q_star":
        q, v = q_star_scores(
            cols["state_key"], table, cfg.gamma, valid, dataset_info(cfg.dataset).get("source")
        )
    else:
        q, v = q_beta_scores(
            cols["state_key"],
            table,
            cfg.gamma,
            cfg.q_beta_samples,
            cfg.seed,
            dataset_info(cfg.dataset).get("source"),
        )
    rows, index, adv, weights, stats = select(q, v, valid, cfg)
    stats["num_candidates"] = float(n)
    log.info("extract-policy selection: %s", {k: round(x, 4) for k, x in stats.items()})
    if len(rows) == 0:
        raise DataError(
            f"no state passes the advantage filter (threshold={cfg.threshold}); lower threshold or check the critic"
        )
    begin_output(plan, accelerator)
    if is_main:
        save_config(cfg, out)
        atomic_save_safetensors(
            {
                "index": torch.as_tensor(index),
                "advantage": torch.as_tensor(adv),
                "q": q.float(),
                "v": v.float(),
            },
            out / "selection.safetensors",
        )
    targets = [table[int(r)][int(index[int(r)])] for r in rows]
    examples = PolicyExamples(
        undecoded_view(ds, ["screenshot", "observation"]),
        rows.astype(np.int64),
        targets,
        weights,
        source=str(cfg.dataset),
    )

    dtype = train_dtype(cfg.model.dtype, accelerator, frozen_base=cfg.lora.enabled)
    policy_cfg = dataclasses.replace(cfg.model, name_or_path=cfg.init_policy, dtype=dtype)
    model, processor = load_vlm(policy_cfg, cfg.lora, for_training=True)
    spec = read_spec(cfg.init_policy)
    ref = None
    if cfg.log_kl:
        ref_dtype = inference_dtype("auto", accelerator.device)
        ref = load_vlm(dataclasses.replace(policy_cfg, dtype=ref_dtype, gradient_checkpointing=False))[0]
    export_info = {
        "stage": "extract-policy",
        "scorer": cfg.scorer,
        "threshold": cfg.threshold,
        "num_candidates": n,
        "extraction_loss": cfg.extraction_loss,
        "init_policy": cfg.init_policy,
    }
    return train_policy(
        accelerator, cfg, model, processor, spec, examples, resume_from, export_info, ref_model=ref,
        first_logs={f"select/{k}": x for k, x in stats.items()}, extra_metrics=stats, desc="extract-policy",
    )  # fmt: skip
