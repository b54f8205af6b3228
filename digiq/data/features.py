"""The feature cache: frozen-VLM features f(s_t) and f(s_t, a_i) as safetensors shards.

Shared contract between ``digiq cache-features`` (writes), ``digiq import`` (writes, from the official
``q_rep_out_list``) and ``digiq train-critic`` (reads). A cache is a directory written through
:func:`digiq.utils.io.staged_dir` (so it carries a ``_COMPLETE`` marker) holding

- ``manifest.json``: ``{"format": "digiq-features-v1", "num_rows": R, "num_candidates": N, "state_dim": Ds,
  "action_dim": Da, "dtype": ..., "dataset": ..., "dataset_fingerprint": ..., "model": ..., "layer": L,
  "rendering": "text"|"overlay"|"imported", "shards": [{"file", "start", "end"}, ...], ...extra keys}``
- ``shard-XXXXX.safetensors``: ``state`` (n, Ds) = f(s_t); ``actions`` (n, N, Da) = f(s_t, a_i), i = 0 the
  dataset action and i >= 1 the row's ``candidates[i]``; optional ``valid`` (n, N) bool (False = padding).

The official pipeline keeps these as numpy arrays inside a pickled ``.pt`` (digiq_official.md section 1,
``q_rep_out_list``); a list instead of an array there breaks training (section 7, item 4). Here every shard
is checked for shape, dtype and finiteness when opened, and errors name the shard and dataset row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from digiq.errors import DataError
from digiq.utils.io import atomic_save_safetensors, atomic_write_json, is_complete

FORMAT = "digiq-features-v1"
MANIFEST = "manifest.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
REQUIRED_KEYS = ("num_rows", "num_candidates", "state_dim", "action_dim", "dtype", "shards")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def dtype_name(dtype: torch.dtype) -> str:
    for name, dt in DTYPES.items():
        if dt == dtype:
            return name
    raise DataError(f"feature dtype {dtype} is not supported; use one of {sorted(DTYPES)}")


def write_shard(
    directory: str | Path,
    index: int,
    start: int,
    state: torch.Tensor,
    actions: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Write ``shard-<index>.safetensors`` for dataset rows ``start .. start + len(state)``.

    Returns the manifest entry ``{"file", "start", "end"}`` to collect into ``manifest["shards"]``.
    """
    if state.dim() != 2 or actions.dim() != 3 or actions.shape[0] != state.shape[0]:
        raise DataError(
            f"shard {index}: expected state (n, Ds) and actions (n, N, Da) with the same n, got "
            f"{tuple(state.shape)} and {tuple(actions.shape)}"
        )
    if state.dtype != actions.dtype:
        raise DataError(f"shard {index}: state dtype {state.dtype} != actions dtype {actions.dtype}")
    dtype_name(state.dtype)
    tensors = {"state": state.detach().cpu(), "actions": actions.detach().cpu()}
    if valid is not None:
        if tuple(valid.shape) != tuple(actions.shape[:2]):
            raise DataError(f"shard {index}: valid must be (n, N) = {tuple(actions.shape[:2])}")
        tensors["valid"] = valid.detach().cpu().to(torch.bool)
    name = shard_name(index)
    atomic_save_safetensors(tensors, Path(directory) / name)
    return {"file": name, "start": int(start), "end": int(start) + int(state.shape[0])}


def write_manifest(directory: str | Path, meta: dict[str, Any]) -> Path:
    """Write ``manifest.json`` (``format`` is filled in); call it last, before the completion marker."""
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise DataError(f"feature manifest is missing key(s) {missing}")
    if meta["dtype"] not in DTYPES:
        raise DataError(f"feature manifest dtype {meta['dtype']!r} is not one of {sorted(DTYPES)}")
    out = {"format": FORMAT, **meta}
    out["format"] = FORMAT
    return atomic_write_json(Path(directory) / MANIFEST, out)


