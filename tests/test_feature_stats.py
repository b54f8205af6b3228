"""train_critic.feature_stats: chunking by an element budget gives the same statistics as one pass."""

from __future__ import annotations

import torch

from digiq.stages.train_critic import feature_stats


def test_feature_stats_chunked_equals_direct() -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(50, 3, 8, generator=g) * 3 + 1).half()
    rows = torch.tensor([0, 5, 7, 9, 10, 11, 20, 49, 33])
    ref = x[rows].reshape(-1, 8).double()
    for budget in (1, 24, 25, 1 << 22):  # 1 row per chunk, exact rows, a partial row, everything
        mean, std = feature_stats(x, rows, max_elements=budget)
        assert torch.allclose(mean.double(), ref.mean(0), atol=1e-5)
        assert torch.allclose(std.double(), ref.std(0, unbiased=False), atol=1e-4)
