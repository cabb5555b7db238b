"""``tsv``: Task Singular Vectors merge (TSV-M), decorrelated per-layer task SVDs.

Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging" (CVPR 2025),
https://arxiv.org/abs/2412.00081, code https://github.com/AntoAndGar/task_singular_vectors
(``compute_and_sum_svd_mem_reduction``).

Per module, each task update ``tau_i = U_i diag(s_i) V_i^T`` keeps its top singular triplets; the
concatenations ``U = [U_1 ... U_K]`` and ``V = [V_1 ... V_K]`` are replaced by their polar factors
(the nearest orthonormal matrices, which removes the interference between tasks' directions) and
``dW = alpha * polar(U) diag([s_1 ... s_K]) polar(V)^T``.

LoRA convention: the reference keeps ``int(min(d_out, d_in) / K)`` triplets per task. A LoRA's
update has only ``r_i`` nonzero ones; beyond them the reference would stack singular vectors of
the null space, an arbitrary basis that changes the polar factors. Here each task keeps its
``r_i`` nonzero triplets (``rank_per_task`` truncates further): what the reference computes in
Core Space, where each ``R x R`` core keeps ``int(R / K) = r`` triplets (equal ranks), and the same
merge in full space because polar factors commute with the orthonormal core bases. Exact
low-rank: each task's SVD from QR of its factors, polar factors of ``[d, sum r_i]`` matrices; the
output has rank ``sum r_i``.

Task vectors are ``tau_i = K w_i dW_i``. ``alpha`` is searched on the support examples when the
context has ``loss_fn`` (the reference searches ``(0, 3]`` on validation data), otherwise 1.0.
"""

from __future__ import annotations

from collections.abc import Callable

import pydantic
import torch

from engine.adapters.lora import LoraAdapter, LoraModule
from engine.fusion.modulewise import fuse_by_module
from engine.fusion.registry import FusionInputs, fusion_method
from engine.fusion.selection import Knob, pick_on_support, support_wanted
from engine.fusion.subspace import polar, task_factors, thin_svd, zero_update

ALPHA = Knob("alpha", 1.0, tuple(round(0.25 * i, 2) for i in range(1, 13)))  # 0.25 .. 3.0


class TsvParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    alpha: float | None = pydantic.Field(
        None, gt=0, description="global scale; None: picked on support examples, else 1.0"
    )
    rank_per_task: int | None = pydantic.Field(
        None, gt=0, description="singular triplets kept per task (default: all of the LoRA's rank)"
    )

    @property
    def wanted_context(self) -> tuple[str, ...]:
        return support_wanted(self.alpha)


def tsv_factors(
    factors: list[tuple[torch.Tensor, torch.Tensor]], rank_per_task: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """TSV-M of task factors ``(A_i, B_i)``: ``(A, B)`` with ``B @ A = polar(U) diag(s) polar(V)^T``."""
    us, ss, vhs = [], [], []
    for a, b in factors:
        u, s, vh = thin_svd(a, b)
        us.append(u[:, :rank_per_task]), ss.append(s[:rank_per_task]), vhs.append(vh[:rank_per_task])
    s = torch.cat(ss)
    if s.numel() == 0:
        return zero_update(factors)
    left, right = polar(torch.cat(us, dim=1)), polar(torch.cat(vhs, dim=0).T)
    return right.T.contiguous(), left * s


@fusion_method("tsv", TsvParams, reference="https://arxiv.org/abs/2412.00081 (Task Singular Vectors, TSV-M)")
def tsv(
    inputs: FusionInputs, params: TsvParams, *, loss_fn: Callable[[LoraAdapter], float] | None = None
) -> tuple[LoraAdapter, dict]:
    """Per-module task SVDs with decorrelated (polar) singular vectors, summed (TSV-M), exact low-rank."""
    count = len(inputs.adapters)

    def build(values: dict[str, float]) -> LoraAdapter:
        def fuse(name: str, modules: list[LoraModule], weights: list[float]):
            return tsv_factors(task_factors(modules, weights, count), params.rank_per_task)

        return fuse_by_module(inputs, fuse)

    return pick_on_support(loss_fn, params, ALPHA, build)
