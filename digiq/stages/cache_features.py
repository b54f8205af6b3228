"""Stage 2a: cache frozen-VLM features f(s_t) and f(s_t, a_i) for every dataset row (prefix-shared, sharded).

    digiq cache-features dataset=data/sim model.name_or_path=runs/finetune/model output_dir=runs/feats
    torchrun --standalone --nproc_per_node 2 -m digiq cache-features ...      # 2 processes (CPU or GPU)
    accelerate launch --multi_gpu --num_processes 8 -m digiq cache-features ...

The official pipeline gets these features from gradio endpoints (about 8 h) or a forked vLLM (about 1 h),
sampling at temperature 0.2 (DigiRL-agent/digiq @ 8181379,
``postprocess_data/vlm_infer/gradio_based/host.py:98``). Here they are exact and deterministic
(:mod:`digiq.models.featurize`): with the ``text`` rendering the image + goal prefix is encoded once per state
and its KV cache is shared by the state-only prompt and all N action suffixes.

Output: the feature-cache format of :mod:`digiq.data.features` (``manifest.json``, ``shard-XXXXX.safetensors``,
``_COMPLETE``). Rows are cut into fixed shards of ``shard_rows``; rank r of W computes shards r, r+W, ...,
each written atomically. The output folder's run record (:func:`digiq.utils.io.plan_output`) holds the
identity of the run (model, layer, rendering, dataset fingerprint, ...) while shards accumulate, so a killed
run continues with ``--resume`` and recomputes only missing or broken shards; a different identity is
refused unless ``overwrite=true``. The main process writes the manifest and the completion marker last, after a barrier and after checking every
shard, so readers never see a partial cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
import time
from pathlib import Path
from typing import Any, Literal

import torch

from digiq.config import ModelConfig, check, save_config
from digiq.data.features import DTYPES, shard_name, write_manifest, write_shard
from digiq.data.schema import decode_batch, load_dataset, undecoded_view
from digiq.errors import DataError
from digiq.models.featurize import Featurizer
from digiq.models.prompts import previous_action_from_observation
from digiq.models.vlm import inference_dtype, load_vlm, resolve_layer
from digiq.training.accelerator import make_accelerator
from digiq.utils.io import begin_output, finish_output, plan_output
from digiq.utils.logging import get_logger

log = get_logger(__name__)
# Splits its work over the processes of a launcher (digiq.cli).
DISTRIBUTED = True

# safetensors dtype names of our storage dtypes (checked from the shard header without loading it).
ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


@dataclasses.dataclass
class Config:
    # Dataset folder (digiq schema). Reads screenshot, task, observation, action and candidates.
    dataset: str = ""
    # Output folder of the feature cache (written in place, shard by shard; see the module doc).
    output_dir: str = "runs/features"
    # The frozen VLM: Stage 1's `<finetune_output>/model` (the finetune output folder itself also works),
    # any local save_pretrained folder or hub id, or 'tiny:llava' for an un-fine-tuned baseline. Its dtype
    # 'auto' computes in bfloat16 on a GPU (the frozen model only runs forwards), float32 on the CPU.
    model: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(dtype="auto"))
    # Text-model layer whose hidden state is the feature (output_hidden_states indexing: 0 = embeddings,
    # k = output of decoder layer k, -1 = last layer after the final norm); null = 3/4 of the depth.
    layer: int | None = None
    # 'text' = action in the prompt only (prefix KV cache shared across candidates); 'overlay' = cursor /
    # arrow drawn on the screenshot (official; full forwards, the image differs per action). Use the
    # rendering Stage 1 was trained with.
    rendering: Literal["text", "overlay"] = "text"
    # Share the prefix KV cache across candidates (text rendering, causal families). false = full forwards.
    prefix_sharing: bool = True
    # Storage dtype of the cache (float16 halves the disk); compute runs in model.dtype.
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    # Rows per shard: the unit of work of a process and of resuming.
    shard_rows: int = 256
    # Prompts per forward pass (suffixes on one shared prefix, or full prompts).
    batch_size: int = 32
    # 'auto' = CUDA when visible, else CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # DataLoader workers that read and decode the screenshots while the model runs (null: 4 on a GPU, none
    # on the CPU, where they would take the model's cores).
    num_workers: int | None = None
    # Continue an interrupted run of the same identity (its finished shards are kept).
    resume: bool = False
    # Delete whatever is in output_dir (another run's shards or a finished cache) and start over.
    overwrite: bool = False
    # Debug: stop each process after computing this many shards, leaving an in-progress cache (a "kill").
    max_shards: int | None = None

    def validate(self) -> None:
        check(bool(self.dataset), "dataset must be set (a dataset folder)")
        check(bool(self.output_dir), "output_dir must be set")
        check(self.shard_rows > 0, f"shard_rows must be > 0, got {self.shard_rows}")
        check(self.batch_size > 0, f"batch_size must be > 0, got {self.batch_size}")
        check(self.num_workers is None or self.num_workers >= 0, "num_workers must be >= 0 or null")
        check(self.max_shards is None or self.max_shards >= 0, "max_shards must be >= 0 or null")
        check(
            Path(self.dataset).resolve() != Path(self.output_dir).resolve(),
            "output_dir must differ from dataset",
        )


# --------------------------------------------------------------------------------------------------
# Run identity and shard checks
# --------------------------------------------------------------------------------------------------


def resolve_model_path(name: str) -> str:
    """Accept Stage 1's output folder (holding ``model/``) as well as the model folder itself."""
    p = Path(name)
    if p.is_dir() and not (p / "config.json").is_file() and (p / "model" / "config.json").is_file():
        return str(p / "model")
    return name


