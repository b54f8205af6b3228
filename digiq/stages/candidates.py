"""``digiq candidates``: N-1 extra actions per state, stored in the dataset's ``candidates`` column.

    digiq candidates dataset=data/sim output_dir=data/sim_cands source=policy policy=runs/bc/policy
    digiq candidates dataset=data/sim output_dir=data/sim_cands source=sim num_candidates=8

Index 0 is always the dataset action (the official also forces it into the set: DigiRL-agent/digiq @ 8181379,
``digiq/algorithms/digiq/trainer.py:248-250``); indices 1..N-1 are samples from pi_beta. ``source: policy``
samples a behaviour-cloned VLM policy (an export of ``digiq train-bc``, or any VLM folder) at ``temperature``
(official: AutoUI at 1.2, ``get_more_actions_batched.py:77``) and re-samples invalid outputs up to
``max_resamples`` times (official: 3), keeping the last draw when all fail (invalid candidates get A = 0 in
Best-of-N). ``source: sim`` (any registered environment with an offline candidate sampler) uses that
environment's scripted behaviour policy (needs ``state_key``).
Deterministic under ``seed``; the new dataset is written to a new folder atomically.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from digiq.actions import parse_action
from digiq.config import check, to_dict
from digiq.data.schema import FEATURES, dataset_info, decode_batch, load_dataset, save_dataset, undecoded_view
from digiq.envs.registry import config_class, get_env
from digiq.models.policy import generate_actions, load_policy, prefill_policy, sample_actions
from digiq.training.accelerator import make_accelerator
from digiq.utils.io import config_fingerprint, plan_output
from digiq.utils.logging import get_logger

log = get_logger(__name__)
# The simulator's sections (YAMLs and overrides such as sim.benchmark=v2).
SimConfig, BehaviourConfig = config_class("sim"), config_class("sim", behaviour=True)
# Splits its work over the processes of a launcher (digiq.cli).
DISTRIBUTED = True


@dataclasses.dataclass
class Config:
    # Input dataset folder (digiq schema).
    dataset: str = "data/sim"
    # Output dataset folder (a new folder; the input is never modified).
    output_dir: str = "data/sim_candidates"
    # Candidates per state INCLUDING the dataset action at index 0 (official: 16).
    num_candidates: int = 16
    # policy = sample a VLM policy checkpoint; sim (a registered environment with an offline candidate
    # sampler) = that environment's scripted behaviour policy, at the rows' state_key.
    source: str = "policy"
    # The policy (source=policy): an exported policy folder (runs/bc/policy) or any VLM folder / hub id.
    policy: str = ""
    # Sampling temperature of the policy (official: 1.2).
    temperature: float = 1.2
    # Re-sample an invalid output up to this many times (official: 3).
    max_resamples: int = 3
    # States per seeded batch: the samples of a batch derive from (seed, batch index, attempt).
    batch_size: int = 16
    # Seeded batches decoded together (each keeps its own seeds, so the candidates do not depend on it):
    # larger calls spread the per-token cost of a forward pass over more rows, and need that many times the
    # memory. 0 = 4 on the CPU, 1 on a GPU (where batch_size is sized to the memory).
    batches_per_call: int = 0
    # Where the policy runs ('auto' = a GPU when visible) and its weights' dtype ('auto' = bfloat16 on a
    # GPU, float32 on the CPU).
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Use only the first max_rows rows (0 = all); for smoke runs. The output holds only those rows.
    max_rows: int = 0
    seed: int = 0
    # Replace a finished output at output_dir instead of refusing it.
    overwrite: bool = False
    sim: SimConfig = dataclasses.field(default_factory=SimConfig)
    behaviour: BehaviourConfig = dataclasses.field(default_factory=BehaviourConfig)
    # The settings of a source environment without a section here, checked against its config class.
    env_config: dict[str, Any] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        check(bool(self.dataset) and bool(self.output_dir), "dataset and output_dir must be set")
        check(self.num_candidates >= 1, "num_candidates must be >= 1 (1 = the dataset action only)")
        check(self.source != "policy" or bool(self.policy), "source=policy needs policy=<folder>")
        check(self.temperature > 0, "temperature must be > 0")
        check(self.max_resamples >= 0 and self.batch_size > 0, "max_resamples >= 0, batch_size > 0")
        check(self.batches_per_call >= 0, "batches_per_call must be >= 0 (0 = auto)")
        check(
            Path(self.dataset).resolve() != Path(self.output_dir).resolve(),
            "output_dir must differ from dataset",
        )
        if self.source != "policy":
            spec = get_env(self.source)  # an unknown name lists the registered ones
            check(
                spec.candidates is not None,
                f"source={self.source}: that environment has no offline candidate sampler; use source=policy",
            )
            spec.validate(*spec.settings(self))


def policy_candidates(ds, cfg: Config, accelerator: Accelerator) -> tuple[list[list[str]], int]:
    """[dataset action] + n-1 samples of the policy; returns the lists and the number of invalid draws left.

    Under a launcher, process r samples batches r, r + W, ... on its own device and the main process
    gathers them; a batch's seeds depend only on (seed, batch, attempt), so the result is the same for any
    number of processes (and of ``batches_per_call``)."""
    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device if cfg.device == "auto" else cfg.device
    model, processor, spec = load_policy(cfg.policy, device, cfg.dtype)
    n_extra = cfg.num_candidates - 1
    actions = ds["action"]
    out = [[a] for a in actions]
    if n_extra == 0:
        return out, 0
    view = undecoded_view(ds, ["screenshot", "observation"])  # decoded per batch with named errors
    starts = list(range(0, len(ds), cfg.batch_size))
    mine_batches = list(range(rank, len(starts), world))
    mine: list[tuple[list[int], list[list[str]]]] = []
    bar = tqdm(
        desc="candidates (policy)", unit="batch", total=len(starts), disable=not accelerator.is_main_process
    )
    per_call = cfg.batches_per_call or (4 if torch.device(device).type == "cpu" else 1)
    for c in range(0, len(mine_batches), per_call):
        batches = mine_batches[c : c + per_call]
        rows = [list(range(starts[b], min(len(ds), starts[b] + cfg.batch_size))) for b in batches]
        got = decode_batch(view[[r for rs in rows for r in rs]], str(cfg.dataset))
        shots, obs = got["screenshot"], got["observation"]
        # Each state's prompt (image included) runs once for its samples and its re-samples alike.
        pre = prefill_policy(model, processor, shots, obs, spec)

        call = _Call(model, processor, spec, cfg, pre, shots, obs, batches, [len(rs) for rs in rows])
        samples = call.draw([list(range(len(rs))) for rs in rows], n_extra, 0)
        for attempt in range(1, cfg.max_resamples + 1):
            bad = [
                [
                    (i, j)
                    for i in range(len(rs))
                    for j in range(n_extra)
                    if not parse_action(sm[i][j]).is_valid
                ]
                for rs, sm in zip(rows, samples)
            ]
            if not any(bad):
                break
            redo = call.draw([[i for i, _ in bd] for bd in bad], 1, attempt)
            for bd, sm, rd in zip(bad, samples, redo):
                for (i, j), r in zip(bd, rd):
                    sm[i][j] = r[0]
        mine.extend(zip(rows, samples))
        bar.update(world * len(batches))
    bar.close()
    done = gather_object(mine) if world > 1 else mine
    invalid_left = 0
    for rows, samples in done:
        for i, r in enumerate(rows):
            out[r].extend(samples[i])
            invalid_left += sum(not parse_action(s).is_valid for s in samples[i])
    return out, invalid_left


@dataclasses.dataclass
class _Call:
    """The seeded batches decoded together: their states' prompts run once (``pre``; None = ``generate``)."""

    model: Any
    processor: Any
    spec: Any
    cfg: Config
    pre: Any
    shots: list
    obs: list
    batches: list[int]
    sizes: list[int]

    def draw(self, states: list[list[int]], k: int, attempt: int) -> list[list[list[str]]]:
        """k actions for each listed state (indices within its batch) of each batch of the call."""
        cfg = self.cfg
        # Seeds derive from (seed, batch, attempt): the result does not depend on what ran before.
        seeds = [_seed(cfg.seed, b, attempt) for b in self.batches]
        offset = np.cumsum([0, *self.sizes])
        if self.pre is None:
            res = []
            for i, sts in enumerate(states):
                sh = [self.shots[offset[i] + j] for j in sts]
                ob = [self.obs[offset[i] + j] for j in sts]
                kw = dict(seed=seeds[i], spec=self.spec)
                res.append(
                    generate_actions(self.model, self.processor, sh, ob, k, cfg.temperature, **kw)
                    if sts
                    else []
                )
            return res
        flat = sample_actions(
            self.model,
            self.processor,
            self.pre,
            [int(offset[i]) + j for i, sts in enumerate(states) for j in sts for _ in range(k)],
            self.spec,
            cfg.temperature,
            block_seeds=[(sd, len(sts) * k) for sd, sts in zip(seeds, states)],
        )
        res, at = [], 0
        for sts in states:
            res.append([flat[at + j * k : at + (j + 1) * k] for j in range(len(sts))])
            at += len(sts) * k
        return res


