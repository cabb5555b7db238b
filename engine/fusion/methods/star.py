"""``star``: spectral truncation and rescaling of each LoRA, then the weighted sum (STAR).

Lee et al., "STAR: Spectral Truncation and Rescale for Model Merging" (NAACL 2025), code
https://github.com/IBM/STAR (``merger/STAR.py``).

Per module and task, ``dW_i = U diag(s) V^T`` keeps its first ``k`` singular triplets, the fewest
whose cumulative sum reaches ``eta`` % of the nuclear norm (``k = searchsorted(cumsum(s),
eta/100 * sum(s)) + 1``, the reference's rule), and the kept values are rescaled so their sum is
the original nuclear norm: ``s_j * sum(s) / sum(s[:k])``. The truncated updates are then merged by
the weighted sum ``sum_i w_i STAR(dW_i)`` (the reference averages with ``1/K``: the default
weights). STAR is positively homogeneous, so the weights may be applied before or after.

Exact low-rank: each task's SVD from QR of its factors and an ``r_i x r_i`` SVD; the output is the
concatenation of the truncated factors (rank ``sum k_i``), optionally truncated to ``rank`` by the
exact low-rank SVD. Data-free: ``eta`` defaults to the reference's 40.
"""

from __future__ import annotations

import pydantic
import torch

from engine.adapters.lora import LoraAdapter, LoraModule
from engine.fusion.lowrank import truncate_lowrank
from engine.fusion.modulewise import fuse_by_module
from engine.fusion.registry import FusionInputs, fusion_method
from engine.fusion.subspace import task_factors, thin_svd, zero_update


class StarParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    eta: float = pydantic.Field(40.0, gt=0, le=100, description="percent of the nuclear norm kept per task")
    rank: int | None = pydantic.Field(None, gt=0, description="output rank; None keeps the exact sum")


def star_truncate(A: torch.Tensor, B: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """STAR of one update ``B @ A``: ``(A_k [k, d_in], B_k [d_out, k])``."""
    U, s, Vh = thin_svd(A, B)
    if s.numel() == 0:
        return zero_update([(A, B)])
    cumulative = torch.cumsum(s, dim=0)
    k = min(int(torch.searchsorted(cumulative, cumulative[-1] * eta / 100)) + 1, s.shape[0])
    rescaled = s[:k] * (cumulative[-1] / cumulative[k - 1])
    return Vh[:k], U[:, :k] * rescaled


@fusion_method("star", StarParams, reference="https://github.com/IBM/STAR (STAR, NAACL 2025)")
def star(inputs: FusionInputs, params: StarParams) -> tuple[LoraAdapter, dict]:
    """Truncate each LoRA to eta % of its nuclear norm, rescale the kept spectrum, sum (STAR)."""

    def fuse(name: str, modules: list[LoraModule], weights: list[float]):
        truncated = [star_truncate(a, b, params.eta) for a, b in task_factors(modules, weights, 1)]
        A = torch.cat([a for a, _ in truncated])
        B = torch.cat([b for _, b in truncated], dim=1)
        return (A, B) if params.rank is None else truncate_lowrank(A, B, params.rank)

    return fuse_by_module(inputs, fuse), {}