def _model_stamp(name: str) -> list[Any]:
    """Sizes and mtimes of a local model's weight files: a re-trained model at the same path differs."""
    p = Path(name)
    if not p.is_dir():
        return []
    return sorted(
        [f.name, f.stat().st_size, int(f.stat().st_mtime)]
        for f in p.iterdir()
        if f.suffix in (".safetensors", ".bin") or f.name == "config.json"
    )


def run_identity(
    cfg: Config, model: ModelConfig, layer: int, fingerprint: str, num_rows: int, n: int
) -> dict:
    """Everything that determines the cached numbers; a resumed run must match it exactly. ``model`` is the
    model as loaded (its path resolved, its dtype too: 'auto' differs between a GPU and a CPU)."""
    model_path = model.name_or_path
    ident = {
        "model": model_path,
        "model_stamp": _model_stamp(model_path),
        "model_dtype": model.dtype,
        "tiny_seed": model.tiny_seed if model_path.startswith("tiny:") else None,
        "layer": layer,
        "rendering": cfg.rendering,
        "dataset_fingerprint": fingerprint,
        "num_rows": num_rows,
        "num_candidates": n,
        "dtype": cfg.dtype,
        "shard_rows": cfg.shard_rows,
    }
    blob = json.dumps(ident, sort_keys=True).encode()
    ident["config_hash"] = hashlib.sha256(blob).hexdigest()[:16]
    return ident


