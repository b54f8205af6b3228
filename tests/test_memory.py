"""Memory-bounded feature handling: chunked feature_stats and FeatureCache.open reading shards in place."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from digiq.errors import DataError
from digiq.training.critic_data import feature_stats


def test_feature_stats_chunked_equals_direct() -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(50, 3, 8, generator=g) * 3 + 1).half()
    rows = torch.tensor([0, 5, 7, 9, 10, 11, 20, 49, 33])
    ref = x[rows].reshape(-1, 8).double()
    for budget in (1, 24, 25, 1 << 22):  # 1 row per chunk, exact rows, a partial row, everything
        mean, std = feature_stats(x, rows, max_elements=budget)
        assert torch.allclose(mean.double(), ref.mean(0), atol=1e-5)
        assert torch.allclose(std.double(), ref.std(0, unbiased=False), atol=1e-4)


def _cache(tmp_path, dtype=torch.float16, rows=10, shard_rows=4):
    from digiq.data.features import write_cache

    g = torch.Generator().manual_seed(1)
    state = torch.randn(rows, 5, generator=g).to(dtype)
    actions = torch.randn(rows, 3, 7, generator=g).to(dtype)
    valid = torch.ones(rows, 3, dtype=torch.bool)
    valid[1, 2] = valid[8, 1] = False
    return (
        write_cache(tmp_path / "c", state, actions, valid=valid, shard_rows=shard_rows),
        state,
        actions,
        valid,
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_direct_read_equals_safetensors_load(tmp_path, dtype) -> None:
    """FeatureCache.open reads shards into the preallocated tensors bit-exactly (valid mask included)."""
    from digiq.data.features import FeatureCache

    path, state, actions, valid = _cache(tmp_path, dtype)
    c = FeatureCache.open(path)
    assert c.state.dtype == dtype and torch.equal(c.state, state) and torch.equal(c.actions, actions)
    assert torch.equal(c.valid, valid)
    ref = load_file(str(path / "shard-00001.safetensors"))
    assert torch.equal(c.actions[4:8], ref["actions"])


def test_nan_found_across_check_blocks(tmp_path, monkeypatch) -> None:
    """With tiny check blocks the first bad row and the count still cover the whole shard."""
    import digiq.data.features as F

    monkeypatch.setattr(F, "_CHECK_BLOCK", 5)  # < one row of actions: one row per block
    path, state, actions, valid = _cache(tmp_path, rows=12, shard_rows=12)
    actions[9, 2, 3] = float("nan")
    actions[11, 0, 0] = float("inf")
    F.write_cache(tmp_path / "n", state, actions, shard_rows=12)
    with pytest.raises(DataError, match=r"actions holds NaN/inf at dataset row 9 \(shard row 9; 2 bad row"):
        F.FeatureCache.open(tmp_path / "n")


def test_truncated_or_retyped_shard(tmp_path) -> None:
    from digiq.data.features import FeatureCache

    path, *_ = _cache(tmp_path)
    shard = path / "shard-00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])  # header intact, data cut
    with pytest.raises(DataError, match=r"shard-00001\.safetensors: not a readable safetensors shard"):
        FeatureCache.open(path)
    t = load_file(str(path / "shard-00000.safetensors"))
    save_file(
        {k: (v.float() if k == "state" else v) for k, v in t.items()}, str(path / "shard-00000.safetensors")
    )
    with pytest.raises(
        DataError, match=r"shard-00000\.safetensors: state dtype F32 != the manifest's \(F16\)"
    ):
        FeatureCache.open(path)
