"""The feature cache: frozen-VLM features f(s_t) and f(s_t, a_i) as safetensors shards.

Shared contract between ``digiq cache-features`` (writes), ``digiq import`` (writes, from the official
``q_rep_out_list``) and ``digiq train-critic`` (reads). A cache is a directory written through
:func:`digiq.utils.io.staged_dir` (so it carries a ``_COMPLETE`` marker) holding

- ``manifest.json``: ``{"format": "digiq-features-v1", "num_rows": R, "num_candidates": N, "state_dim": Ds,
  "action_dim": Da, "dtype": ..., "dataset": ..., "dataset_fingerprint": ..., "model": ..., "layer": L,
  "rendering": "text"|"overlay"|"imported", "shards": [{"file", "start", "end"}, ...], ...extra keys}``
- ``shard-XXXXX.safetensors``: ``state`` (n, Ds) = f(s_t); ``actions`` (n, N, Da) = f(s_t, a_i), i = 0 the
  dataset action and i >= 1 the row's ``candidates[i]``; optional ``valid`` (n, N) bool (False = padding).

The official pipeline keeps these as numpy arrays inside a pickled ``.pt`` (``q_rep_out_list``,
DigiRL-agent/digiq @ 8181379, ``postprocess_data/vlm_infer/vllm_based/vllm_infer_batched.py:89``); a list
instead of an array there breaks training (the gradio path writes one, ``client.py:103``, and
``digiq/data/utils.py:91`` needs ``.shape``). Here every shard is checked for shape, dtype and finiteness when
opened, and errors name the shard and dataset row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from digiq.errors import DataError
from digiq.utils.io import (
    atomic_save_safetensors,
    atomic_write_json,
    require_complete,
    staged_dir,
)

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


# safetensors dtype codes of the tensors a shard may hold.
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "BOOL": torch.bool}
# Finiteness is checked on blocks of at most this many values (bounded scratch memory).
_CHECK_BLOCK = 1 << 24


def _read_header(path: Path) -> tuple[dict[str, Any], int, int]:
    """(tensor table, byte offset of the data section, file size) of a safetensors file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n <= 0 or 8 + n > size:
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (OSError, ValueError) as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DataError(f"{path}: not a readable safetensors shard ({e})") from e
    header.pop("__metadata__", None)
    return header, 8 + n, size


def _read_tensor_into(
    path: Path, f: Any, header: dict[str, Any], data_start: int, size: int, key: str, dst: torch.Tensor
) -> None:
    """Read tensor ``key`` of a shard straight into the contiguous ``dst`` (shape and dtype checked first).

    Reading with ``readinto`` into the preallocated cache tensor keeps peak memory at the cache size: no
    per-shard copy (``safetensors.torch.load_file``) and no memory-mapped pages of the shard resident.
    """
    info = header.get(key)
    if info is None:
        raise DataError(f"{path}: tensor {key!r} is missing")
    dtype = _ST_DTYPES.get(info.get("dtype"))
    if dtype != dst.dtype:
        want = next((c for c, dt in _ST_DTYPES.items() if dt == dst.dtype), str(dst.dtype))
        raise DataError(f"{path}: {key} dtype {info.get('dtype')} != the manifest's ({want})")
    if tuple(info.get("shape", ())) != tuple(dst.shape):
        raise DataError(
            f"{path}: {key} has shape {tuple(info.get('shape', ()))}, the manifest implies {tuple(dst.shape)}"
        )
    begin, end = (int(x) for x in info["data_offsets"])
    nbytes = dst.numel() * dst.element_size()
    if end - begin != nbytes or data_start + end > size:
        raise DataError(f"{path}: not a readable safetensors shard ({key} data is truncated or inconsistent)")
    if nbytes == 0:
        return
    buf = dst.view(torch.uint8) if dst.dtype != torch.bool else dst
    f.seek(data_start + begin)
    view = memoryview(buf.reshape(-1).numpy()).cast("B")
    got = 0
    while got < nbytes:
        k = f.readinto(view[got:])
        if not k:
            raise DataError(f"{path}: not a readable safetensors shard ({key} data ends early)")
        got += k


def _check_finite(path: Path, key: str, t: torch.Tensor, start: int) -> None:
    """Raise a DataError naming the first dataset row of ``t`` (rows from ``start``) holding NaN/inf."""
    n = t.shape[0]
    per_row = max(1, t[0].numel()) if n else 1
    rows = max(1, _CHECK_BLOCK // per_row)
    first, count = -1, 0
    for b in range(0, n, rows):
        bad = ~torch.isfinite(t[b : b + rows].reshape(min(rows, n - b), -1)).all(dim=1)
        if bool(bad.any()):
            if first < 0:
                first = b + int(bad.nonzero()[0, 0])
            count += int(bad.sum())
    if first >= 0:
        raise DataError(
            f"{path}: {key} holds NaN/inf at dataset row {start + first} (shard row {first}; "
            f"{count} bad row(s) in this shard)"
        )


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
        path = require_complete(path, "feature cache", DataError, "re-run `digiq cache-features`")
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
            n = end - start
            header, data_start, size = _read_header(spath)
            try:
                with open(spath, "rb") as f:
                    _read_tensor_into(spath, f, header, data_start, size, "state", state[start:end])
                    _read_tensor_into(spath, f, header, data_start, size, "actions", actions[start:end])
                    if "valid" in header:
                        if tuple(header["valid"].get("shape", ())) != (n, N):
                            raise DataError(
                                f"{spath}: valid has shape {tuple(header['valid'].get('shape', ()))}, "
                                f"expected {(n, N)}"
                            )
                        if valid is None:
                            valid = torch.ones(R, N, dtype=torch.bool)
                        _read_tensor_into(spath, f, header, data_start, size, "valid", valid[start:end])
            except OSError as e:
                raise DataError(f"{spath}: not a readable safetensors shard ({e})") from e
            if check_finite:
                _check_finite(spath, "state", state[start:end], start)
                _check_finite(spath, "actions", actions[start:end], start)
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
