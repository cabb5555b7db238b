"""Per-slot normalisation of flat adapter vectors (docs/design.md §2.2), pure torch."""

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
    def per_token_scale(
        cls,
        layout,
        mean: np.ndarray,
        std: np.ndarray,
        count: np.ndarray,
        min_std: float = 1e-6,
        per_rank: bool = True,
    ) -> SlotNormalizer:
        """Mean 0 and one scale per (module type, ``A`` or ``B``, rank index): the root mean
        square of those slots over the catalog (from its per-slot statistics).

        For the module-token F-VAE (:mod:`engine.fvae.tokens`): zero stays zero, so absent modules
        and zero-padded ranks are recognisable as all-zero tokens, and every layer of a module
        type shares one scale, as it shares the type's projections. Rank indices keep their own
        scale because canonical components are ordered by decreasing singular value.

        Args:
            layout: the :class:`engine.adapters.layout.Layout` of the statistics.
            mean, std, count: ``[N]`` per-slot statistics (:class:`engine.catalog.SlotStats`).
            per_rank: False: one scale per (module type, ``A`` or ``B``) for all rank indices, so
                that each module's update ``B A`` is only multiplied by a constant, whatever gauge
                its factors are written in (``recon_space: delta``).
        """
        from engine.fvae.tokens import ModuleTokens

        tokens = ModuleTokens.from_layout(layout)
        # Each slot's mean square (std^2 + mean^2) weighted by its count: the pooled mean square
        # over every adapter of the group, whatever modules each adapter targets.
        seen = np.asarray(count, np.float64)
        square = (np.asarray(std, np.float64) ** 2 + np.asarray(mean, np.float64) ** 2) * seen
        r = layout.r_max
        sums = np.zeros((len(tokens.types), 2, r))
        cells = np.zeros((len(tokens.types), 2, r))
        parts = []  # per module: (type, [(part, start, width)])
        for m, t in enumerate(tokens.type_of):
            spec, start = layout.modules[m], int(layout.offsets[m])
            blocks = [(0, start, spec.d_in), (1, start + r * spec.d_in, spec.d_out)]
            for part, offset, width in blocks:
                sums[t, part] += square[offset : offset + r * width].reshape(r, width).sum(1)
                cells[t, part] += seen[offset : offset + r * width].reshape(r, width).sum(1)
            parts.append((t, blocks))
        if not per_rank:
            sums[:] = sums.sum(axis=2, keepdims=True)
            cells[:] = cells.sum(axis=2, keepdims=True)
        rms = np.sqrt(sums / np.maximum(cells, 1))
        scale = np.where((cells > 0) & (rms > min_std), rms, 1.0)
        out = np.ones(layout.size, dtype=np.float32)
        for t, blocks in parts:
            for part, offset, width in blocks:
                out[offset : offset + r * width] = np.repeat(scale[t, part], width)
        return cls(torch.zeros(layout.size), torch.as_tensor(out))

    @classmethod
    def for_config(
        cls, config, layout, mean: np.ndarray, std: np.ndarray, count: np.ndarray
    ) -> SlotNormalizer:
        """The normaliser an F-VAE (:class:`engine.fvae.config.FVAEConfig`, arch resolved) reads:
        :meth:`per_token_scale` for ``tokens`` (zero-preserving; one scale for all ranks when it
        reconstructs updates), else per-slot :meth:`from_stats`."""
        if config.arch == "tokens":
            return cls.per_token_scale(layout, mean, std, count, per_rank=config.recon_space == "factors")
        return cls.from_stats(mean, std, count)

    @classmethod
    def identity(cls, size: int) -> SlotNormalizer:
        return cls(torch.zeros(size), torch.ones(size))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., N]`` -> normalised ``[..., N]``."""
        # One [..., N] result and no temporary: these vectors are ~0.2 GB each at 7-8 B sizes.
        return (x - self.mean.to(x.device)).div_(self.std.to(x.device))

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.mean.to(x.device), x, self.std.to(x.device))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "std": self.std}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> SlotNormalizer:
        return cls(state["mean"].float(), state["std"].float())
