"""Per-slot normalisation of flat adapter vectors (DESIGN.md §2.2), pure torch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class SlotNormalizer:
    """``x_norm = (x - mean) / std`` per slot; slots with no data or zero spread keep std 1.

    Attributes:
        mean: ``[N]`` float32.
        std: ``[N]`` float32, floored at ``min_std``.
    """

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def from_stats(cls, mean: np.ndarray, std: np.ndarray, count: np.ndarray, min_std: float = 1e-6):
        """From catalog statistics (:class:`engine.catalog.SlotStats` fields)."""
        std = np.where((count > 1) & (std > min_std), std, 1.0)
        mean = np.where(count > 0, mean, 0.0)
        return cls(torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32))

    @classmethod
    def identity(cls, size: int) -> SlotNormalizer:
        return cls(torch.zeros(size), torch.ones(size))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., N]`` -> normalised ``[..., N]``."""
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std.to(x.device) + self.mean.to(x.device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "std": self.std}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> SlotNormalizer:
        return cls(state["mean"].float(), state["std"].float())
