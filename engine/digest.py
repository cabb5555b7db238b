"""Content digests of tensors (cache keys that never name two different values)."""

from __future__ import annotations

import torch


def update_with_tensor(digest, name: str, tensor: torch.Tensor) -> None:
    """Feed ``name``, dtype, shape and the raw bytes of ``tensor`` to a ``hashlib`` digest (so
    tensors with equal bytes but another shape or dtype hash apart)."""
    tensor = tensor.detach().cpu().contiguous()
    digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
