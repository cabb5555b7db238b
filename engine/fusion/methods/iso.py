"""``iso_c`` and ``iso_cts``: isotropic merging in common (and task-specific) subspaces.

Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
Subspaces" (ICML 2025), https://arxiv.org/abs/2502.04959, code https://github.com/danielm1405/iso-merging
(``src/utils/iso.py``).

- ``iso_c``: the task-arithmetic sum ``T = sum_i tau_i = U diag(s) V^T`` with its spectrum made flat:
  ``alpha * mean(s) * U V^T``.
- ``iso_cts``: the top ``common_fraction`` of ``T``'s singular directions (the common subspace) plus,
  per task, the top directions of ``tau_i`` projected off the common subspace (``(I - U_c U_c^T)
  tau_i``), all the task blocks of equal size; the stacked left and right singular vectors are
  replaced by their polar factors and the spectrum by its mean: ``alpha * mean(s) * P_U P_V^T``.

LoRA convention: the reference applies these to full fine-tuning deltas, where the spectrum has
``min(d_out, d_in)`` values. A sum of LoRAs has rank ``R <= sum r_i``; its other singular
directions are an arbitrary basis of the null space, so here the spectrum (and the dimension that
``common_fraction`` divides) is the sum's ``R`` nonzero singular values. This is what Core Space
merging's Iso-C computes for LoRAs (its core is ``R x R``) whenever the sum has rank ``R``, and
the reference itself whenever ``R >= min(d_out, d_in)``. Everything is exact low-rank algebra:
QR of the stacked factors, small SVDs, and polar factors of ``[d, R]`` matrices; the output has
rank ``R``.

Task vectors are ``tau_i = K w_i dW_i`` (default weights give the papers' plain sum). ``alpha`` is
searched on the support examples when the context has ``loss_fn`` (the reference searches
``alpha`` in ``(0, 3]`` on validation data), otherwise 1.0 (the sum's mean singular value).
"""

from __future__ import annotations

from collections.abc import Callable

import pydantic
import torch

from engine.adapters.lora import LoraAdapter, LoraModule
from engine.fusion.modulewise import fuse_by_module
from engine.fusion.registry import FusionInputs, fusion_method
from engine.fusion.selection import Knob, pick_on_support, support_wanted
from engine.fusion.subspace import polar, stacked, task_factors, thin_svd, zero_update

ISO_REF = "https://arxiv.org/abs/2502.04959 (Iso-C / Iso-CTS); https://github.com/danielm1405/iso-merging"
ALPHA = Knob("alpha", 1.0, tuple(round(0.25 * i, 2) for i in range(1, 13)))  # 0.25 .. 3.0


class IsoCParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    alpha: float | None = pydantic.Field(
        None, gt=0, description="global scale; None: picked on support examples, else 1.0"
    )

    @property
    def wanted_context(self) -> tuple[str, ...]:
        return support_wanted(self.alpha)


class IsoCTSParams(IsoCParams):
    common_fraction: float = pydantic.Field(
        0.8, gt=0, le=1, description="share of the summed spectrum kept as the common subspace"
    )


def iso_c_factors(factors: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Iso-C of task factors ``(A_i, B_i)``: ``(A, B)`` with ``B @ A = mean(s) U V^T`` of ``sum B_i A_i``."""
    U, s, Vh = thin_svd(*stacked(factors))
    if s.numel() == 0:
        return zero_update(factors)
    return Vh, U * s.mean()


def iso_cts_factors(
    factors: list[tuple[torch.Tensor, torch.Tensor]], common_fraction: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Iso-CTS of task factors ``(A_i, B_i)``, following the reference's subspace sizes."""
    K = len(factors)
    U, s, Vh = thin_svd(*stacked(factors))
    if s.numel() == 0:
        return zero_update(factors)
    dim = s.shape[0]
    common = int(dim * common_fraction)
    per_task = round((dim - common) / K)  # task blocks of equal size (the reference's rounding)
    common = dim - per_task * K
    us, ss, vhs = [U[:, :common]], [s[:common]], [Vh[:common]]
    for a, b in factors:
        off_common = b - us[0] @ (us[0].T @ b)  # (I - U_c U_c^T) B_i A_i, still factored
        u_t, s_t, vh_t = thin_svd(a, off_common, tol=None)
        us.append(u_t[:, :per_task]), ss.append(s_t[:per_task]), vhs.append(vh_t[:per_task])
    stacked_s = torch.cat(ss)
    left, right = polar(torch.cat(us, dim=1)), polar(torch.cat(vhs, dim=0).T)
    return right.T.contiguous(), left * stacked_s.mean()


def _fuse(inputs: FusionInputs, params: IsoCParams, merge, loss_fn) -> tuple[LoraAdapter, dict]:
    count = len(inputs.adapters)

    def build(values: dict[str, float]) -> LoraAdapter:
        def fuse(name: str, modules: list[LoraModule], weights: list[float]):
            return merge(task_factors(modules, weights, count))

        return fuse_by_module(inputs, fuse)

    return pick_on_support(loss_fn, params, ALPHA, build)


@fusion_method("iso_c", IsoCParams, reference=ISO_REF)
def iso_c(
    inputs: FusionInputs, params: IsoCParams, *, loss_fn: Callable[[LoraAdapter], float] | None = None
) -> tuple[LoraAdapter, dict]:
    """Task-arithmetic sum with its singular spectrum flattened to the mean (Iso-C), exact low-rank."""
    return _fuse(inputs, params, iso_c_factors, loss_fn)


@fusion_method("iso_cts", IsoCTSParams, reference=ISO_REF)
def iso_cts(
    inputs: FusionInputs, params: IsoCTSParams, *, loss_fn: Callable[[LoraAdapter], float] | None = None
) -> tuple[LoraAdapter, dict]:
    """Common subspace of the sum plus task-specific subspaces, decorrelated and isotropic (Iso-CTS)."""
    return _fuse(inputs, params, lambda factors: iso_cts_factors(factors, params.common_fraction), loss_fn)
