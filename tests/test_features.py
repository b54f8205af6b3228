"""Feature cache: round trip, manifest contract, and corruption errors that name the shard and row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from digiq.data.features import FORMAT, FeatureCache, write_cache, write_manifest, write_shard
from digiq.errors import DataError
from digiq.utils.io import mark_complete, staged_dir


def _tensors(R: int = 10, N: int = 3, Ds: int = 5, Da: int = 6, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return torch.randn(R, Ds, generator=g).to(dtype), torch.randn(R, N, Da, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip(tmp_path: Path, dtype: torch.dtype) -> None:
    state, actions = _tensors(dtype=dtype)
    write_cache(
        tmp_path / "c", state, actions, meta={"model": "tiny:llava", "layer": 2, "x": 1}, shard_rows=4
    )
    fc = FeatureCache.open(tmp_path / "c")
    assert torch.equal(fc.state, state) and torch.equal(fc.actions, actions)
    assert fc.valid is None
    assert (fc.num_rows, fc.num_candidates, fc.state_dim, fc.action_dim) == (10, 3, 5, 6)
    m = fc.manifest
    assert m["format"] == FORMAT and m["model"] == "tiny:llava" and m["layer"] == 2 and m["x"] == 1
    assert [(s["start"], s["end"]) for s in m["shards"]] == [(0, 4), (4, 8), (8, 10)]
    fc.check_against(10)
    with pytest.raises(DataError, match="10 rows but the dataset .* has 11"):
        fc.check_against(11)
    with pytest.raises(DataError, match="3 candidates per row but 4"):
        fc.check_against(10, num_candidates=4)


def test_low_level_writer_and_valid_mask(tmp_path: Path) -> None:
    state, actions = _tensors()
    valid = torch.ones(10, 3, dtype=torch.bool)
    valid[2, 2] = False
    with staged_dir(tmp_path / "c") as tmp:
        shards = [write_shard(tmp, 0, 0, state[:6], actions[:6], valid[:6]),
                  write_shard(tmp, 1, 6, state[6:], actions[6:], valid[6:])]  # fmt: skip
        write_manifest(tmp, {"num_rows": 10, "num_candidates": 3, "state_dim": 5, "action_dim": 6,
                             "dtype": "float32", "shards": shards, "dataset": "d", "dataset_fingerprint": "f",
                             "model": "m", "layer": 1, "rendering": "overlay"})  # fmt: skip
    fc = FeatureCache.open(tmp_path / "c")
    assert torch.equal(fc.valid, valid)
    with pytest.raises(DataError, match="fingerprint 'f', not 'g'"):
        fc.check_against(10, fingerprint="g")


def _corrupt_setup(tmp_path: Path) -> Path:
    state, actions = _tensors()
    return write_cache(tmp_path / "c", state, actions, shard_rows=4)


def test_nan_names_shard_and_row(tmp_path: Path) -> None:
    state, actions = _tensors()
    actions[6, 1, 2] = float("nan")
    write_cache(tmp_path / "c", state, actions, shard_rows=4)
    with pytest.raises(DataError, match=r"shard-00001\.safetensors: actions holds NaN/inf at dataset row 6 "):
        FeatureCache.open(tmp_path / "c")
    state[9, 0] = float("inf")
    actions[6, 1, 2] = 0
    write_cache(tmp_path / "d", state, actions, shard_rows=4)
    with pytest.raises(DataError, match=r"shard-00002\.safetensors: state holds NaN/inf at dataset row 9"):
        FeatureCache.open(tmp_path / "d")


def test_missing_shard_incomplete_and_bad_manifest(tmp_path: Path) -> None:
    c = _corrupt_setup(tmp_path)
    (c / "shard-00001.safetensors").unlink()
    with pytest.raises(DataError, match=r"shard-00001\.safetensors: shard listed in the manifest is missing"):
        FeatureCache.open(c)

    c = _corrupt_setup(tmp_path / "2")
    m = json.loads((c / "manifest.json").read_text())
    m["shards"] = m["shards"][:1] + m["shards"][2:]
    (c / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="row 4 was expected"):
        FeatureCache.open(c)

    c = _corrupt_setup(tmp_path / "3")
    m = json.loads((c / "manifest.json").read_text())
    m["action_dim"] = 7
    (c / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"shard-00000\.safetensors: actions has shape \(4, 3, 6\)"):
        FeatureCache.open(c)

    c = _corrupt_setup(tmp_path / "4")
    (c / "_COMPLETE").unlink()
    with pytest.raises(DataError, match="incomplete"):
        FeatureCache.open(c)
    mark_complete(c)
    (c / "shard-00002.safetensors").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"shard-00002\.safetensors: not a readable safetensors shard"):
        FeatureCache.open(c)

    with pytest.raises(DataError, match="not found"):
        FeatureCache.open(tmp_path / "nope")


def test_unfinished_outputs_name_what_to_rerun(tmp_path: Path) -> None:
    """The feature cache, the dataset loader and the generic guard share one check: a folder without the
    completion marker is refused with the reader's own error type and re-run hint, a file is 'not found'."""
    import re

    from digiq.data.schema import load_dataset
    from digiq.utils.io import require_complete

    folder, a_file = tmp_path / "half", tmp_path / "file"
    folder.mkdir()
    a_file.write_text("x")
    cases = [
        (FeatureCache.open, DataError, "feature cache", "re-run `digiq cache-features`"),
        (load_dataset, DataError, "dataset", "re-run the stage that wrote it"),
        (
            lambda p: require_complete(p, "critic"),
            FileNotFoundError,
            "critic",
            "the stage that writes it was",
        ),
    ]
    for read, error, what, hint in cases:
        with pytest.raises(error) as e:
            read(folder)
        assert str(e.value).startswith(f"{what} at {folder} is incomplete (no _COMPLETE marker): {hint}")
        with pytest.raises(error, match=re.escape(f"{what} not found: {a_file}")):
            read(a_file)
