"""Per-slot statistics of a catalog's flat vectors (pure numpy; the Ray pass is in
:mod:`engine.catalog.streaming`).

Moments are combined pairwise with Chan et al.'s parallel update, so a pass over any number of
adapters holds only ``3 x N`` float64 numbers, whatever the catalog's size. A slot counts only
adapters that target its module (absent modules are zero padding, not data).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Moments:
    """Running per-slot moments.

    Attributes:
        count: ``[N]`` int64, adapters that contributed to each slot.
        mean: ``[N]`` float64.
        m2: ``[N]`` float64, sum of squared deviations from ``mean``.
    """

    count: np.ndarray
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def zeros(cls, size: int) -> Moments:
        return cls(np.zeros(size, np.int64), np.zeros(size, np.float64), np.zeros(size, np.float64))

    @classmethod
    def of_batch(cls, weights: np.ndarray, slot_mask: np.ndarray) -> Moments:
        """Moments of one batch.

        Args:
            weights: ``[B, N]`` flat vectors.
            slot_mask: ``[B, N]`` bool, True where the slot's module is present.
        """
        w = np.where(slot_mask, weights.astype(np.float64), 0.0)
        count = slot_mask.sum(axis=0).astype(np.int64)
        safe = np.maximum(count, 1)
        mean = w.sum(axis=0) / safe
        m2 = (np.where(slot_mask, w - mean, 0.0) ** 2).sum(axis=0)
        return cls(count, mean, m2)

    def merge(self, other: Moments) -> Moments:
        """Moments of the union of both sets of adapters."""
        count = self.count + other.count
        safe = np.maximum(count, 1)
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / safe)
        m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / safe)
        return Moments(count, mean, m2)

    def std(self) -> np.ndarray:
        """Population standard deviation per slot (0 where fewer than 2 adapters contributed)."""
        return np.sqrt(self.m2 / np.maximum(self.count, 1))


@dataclass
class SlotStats:
    """Stored statistics of one layout of a catalog.

    Attributes:
        layout_id: layout the slots belong to.
        manifest_version: catalog version the statistics were computed on.
        num_adapters: adapters in that version and layout.
        count, mean, std: ``[N]`` per-slot arrays.
    """

    layout_id: str
    manifest_version: int
    num_adapters: int
    count: np.ndarray
    mean: np.ndarray
    std: np.ndarray

    def summary(self) -> dict[str, float]:
        present = self.count > 0
        std = self.std[present]
        return {
            "slots": int(self.count.size),
            "slots_with_data": int(present.sum()),
            "mean_abs_mean": float(np.abs(self.mean[present]).mean()) if present.any() else 0.0,
            "mean_std": float(std.mean()) if std.size else 0.0,
            "min_std": float(std.min()) if std.size else 0.0,
            "max_std": float(std.max()) if std.size else 0.0,
            "zero_std_fraction": float((std == 0).mean()) if std.size else 0.0,
        }