def _load_shard(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a truncated file
        raise DataError(f"{path}: not a readable safetensors shard ({e})") from e


@dataclass
class FeatureCache:
    """An opened, validated feature cache; ``state`` (R, Ds), ``actions`` (R, N, Da), ``valid`` (R, N)."""

    path: Path
    manifest: dict[str, Any]
    state: torch.Tensor
    actions: torch.Tensor
    valid: torch.Tensor | None = None

    @property
    def num_rows(self) -> int:
        return int(self.state.shape[0])

    @property
    def num_candidates(self) -> int:
        return int(self.actions.shape[1])

    @property
    def state_dim(self) -> int:
        return int(self.state.shape[1])

    @property
    def action_dim(self) -> int:
        return int(self.actions.shape[2])

    @classmethod
    def open(cls, path: str | Path, check_finite: bool = True) -> FeatureCache:
        """Read every shard into one contiguous tensor pair, checking the manifest against the shards."""
        path = Path(path)
        if not path.is_dir():
            raise DataError(f"feature cache not found: {path}")
        if not is_complete(path):
            raise DataError(
                f"feature cache at {path} is incomplete (no _COMPLETE marker): re-run `digiq cache-features`"
            )
        mpath = path / MANIFEST
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{mpath}: cannot read the manifest ({e})") from e
        if manifest.get("format") != FORMAT:
            raise DataError(f"{mpath}: format {manifest.get('format')!r} is not {FORMAT!r}")
        missing = [k for k in REQUIRED_KEYS if k not in manifest]
        if missing:
            raise DataError(f"{mpath}: missing key(s) {missing}")
        R, N = int(manifest["num_rows"]), int(manifest["num_candidates"])
        Ds, Da = int(manifest["state_dim"]), int(manifest["action_dim"])
        dtype = DTYPES.get(manifest["dtype"])
        if dtype is None:
            raise DataError(f"{mpath}: dtype {manifest['dtype']!r} is not one of {sorted(DTYPES)}")
        shards = sorted(manifest["shards"], key=lambda s: int(s["start"]))
        state = torch.empty(R, Ds, dtype=dtype)
        actions = torch.empty(R, N, Da, dtype=dtype)
        valid: torch.Tensor | None = None
        expected_start = 0
        for sh in shards:
            start, end, fname = int(sh["start"]), int(sh["end"]), sh["file"]
            spath = path / fname
            if start != expected_start:
                raise DataError(
                    f"{mpath}: shards do not cover the rows contiguously: {fname} starts at row {start}, "
                    f"row {expected_start} was expected (a shard is missing?)"
                )
            if not spath.is_file():
                raise DataError(f"{spath}: shard listed in the manifest is missing (rows {start}..{end - 1})")
            t = _load_shard(spath)
            n = end - start
            for key, shape in (("state", (n, Ds)), ("actions", (n, N, Da))):
                if key not in t:
                    raise DataError(f"{spath}: tensor {key!r} is missing")
                if tuple(t[key].shape) != shape:
                    raise DataError(
                        f"{spath}: {key} has shape {tuple(t[key].shape)}, the manifest implies {shape}"
                    )
                if t[key].dtype != dtype:
                    raise DataError(
                        f"{spath}: {key} dtype {t[key].dtype} != manifest dtype {manifest['dtype']}"
                    )
                if check_finite:
                    flat = t[key].reshape(n, -1)
                    bad = ~torch.isfinite(flat).all(dim=1)
                    if bool(bad.any()):
                        local = int(bad.nonzero()[0, 0])
                        raise DataError(
                            f"{spath}: {key} holds NaN/inf at dataset row {start + local} (shard row {local}; "
                            f"{int(bad.sum())} bad row(s) in this shard)"
                        )
            state[start:end] = t["state"]
            actions[start:end] = t["actions"]
            if "valid" in t:
                if tuple(t["valid"].shape) != (n, N):
                    raise DataError(f"{spath}: valid has shape {tuple(t['valid'].shape)}, expected {(n, N)}")
                if valid is None:
                    valid = torch.ones(R, N, dtype=torch.bool)
                valid[start:end] = t["valid"].to(torch.bool)
            expected_start = end
        if expected_start != R:
            raise DataError(
                f"{mpath}: shards cover rows 0..{expected_start - 1} but num_rows is {R} (a shard is missing?)"
            )
        if valid is not None and not bool(valid[:, 0].all()):
            row = int((~valid[:, 0]).nonzero()[0, 0])
            raise DataError(f"{path}: row {row}: candidate 0 (the dataset action) is marked invalid")
        return cls(path=path, manifest=manifest, state=state, actions=actions, valid=valid)

    def check_against(
        self,
        dataset_len: int,
        dataset_path: str | Path | None = None,
        num_candidates: int | None = None,
        fingerprint: str | None = None,
    ) -> None:
        """Raise a DataError unless this cache has one row per dataset row (and N candidates if given)."""
        where = f"feature cache {self.path}"
        if self.num_rows != dataset_len:
            raise DataError(
                f"{where} has {self.num_rows} rows but the dataset {dataset_path or ''} has {dataset_len}: "
                "the features were cached for another dataset; re-run `digiq cache-features`"
            )
        if num_candidates is not None and self.num_candidates != num_candidates:
            raise DataError(
                f"{where} has {self.num_candidates} candidates per row but {num_candidates} were expected"
            )
        cached_fp = self.manifest.get("dataset_fingerprint")
        if fingerprint and cached_fp and cached_fp != fingerprint:
            raise DataError(
                f"{where} was cached from dataset fingerprint {cached_fp!r}, not {fingerprint!r}: "
                "re-run `digiq cache-features`"
            )


def write_cache(
    directory: str | Path,
    state: torch.Tensor,
    actions: torch.Tensor,
    meta: dict[str, Any] | None = None,
    valid: torch.Tensor | None = None,
    shard_rows: int = 4096,
    overwrite: bool = False,
) -> Path:
    """Write a whole in-memory cache (tests, ``digiq import``, small runs) through a staged directory."""
    from digiq.utils.io import staged_dir

    R = int(state.shape[0])
    meta = dict(meta or {})
    meta.update(
        num_rows=R,
        num_candidates=int(actions.shape[1]),
        state_dim=int(state.shape[1]),
        action_dim=int(actions.shape[2]),
        dtype=dtype_name(state.dtype),
    )
    for key, default in (("dataset", ""), ("dataset_fingerprint", ""), ("model", ""), ("layer", -1)):
        meta.setdefault(key, default)
    meta.setdefault("rendering", "text")
    with staged_dir(directory, overwrite=overwrite) as tmp:
        shards = []
        for i, start in enumerate(range(0, R, shard_rows)):
            end = min(R, start + shard_rows)
            shards.append(
                write_shard(
                    tmp,
                    i,
                    start,
                    state[start:end],
                    actions[start:end],
                    None if valid is None else valid[start:end],
                )
            )
        meta["shards"] = shards
        write_manifest(tmp, meta)
    return Path(directory)
