"""Adapter-derived task vectors, the fallback when a task has no in-context examples (pure torch).

``v_t = P @ mean_i(normalised adapter_i of task t)`` with a fixed seeded Gaussian projection
``P [d, N] / sqrt(N)``: reproducible anywhere from ``(seed, d, N)``, so a task unseen in training
gets its vector from its adapter(s) alone. Projected in column blocks to bound memory.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch

BLOCK = 1 << 16


def project(x: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """``[N]`` or ``[B, N]`` -> ``[d]`` or ``[B, d]`` with the seeded projection."""
    single = x.dim() == 1
    x = x.reshape(1, -1) if single else x
    n = x.shape[1]
    if dim * n <= CACHED_ELEMENTS:  # small enough to keep: serving fuses with it per request
        out = x.float() @ _projection(dim, n, seed).T
    else:
        out = torch.zeros(x.shape[0], dim)
        start = 0
        for block in _blocks(dim, n, seed):
            out += x[:, start : start + block.shape[1]].float() @ block.T
            start += block.shape[1]
    return out[0] if single else out


CACHED_ELEMENTS = 1 << 24  # 64 MiB of float32 per cached projection


def _blocks(dim: int, n: int, seed: int) -> Iterator[torch.Tensor]:
    """``P``'s column blocks ``[d, <=BLOCK]`` in order; the same numbers however they are consumed."""
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, n, BLOCK):
        yield torch.randn(dim, min(BLOCK, n - start), generator=generator) / n**0.5


@functools.lru_cache(maxsize=4)
def _projection(dim: int, n: int, seed: int) -> torch.Tensor:
    return torch.cat(list(_blocks(dim, n, seed)), dim=1)  # [d, N]
