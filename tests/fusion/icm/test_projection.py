"""Adapter-derived task vectors: the seeded projection is the same cached or streamed in blocks."""

from __future__ import annotations

import torch

from engine.fusion.icm import projection as taskvec


def test_cached_projection_equals_the_blockwise_one(monkeypatch):
    monkeypatch.setattr(taskvec, "BLOCK", 1000)  # several blocks, the last one partial
    x = torch.randn(3, 2500, generator=torch.Generator().manual_seed(0))
    cached = taskvec.project(x, 16, seed=7)
    monkeypatch.setattr(taskvec, "CACHED_ELEMENTS", 0)
    streamed = taskvec.project(x, 16, seed=7)
    torch.testing.assert_close(cached, streamed)
    torch.testing.assert_close(taskvec.project(x[1], 16, seed=7), streamed[1])
    assert not torch.allclose(taskvec.project(x, 16, seed=8), streamed)  # the seed matters