def shard_header(path: Path) -> dict[str, Any] | None:
    """The safetensors header of a shard if the file is whole (size matches the header), else None.

    Reads only the header, so checking a large cache before resuming costs no tensor I/O.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                return None
            (hlen,) = struct.unpack("<Q", raw)
            if hlen > size - 8:
                return None
            header = json.loads(f.read(hlen))
    except (OSError, ValueError):
        return None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    if 8 + hlen + max(ends, default=0) != size:
        return None
    return header


def shard_ok(path: Path, rows: int, n: int, dtype: str, with_valid: bool) -> bool:
    """True if ``path`` is a whole shard of ``rows`` rows and ``n`` candidates in ``dtype``."""
    h = shard_header(path)
    if h is None or "state" not in h or "actions" not in h:
        return False
    st, ac = h["state"], h["actions"]
    if st["dtype"] != ST_DTYPES[dtype] or ac["dtype"] != ST_DTYPES[dtype]:
        return False
    if (
        len(st["shape"]) != 2
        or st["shape"][0] != rows
        or ac["shape"][:2] != [rows, n]
        or len(ac["shape"]) != 3
    ):
        return False
    return ("valid" in h) == with_valid


# --------------------------------------------------------------------------------------------------
# Computing one shard
# --------------------------------------------------------------------------------------------------


def row_actions(action: str, candidates: list[str]) -> list[str]:
    """The actions of one row: index 0 = the dataset action, then ``candidates[1:]`` (index 0 is the same)."""
    return [action, *list(candidates)[1:]]


class _ShardRows(torch.utils.data.Dataset):
    """The featurizer's input for dataset row ``start + i``: (screenshot, goal, previous action, actions).
    Images are decoded here (not by datasets), so a missing or corrupt screenshot names its trajectory /
    step; in DataLoader workers this runs beside the model (a DataLoader keeps the order)."""

    COLUMNS = ["screenshot", "task", "observation", "action", "candidates", "traj_id", "step_id"]

    def __init__(self, ds, start: int, end: int) -> None:
        self.view, self.source = undecoded_view(ds, self.COLUMNS), ds_path(ds)
        self.start, self.end = start, end

    def __len__(self) -> int:
        return self.end - self.start

    def __getitem__(self, i: int):
        r = {k: v[0] for k, v in decode_batch(self.view[[self.start + i]], self.source).items()}
        acts = row_actions(r["action"], r["candidates"] or [])
        return r["screenshot"], r["task"], previous_action_from_observation(r["observation"]), acts


def _as_is(item):
    return item


def compute_shard(
    featurizer, ds, start: int, end: int, n: int, dtype: torch.dtype, pbar=None, num_workers: int = 0
):
    """Features of dataset rows ``start..end``: state (n_rows, D), actions (n_rows, N, D), valid (n_rows, N)."""
    rows_in = torch.utils.data.DataLoader(
        _ShardRows(ds, start, end),
        batch_size=None,
        collate_fn=_as_is,
        num_workers=num_workers,
        prefetch_factor=4 if num_workers else None,
        generator=torch.Generator(),  # the workers' seed: not drawn from the caller's RNG stream
    )
    rows, batch = [], []

    def flush():
        for feats in featurizer.features_many(batch):
            rows.append(feats)
            if pbar is not None:
                pbar.update(1)
        batch.clear()

    try:
        for item in rows_in:
            batch.append(item)
            if featurizer.prefix_sharing or sum(len(b[3]) + 1 for b in batch) >= featurizer.batch_size:
                flush()
    except DataError as e:
        if not num_workers:
            raise
        # A worker's DataError comes back with the worker's traceback in its message: keep the one line.
        raise DataError(str(e).strip().splitlines()[-1].split("DataError: ", 1)[-1]) from None
    if batch:
        flush()
    D = rows[0][0].shape[-1]
    state = torch.zeros(end - start, D, dtype=dtype)
    actions = torch.zeros(end - start, n, D, dtype=dtype)
    valid = torch.zeros(end - start, n, dtype=torch.bool)
    for i, (s, a) in enumerate(rows):
        state[i] = s.float().cpu().to(dtype)
        actions[i, : a.shape[0]] = a.float().cpu().to(dtype)
        valid[i, : a.shape[0]] = True
    for name, t in (("state", state), ("actions", actions)):
        bad = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)
        if bool(bad.any()):
            row = start + int(bad.nonzero()[0, 0])
            raise DataError(f"row {row}: the VLM produced a non-finite {name} feature (dtype {dtype})")
    return state, actions, valid


def ds_path(ds) -> str:
    files = getattr(ds, "cache_files", None) or []
    return str(Path(files[0]["filename"]).parent) if files else "dataset"


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------


def run(cfg: Config) -> dict:
    """Cache the features of ``cfg.dataset`` into ``cfg.output_dir``; returns a summary dict.

    Summary keys: ``status`` ('complete' | 'incomplete' | 'already complete'), ``computed_shards`` and
    ``skipped_shards`` (this process), ``rows_per_s``, ``num_shards``.
    """
    from tqdm.auto import tqdm

    cfg.validate()
    out = Path(cfg.output_dir)
    acc = make_accelerator(cpu=None if cfg.device == "auto" else cfg.device == "cpu")
    is_main, rank, world = acc.is_main_process, acc.process_index, acc.num_processes

    ds = load_dataset(cfg.dataset)
    R = len(ds)
    if R == 0:
        raise DataError(f"{cfg.dataset}: the dataset is empty")
    sizes = [max(1, len(c)) for c in ds.select_columns(["candidates"])["candidates"]]
    N = max(sizes)
    ragged = min(sizes) != N
    fingerprint = ds._fingerprint

    model_path = resolve_model_path(cfg.model.name_or_path)
    model_cfg = dataclasses.replace(
        cfg.model,
        name_or_path=model_path,
        gradient_checkpointing=False,
        dtype=inference_dtype(cfg.model.dtype, acc.device),
    )
    model, processor = load_vlm(model_cfg)
    model.eval().to(acc.device)
    layer = resolve_layer(model, cfg.layer)
    ident = run_identity(cfg, model_cfg, layer, fingerprint, R, N)

    # Every process decides (they reach the same decision) before anyone writes; the main one acts.
    fingerprint = {k: v for k, v in ident.items() if k != "config_hash"}
    plan = plan_output(
        out, "cache-features", resume=cfg.resume, overwrite=cfg.overwrite, fingerprint=fingerprint
    )
    acc.wait_for_everyone()  # nobody writes before every process has looked at the folder
    num_shards = (R + cfg.shard_rows - 1) // cfg.shard_rows
    if plan.finished:
        log.info("%s already holds this feature cache (config %s); nothing to do", out, ident["config_hash"])
        return {
            "status": "already complete",
            "computed_shards": [],
            "skipped_shards": [],
            "num_shards": num_shards,
        }
    if is_main:
        if plan.action == "resume":
            log.info("resuming the interrupted cache in %s (config %s)", out, ident["config_hash"])
        begin_output(plan)
    acc.wait_for_everyone()

    dtype = DTYPES[cfg.dtype]
    mine = list(range(rank, num_shards, world))
    bounds = {s: (s * cfg.shard_rows, min(R, (s + 1) * cfg.shard_rows)) for s in range(num_shards)}
    todo = [
        s
        for s in mine
        if not shard_ok(out / shard_name(s), bounds[s][1] - bounds[s][0], N, cfg.dtype, ragged)
    ]
    skipped = [s for s in mine if s not in todo]
    if cfg.max_shards is not None:
        todo = todo[: cfg.max_shards]
    workers = cfg.num_workers if cfg.num_workers is not None else (4 if acc.device.type == "cuda" else 0)
    featurizer = Featurizer(
        model,
        processor,
        layer=layer,
        rendering=cfg.rendering,
        batch_size=cfg.batch_size,
        prefix_sharing=cfg.prefix_sharing,
    )
    log.info(
        "rank %d/%d: %d shard(s) to compute, %d already done (%d rows, N=%d, layer %d, %s rendering, "
        "prefix sharing %s)",
        rank,
        world,
        len(todo),
        len(skipped),
        R,
        N,
        layer,
        cfg.rendering,
        featurizer.prefix_sharing,
    )
    n_rows = sum(bounds[s][1] - bounds[s][0] for s in todo)
    pbar = tqdm(total=n_rows, desc="cache-features", unit="row", disable=not is_main)
    t0 = time.perf_counter()
    computed = []
    for s in todo:
        start, end = bounds[s]
        with torch.inference_mode():
            state, actions, valid = compute_shard(featurizer, ds, start, end, N, dtype, pbar, workers)
        write_shard(out, s, start, state, actions, valid if ragged else None)
        computed.append(s)
    pbar.close()
    secs = time.perf_counter() - t0
    rate = n_rows / secs if secs > 0 and n_rows else 0.0
    log.info("rank %d: %d row(s) in %.1fs (%.2f rows/s)", rank, n_rows, secs, rate)
    if featurizer.num_prefix_fallbacks:
        log.warning(
            "%d state(s) fell back to full forwards (prefix tokenisation not clean)",
            featurizer.num_prefix_fallbacks,
        )
    summary = {
        "computed_shards": computed,
        "skipped_shards": skipped,
        "rows_per_s": rate,
        "num_shards": num_shards,
    }
    if cfg.max_shards is not None and len(computed) < len(mine) - len(skipped):
        log.warning(
            "stopped after max_shards=%d: %s is an in-progress cache; re-run to finish", cfg.max_shards, out
        )
        return {**summary, "status": "incomplete"}

    acc.wait_for_everyone()
    if is_main:
        _finalize(out, cfg, ident, bounds, N, ragged)
    acc.wait_for_everyone()
    return {**summary, "status": "complete"}


def _finalize(
    out: Path, cfg: Config, ident: dict, bounds: dict[int, tuple[int, int]], n: int, ragged: bool
) -> None:
    """Check every shard, then write the manifest and the completion marker (main process, last)."""
    missing, dims = [], set()
    for s, (start, end) in bounds.items():
        path = out / shard_name(s)
        if not shard_ok(path, end - start, n, cfg.dtype, ragged):
            missing.append(f"{path.name} (rows {start}..{end - 1})")
            continue
        h = shard_header(path)
        dims.add((h["state"]["shape"][1], h["actions"]["shape"][2]))
    if missing:
        raise DataError(
            f"{out}: {len(missing)} shard(s) missing or incomplete after all processes finished: "
            f"{', '.join(missing[:5])}; re-run to compute them"
        )
    if len(dims) != 1:
        raise DataError(f"{out}: shards disagree on the feature width {sorted(dims)}; pass overwrite=true")
    (ds_dim, da_dim) = dims.pop()
    meta = {
        **{k: v for k, v in ident.items() if k not in ("model_stamp",)},
        "num_rows": ident["num_rows"],
        "num_candidates": n,
        "state_dim": int(ds_dim),
        "action_dim": int(da_dim),
        "dtype": cfg.dtype,
        "dataset": str(cfg.dataset),
        "model": ident["model"],
        "layer": ident["layer"],
        "rendering": cfg.rendering,
        "shards": [{"file": shard_name(s), "start": a, "end": b} for s, (a, b) in sorted(bounds.items())],
    }
    write_manifest(out, meta)
    save_config(cfg, out)
    finish_output(out, {"config_hash": ident["config_hash"]})
    log.info("feature cache complete: %s (%d rows, %d shards)", out, ident["num_rows"], len(bounds))