def _seed(seed: int, batch: int, attempt: int) -> int:
    return int(np.random.SeedSequence([seed, batch, attempt]).generate_state(1)[0])


def run(cfg: Config) -> dict[str, float]:
    plan = plan_output(
        cfg.output_dir,
        "candidates",
        overwrite=cfg.overwrite,
        fingerprint=config_fingerprint(cfg),
        resumable=False,
    )
    accelerator = make_accelerator(cpu=None if cfg.device == "auto" else cfg.device == "cpu")
    t0 = time.perf_counter()
    ds = load_dataset(cfg.dataset)
    if cfg.max_rows:
        ds = ds.select(range(min(cfg.max_rows, len(ds))))
    actions = ds["action"]
    if cfg.source != "policy":
        spec = get_env(cfg.source)
        config, behaviour = spec.settings(cfg)
        cands = spec.candidates(
            spec.open(config), behaviour, actions, ds["state_key"], cfg.num_candidates, cfg.seed
        )
        invalid = 0
    else:
        cands, invalid = policy_candidates(ds, cfg, accelerator)
    assert all(c[0] == a for c, a in zip(cands, actions))
    new = ds.remove_columns("candidates").add_column("candidates", cands, feature=FEATURES["candidates"])
    valid = np.array([[parse_action(x).is_valid for x in c[1:]] for c in cands], dtype=bool)
    distinct = np.array([len(set(c)) / len(c) for c in cands])
    info = {
        **dataset_info(cfg.dataset),
        "candidates": {
            "source": cfg.source,
            "policy": cfg.policy,
            "num_candidates": cfg.num_candidates,
            "temperature": cfg.temperature,
            "seed": cfg.seed,
        },
        "config_candidates": to_dict(cfg),
    }
    if accelerator.is_main_process:
        save_dataset(new, cfg.output_dir, info, plan=plan)
    accelerator.wait_for_everyone()
    stats = {
        "rows": float(len(new)),
        "num_candidates": float(cfg.num_candidates),
        "valid_fraction": float(valid.mean()) if valid.size else 1.0,
        "invalid_after_resampling": float(invalid),
        "distinct_fraction": float(distinct.mean()),
        "seconds": time.perf_counter() - t0,
    }
    log.info("candidates: %s", stats)
    return stats
