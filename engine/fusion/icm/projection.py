"""Adapter-derived task vectors, the fallback when a task has no in-context examples (pure torch).

``v_t = P @ mean_i(normalised adapter_i of task t)`` with a fixed seeded Gaussian projection
``P [d, N] / sqrt(N)``: reproducible anywhere from ``(seed, d, N)``, so a task unseen in training
gets its vector from its adapter(s) alone. Projected in column blocks to bound memory.

Above :data:`CACHED_ELEMENTS`, ``P`` is drawn again, block by block, on every call: at an 8 B-class
layout that is ``d x N`` Gaussian numbers (hundreds of millions), far more work than the product
itself. A call with several rows draws ``P`` once for all of them, so callers with several
adapters to project (the inputs of one fusion, the tasks of a training run) pass them together.
Each row is multiplied on its own, so a row's vector is the same bits whatever rows it came with.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import torch

BLOCK = 1 << 16
CACHED_ELEMENTS = 1 << 24  # 64 MiB of float32 per cached projection


def project(x: torch.Tensor | Sequence[torch.Tensor], dim: int, seed: int) -> torch.Tensor:
    """``[N]`` -> ``[d]``; ``[B, N]`` (or a sequence of ``B`` tensors ``[N]``) -> ``[B, d]``, each row
    exactly as it would be projected alone."""
    single = isinstance(x, torch.Tensor) and x.dim() == 1
    rows = [x] if single else list(x)
    if not rows:
        raise ValueError("project needs at least one row")
    n = rows[0].shape[-1]
    if any(row.shape != (n,) for row in rows):
        raise ValueError(f"project: every row must be [N] = [{n}]; got {[tuple(r.shape) for r in rows]}")
    out = torch.zeros(len(rows), dim)
    if dim * n <= CACHED_ELEMENTS:  # small enough to keep: serving fuses with it per request
        matrix = _projection(dim, n, seed)
        for i, row in enumerate(rows):
            out[i] = row.float()[None] @ matrix.T
    else:
        start = 0
        for block in _blocks(dim, n, seed):
            end = start + block.shape[1]
            for i, row in enumerate(rows):
                out[i] += (row[start:end].float()[None] @ block.T)[0]
            start = end
    return out[0] if single else out


def _blocks(dim: int, n: int, seed: int) -> Iterator[torch.Tensor]:
    """``P``'s column blocks ``[d, <=BLOCK]`` in order; the same numbers however they are consumed."""
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, n, BLOCK):
        yield torch.randn(dim, min(BLOCK, n - start), generator=generator) / n**0.5


@functools.lru_cache(maxsize=4)
def _projection(dim: int, n: int, seed: int) -> torch.Tensor:
    return torch.cat(list(_blocks(dim, n, seed)), dim=1)  # [d, N]
