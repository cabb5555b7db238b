"""Adapter-derived task vectors, the fallback when a task has no in-context examples (pure torch).

``v_t = P @ mean_i(normalised adapter_i of task t)`` with a fixed seeded Gaussian projection
``P [d, N] / sqrt(N)``: reproducible anywhere from ``(seed, d, N)``, so a task unseen in training
gets its vector from its adapter(s) alone. Projected in column blocks to bound memory.
"""

from __future__ import annotations

import torch

BLOCK = 1 << 16


def project(x: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """``[N]`` or ``[B, N]`` -> ``[d]`` or ``[B, d]`` with the seeded projection."""
    single = x.dim() == 1
    x = x.reshape(1, -1) if single else x
    n = x.shape[1]
    generator = torch.Generator().manual_seed(seed)
    out = torch.zeros(x.shape[0], dim)
    for start in range(0, n, BLOCK):
        width = min(BLOCK, n - start)
        block = torch.randn(dim, width, generator=generator) / n**0.5
        out += x[:, start : start + width].float() @ block.T
    return out[0] if single else out
