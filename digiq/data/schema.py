"""The one trajectory schema: HF ``datasets`` Features shared by simulated and imported data.

One row per step. Stages hand off through ``save_to_disk`` folders (Arrow), never pickles. Rows of a
trajectory are contiguous and ordered by ``step_id``; ``traj_id`` is unique per trajectory.

| column | type | meaning |
|---|---|---|
| ``traj_id`` | int64 | trajectory id |
| ``step_id`` | int32 | 0-based step within the trajectory |
| ``task`` | string | the natural-language goal |
| ``observation`` | string | AutoUI prompt ``Previous Actions: <last> Goal: <task></s>`` |
| ``screenshot`` | Image | s_t |
| ``next_screenshot`` | Image | s_{t+1} (the screen after the action) |
| ``action`` | string | the AutoUI action string taken (dataset action) |
| ``reward`` | float32 | r_t (0/1 in AitW and the simulator) |
| ``done`` | bool | terminal after this step (success, STATUS action, or horizon) |
| ``mc_return`` | float32 | sum_k gamma^(k-t) r_k to the end of the trajectory |
| ``candidates`` | list[string] | candidate actions; index 0 is the dataset action; empty until ``digiq candidates`` |
| ``state_key`` | string | simulated-device state id (exact Q* lookup); "" for imported data |
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from datasets import Dataset, Features, Image, List, Value, load_from_disk

from digiq.errors import DataError, where
from digiq.utils.io import (
    OutputPlan,
    atomic_write_json,
    require_complete,
    staged_dir,
    staged_output,
)

FEATURES = Features(
    {
        "traj_id": Value("int64"),
        "step_id": Value("int32"),
        "task": Value("string"),
        "observation": Value("string"),
        "screenshot": Image(),
        "next_screenshot": Image(),
        "action": Value("string"),
        "reward": Value("float32"),
        "done": Value("bool"),
        "mc_return": Value("float32"),
        "candidates": List(Value("string")),
        "state_key": Value("string"),
    }
)
COLUMNS = tuple(FEATURES.keys())
# Written by `digiq import` / `digiq sim collect` into the dataset folder next to the Arrow files.
INFO_FILE = "digiq_dataset.json"


def discounted_returns(rewards: Sequence[float], gamma: float) -> np.ndarray:
    """mc_t = sum_{k>=t} gamma^(k-t) r_k for one trajectory (the official ``add_mc_return``)."""
    out = np.zeros(len(rewards), dtype=np.float64)
    acc = 0.0
    for t in range(len(rewards) - 1, -1, -1):
        acc = float(rewards[t]) + gamma * acc
        out[t] = acc
    return out.astype(np.float32)


def recompute_mc_returns(ds: Dataset, gamma: float) -> Dataset:
    """Recompute ``mc_return`` per trajectory with ``gamma`` (the official loader does this too)."""
    traj = np.asarray(ds["traj_id"])
    rewards = np.asarray(ds["reward"], dtype=np.float64)
    mc = np.zeros(len(ds), dtype=np.float32)
    starts = np.flatnonzero(np.r_[True, traj[1:] != traj[:-1]])
    ends = np.r_[starts[1:], len(ds)]
    for s, e in zip(starts, ends):
        mc[s:e] = discounted_returns(rewards[s:e], gamma)
    return ds.remove_columns("mc_return").add_column("mc_return", mc.tolist(), feature=Value("float32"))


def _kind(feature: object) -> str:
    """A coarse type of a datasets feature ('int', 'float', 'bool', 'string', 'image', 'list[...]').

    Widths are not compared (int32 vs int64 step ids are both fine); kinds are.
    """
    if isinstance(feature, Image):
        return "image"
    if isinstance(feature, Value):
        dt = feature.dtype
        if dt.startswith(("int", "uint")):
            return "int"
        if dt.startswith("float") or dt == "double":
            return "float"
        if dt in ("string", "large_string"):
            return "string"
        return dt
    inner = getattr(feature, "feature", None)
    if inner is not None:
        return f"list[{_kind(inner)}]"
    if isinstance(feature, list) and len(feature) == 1:
        return f"list[{_kind(feature[0])}]"
    return type(feature).__name__


def validate_dataset(ds: Dataset, source: str = "dataset") -> None:
    """Schema and value checks; raises a DataError that names the trajectory and step."""
    missing = [c for c in COLUMNS if c not in ds.column_names]
    if missing:
        raise DataError(f"{source}: missing column(s) {missing}; expected the digiq schema {list(COLUMNS)}")
    wrong = [
        f"{c} is {_kind(ds.features[c])}, expected {_kind(FEATURES[c])}"
        for c in COLUMNS
        if _kind(ds.features[c]) != _kind(FEATURES[c])
    ]
    if wrong:
        # Checked before any value is read: a string reward would otherwise fail inside numpy with a
        # message that names neither the column nor the dataset.
        raise DataError(f"{source}: wrong column type(s): {'; '.join(wrong)}")
    if len(ds) == 0:
        raise DataError(f"{source}: the dataset is empty")
    for name in ("reward", "mc_return"):
        values = np.asarray(ds[name], dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            i = int(bad[0])
            raise DataError(
                f"{source}: trajectory {ds[i]['traj_id']}, step {ds[i]['step_id']}: {name} is {values[i]} "
                f"({len(bad)} non-finite value(s) in all)"
            )
    traj = np.asarray(ds["traj_id"])
    step = np.asarray(ds["step_id"])
    starts = np.r_[True, traj[1:] != traj[:-1]]
    expected = np.zeros(len(ds), dtype=np.int64)
    counter = 0
    for i, s in enumerate(starts):
        counter = 0 if s else counter + 1
        expected[i] = counter
    bad = np.flatnonzero(step != expected)
    if len(bad):
        i = int(bad[0])
        raise DataError(
            f"{source}: trajectory {traj[i]}, row {i}: step_id {step[i]} where {expected[i]} was expected "
            "(rows of a trajectory must be contiguous and ordered by step_id from 0)"
        )
    if len(np.unique(traj[starts])) != int(starts.sum()):
        raise DataError(f"{source}: a traj_id appears in two separate runs of rows; traj_ids must be unique")


def save_dataset(
    ds: Dataset,
    path: str | Path,
    info: dict | None = None,
    *,
    overwrite: bool = False,
    plan: OutputPlan | None = None,
) -> Path:
    """``save_to_disk`` into a staged folder, renamed into place with a completion marker.

    A finished dataset at ``path`` is replaced only with ``overwrite``; a stage passes its ``plan``
    (:func:`digiq.utils.io.plan_output`) instead, which decides that and records the run."""
    path = Path(path)
    if plan is not None and plan.path != path:
        raise ValueError(f"save_dataset: the plan is for {plan.path}, not {path}")
    staged = staged_output(plan) if plan is not None else staged_dir(path, overwrite=overwrite)
    with staged as tmp:
        ds.save_to_disk(str(tmp))
        atomic_write_json(tmp / INFO_FILE, info or {})
    return path


def load_dataset(path: str | Path, validate: bool = True) -> Dataset:
    """Load a dataset written by :func:`save_dataset`; refuses folders whose writer did not finish."""
    path = require_complete(path, "dataset", DataError, "re-run the stage that wrote it")
    try:
        ds = load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - datasets raises many types for a broken folder
        raise DataError(f"{path}: not a readable datasets folder: {e}") from e
    if validate:
        validate_dataset(ds, str(path))
    return ds


IMAGE_COLUMNS = ("screenshot", "next_screenshot")


def decode_image(cell: dict | None, source: str, traj: object, step: object, column: str):
    """Decode one undecoded ``Image`` cell (``{"bytes", "path"}``) into a loaded PIL image.

    A missing, truncated or garbage image raises a DataError naming the dataset, trajectory, step and
    column, instead of PIL's ``UnidentifiedImageError``/``OSError`` deep inside ``datasets`` (which name
    neither the row nor the file). The pixels are loaded here so a truncated PNG fails now, not later.
    """
    import io

    from PIL import Image as PILImage

    loc = where(source, traj, step, column)
    if cell is None or (cell.get("bytes") is None and not cell.get("path")):
        raise DataError(f"{loc}: the image is missing")
    try:
        data = cell.get("bytes")
        img = PILImage.open(io.BytesIO(data) if data is not None else cell["path"])
        img.load()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
        raise DataError(f"{loc}: the image does not decode ({type(e).__name__}: {e})") from e
    return img


def iter_decoded_rows(ds: Dataset, columns: Sequence[str], source: str = "dataset"):
    """Yield rows of ``ds`` (only ``columns``) with image columns decoded by :func:`decode_image`."""
    from datasets import Image as HFImage

    want = list(dict.fromkeys([*columns, "traj_id", "step_id"]))
    sub = ds.select_columns(want)
    for col in IMAGE_COLUMNS:
        if col in want:
            sub = sub.cast_column(col, HFImage(decode=False))
    for row in sub:
        for col in IMAGE_COLUMNS:
            if col in want:
                row[col] = decode_image(row[col], source, row["traj_id"], row["step_id"], col)
        yield row


def undecoded_view(ds: Dataset, columns: Sequence[str]) -> Dataset:
    """``ds`` restricted to ``columns`` (+ traj_id, step_id) with image columns left undecoded.

    Pair with :func:`decode_batch`: ``decode_batch(view[rows], source)`` is ``ds[rows]`` with every image
    decoded through :func:`decode_image`, so a broken screenshot names its trajectory/step/column instead
    of surfacing as a PIL traceback from inside ``datasets``.
    """
    from datasets import Image as HFImage

    want = list(dict.fromkeys([*columns, "traj_id", "step_id"]))
    sub = ds.select_columns(want)
    for col in IMAGE_COLUMNS:
        if col in want:
            sub = sub.cast_column(col, HFImage(decode=False))
    return sub


def decode_batch(batch: dict, source: str = "dataset") -> dict:
    """Decode the image columns of a column batch taken from :func:`undecoded_view` (in place; returned)."""
    for col in IMAGE_COLUMNS:
        if col in batch:
            batch[col] = [
                decode_image(cell, source, t, s, col)
                for cell, t, s in zip(batch[col], batch["traj_id"], batch["step_id"], strict=True)
            ]
    return batch


def dataset_info(path: str | Path) -> dict:
    import json

    p = Path(path) / INFO_FILE
    return json.loads(p.read_text()) if p.exists() else {}


def trajectory_bounds(ds: Dataset) -> list[tuple[int, int]]:
    """[(start_row, end_row_exclusive)] per trajectory, in dataset order."""
    traj = np.asarray(ds["traj_id"])
    if len(traj) == 0:
        return []
    starts = np.flatnonzero(np.r_[True, traj[1:] != traj[:-1]])
    ends = np.r_[starts[1:], len(traj)]
    return [(int(s), int(e)) for s, e in zip(starts, ends)]


def num_val_trajectories(num_trajectories: int, val_fraction: float) -> int:
    """How many of ``num_trajectories`` trajectories :func:`split_by_trajectory` holds out (the last ones)."""
    n_val = int(math.floor(num_trajectories * val_fraction)) if val_fraction > 0 else 0
    if val_fraction > 0 and n_val == 0 and num_trajectories > 1:
        n_val = 1
    return n_val


def split_by_trajectory(ds: Dataset, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, val): the first ``1 - val_fraction`` of trajectories train, the rest validate.

    Same rule as the official loader (first 80% / last 20%, no shuffle: offpolicy_train_loop.py:111).
    """
    bounds = trajectory_bounds(ds)
    n_val = num_val_trajectories(len(bounds), val_fraction)
    cut = len(bounds) - n_val
    train = np.concatenate([np.arange(s, e) for s, e in bounds[:cut]]) if cut else np.zeros(0, np.int64)
    val = np.concatenate([np.arange(s, e) for s, e in bounds[cut:]]) if n_val else np.zeros(0, np.int64)
    return train.astype(np.int64), val.astype(np.int64)


def next_row_index(ds: Dataset) -> np.ndarray:
    """For each row, the row of s_{t+1} in the same trajectory, or -1 after the last step."""
    traj = np.asarray(ds["traj_id"])
    nxt = np.arange(1, len(traj) + 1)
    same = np.r_[traj[1:] == traj[:-1], False]
    return np.where(same, nxt, -1).astype(np.int64)


def empty_row() -> dict:
    """Defaults for optional columns when building rows by hand."""
    return {"candidates": [], "state_key": "", "mc_return": 0.0}
