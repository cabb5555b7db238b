"""``task_arithmetic`` and ``svd``: the weighted sum of deltas, truncated to a rank exactly.

Both compute ``sum_i w_i s_i B_i A_i`` from QR factors of the stacked ``B``'s and ``A^T``'s and an
``R x R`` SVD (:mod:`engine.fusion.lowrank`) — never the dense ``d_out x d_in`` matrix — and keep
its best rank-``k`` approximation.

- ``task_arithmetic`` (Ilharco et al., 2023): ``lambda * sum w_i dW_i``; by default exact (rank
  ``sum r_i``), or truncated to ``rank``; factors split evenly (``U sqrt(S)``, ``sqrt(S) V^T``).
- ``svd`` (PEFT's ``svd``): rank defaults to the largest input rank; factors split as PEFT does
  (``B = U S``, ``A = V^T``), optionally clamped at a quantile (PEFT's ``svd_clamp``).
"""

from __future__ import annotations

import pydantic
import torch

from engine.adapters.lora import LoraAdapter, LoraModule
from engine.fusion.lowrank import lowrank_weighted_sum
from engine.fusion.modulewise import folded, fuse_by_module
from engine.fusion.registry import FusionInputs, fusion_method


class TaskArithmeticParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    lam: float = pydantic.Field(1.0, description="scale lambda applied to the weighted sum")
    rank: int | None = pydantic.Field(None, gt=0, description="target rank; None keeps the exact sum")


class SvdParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    rank: int | None = pydantic.Field(None, gt=0, description="target rank; None = largest input rank")
    clamp: float | None = pydantic.Field(None, gt=0, le=1, description="quantile for clamping factors")


@fusion_method(
    "task_arithmetic",
    TaskArithmeticParams,
    reference="https://arxiv.org/abs/2212.04089 (Editing Models with Task Arithmetic)",
)
def task_arithmetic(inputs: FusionInputs, params: TaskArithmeticParams) -> tuple[LoraAdapter, dict]:
    """lambda * sum_i w_i dW_i, exact or truncated to a rank without forming dW."""

    def fuse(name: str, modules: list[LoraModule], weights: list[float]):
        factors = [folded(m) for m in modules]
        return lowrank_weighted_sum(factors, [params.lam * w for w in weights], params.rank)

    return fuse_by_module(inputs, fuse), {}


def peft_split(A: torch.Tensor, B: torch.Tensor, clamp: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-split balanced SVD factors (``sqrt(S)`` on both sides) as PEFT does: ``B = U S, A = V^T``."""
    root = A.norm(dim=1).clamp_min(1e-30)  # ||sqrt(s_i) v_i|| = sqrt(s_i)
    A, B = A / root[:, None], B * root[None, :]
    if clamp is not None:
        high = torch.quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
        A, B = A.clamp(-high, high), B.clamp(-high, high)
    return A, B


@fusion_method("svd", SvdParams, reference="https://github.com/huggingface/peft (add_weighted_adapter, svd)")
def svd(inputs: FusionInputs, params: SvdParams) -> tuple[LoraAdapter, dict]:
    """sum_i w_i dW_i truncated by SVD to the largest input rank (PEFT's svd, computed exactly low-rank)."""

    def fuse(name: str, modules: list[LoraModule], weights: list[float]):
        rank = params.rank or max(m.rank for m in modules)
        A, B = lowrank_weighted_sum([folded(m) for m in modules], weights, rank)
        return peft_split(A, B, params.clamp)

    return fuse_by_module(inputs, fuse), {}
