"""``core_space``: merge LoRAs exactly in their shared ``R x R`` core space (Core Space merging).

Panariello et al., "Accurate and Efficient Low-Rank Model Merging in Core Space" (NeurIPS 2025),
https://arxiv.org/abs/2509.17786, code https://github.com/apanariello4/core-space-merging
(``MatrixPerLayerMerger.get_core_matrices``, ``merge_space="core"``).

Per module, with ``R = sum r_i``: the reference bases are the right singular vectors of the stacked
``A``'s (``V_ref^T = svd([A_1; ...; A_K]).Vh``, ``R x d_in``) and the left singular vectors of
the stacked ``B``'s (``U_ref = svd([B_1 ... B_K]).U``, ``d_out x R``), each from a QR and an
``R x R`` SVD (the same vectors up to signs, which no inner method depends on). Every task update lies in their
span, so ``tau_i = U_ref M_i V_ref^T`` exactly with the core ``M_i = (U_ref^T B_i)(A_i V_ref)``
(``R x R``). The inner method merges the cores, and ``dW = alpha * U_ref M V_ref^T``: a LoRA of
rank ``R`` with ``B = alpha U_ref M`` and ``A = V_ref^T``. The stacked factors are
``R x d_in`` and ``d_out x R``; no dense ``d_out x d_in`` product is formed.

Inner methods (on the cores, as the reference's ``_merge_tensors``):

- ``ta``: the sum (task arithmetic; equal to it in full space);
- ``ties``: TIES with ``density`` (reference default ``topK=10``, i.e. 0.1), disjoint mean;
- ``dare``: drop with probability ``drop`` (default 0.3), rescale by ``1/(1-drop)``, sum;
- ``tsv``: TSV-M on the cores, each keeping ``int(R/K)`` singular triplets (the reference default;
  ``r`` with equal ranks, i.e. full-space TSV-M, unless ``R`` exceeds ``d_in`` or ``d_out`` and
  the core shrinks to ``min(R, d)``);
- ``iso_c``: the sum with its ``R`` singular values replaced by their mean (Iso-C; equal to
  :mod:`iso_c <engine.fusion.methods.iso>` in full space).

Convention: ``B_i`` already carries ``K w_i`` times its PEFT scaling when the bases are computed
(the reference stacks the raw factors; the span is the same, the basis, which only ``ties`` and
``dare`` see, follows the effective updates). Default ``alpha``: the reference config's 0.2 for
``tsv``, 1.0 for ``ties`` and ``iso_c``, 0.4 (task arithmetic's recommended scale) for ``ta`` and
``dare``; unset ``alpha`` (and ``density`` for ``ties``) are searched on the support examples when
the context has ``loss_fn``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import pydantic
import torch

from engine.adapters.lora import LoraAdapter, LoraModule
from engine.fusion.modulewise import fuse_by_module
from engine.fusion.registry import FusionInputs, fusion_method
from engine.fusion.selection import Knob, pick_on_support, support_wanted
from engine.fusion.subspace import (
    dare_drop,
    isotropic,
    left_singular_vectors,
    task_factors,
    ties_rows,
    tsv_dense,
)

Inner = Literal["ta", "ties", "dare", "tsv", "iso_c"]
DEFAULT_ALPHA = {"ta": 0.4, "ties": 1.0, "dare": 0.4, "tsv": 0.2, "iso_c": 1.0}
ALPHA_GRID = {
    "ta": tuple(round(0.1 * i, 1) for i in range(1, 11)),
    "dare": tuple(round(0.1 * i, 1) for i in range(1, 11)),
    "ties": tuple(round(0.25 * i, 2) for i in range(1, 9)),
    "tsv": tuple(round(0.1 * i, 1) for i in range(1, 11)),
    "iso_c": tuple(round(0.25 * i, 2) for i in range(1, 13)),
}
DENSITY_GRID = (0.1, 0.2, 0.4, 0.7, 1.0)


class CoreSpaceParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    inner: Inner = "tsv"
    alpha: float | None = pydantic.Field(None, gt=0, description="global scale; None: picked or default")
    density: float | None = pydantic.Field(
        None, gt=0, le=1, description="inner='ties': share of each core's entries kept (default 0.1)"
    )
    drop: float | None = pydantic.Field(
        None, ge=0, lt=1, description="inner='dare': drop probability (default 0.3)"
    )

    @pydantic.model_validator(mode="after")
    def _knobs_match_inner(self):
        faults = []
        if self.density is not None and self.inner != "ties":
            faults.append(f"density is TIES' trim: set inner='ties' (got inner={self.inner!r})")
        if self.drop is not None and self.inner != "dare":
            faults.append(f"drop is DARE's drop probability: set inner='dare' (got inner={self.inner!r})")
        if faults:
            raise ValueError("; ".join(faults))
        return self

    @property
    def wanted_context(self) -> tuple[str, ...]:
        density = self.density if self.inner == "ties" else 0.0  # other inners have no density knob
        return support_wanted(self.alpha, density)


def core_bases(
    factors: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """``(U_ref [d_out, R], Vh_ref [R, d_in], cores M_i [R, R])`` with ``B_i A_i = U_ref M_i Vh_ref``."""
    vh_ref = left_singular_vectors(torch.cat([a.double() for a, _ in factors]).T).T
    u_ref = left_singular_vectors(torch.cat([b.double() for _, b in factors], dim=1))
    cores = [(u_ref.T @ b.double()) @ (a.double() @ vh_ref.T) for a, b in factors]
    return u_ref, vh_ref, cores


def merge_cores(
    cores: list[torch.Tensor], inner: Inner, density: float, drop: float, generator: torch.Generator
) -> torch.Tensor:
    """The inner method on same-shape dense cores."""
    if inner == "ta":
        return torch.stack(cores).sum(0)
    if inner == "ties":
        return ties_rows(torch.stack([c.flatten() for c in cores]), density).view_as(cores[0])
    if inner == "dare":
        return torch.stack([dare_drop(c, drop, generator) for c in cores]).sum(0)
    if inner == "tsv":
        return tsv_dense(cores)
    return isotropic(torch.stack(cores).sum(0))


@fusion_method(
    "core_space", CoreSpaceParams, reference="https://arxiv.org/abs/2509.17786 (Core Space merging)"
)
def core_space(
    inputs: FusionInputs, params: CoreSpaceParams, *, loss_fn: Callable[[LoraAdapter], float] | None = None
) -> tuple[LoraAdapter, dict]:
    """Merge the LoRAs' R x R cores in their shared reference bases with an inner method (Core Space)."""
    count = len(inputs.adapters)
    drop = 0.3 if params.drop is None else params.drop

    def build(values: dict[str, float]) -> LoraAdapter:
        generator = inputs.generator()

        def fuse(name: str, modules: list[LoraModule], weights: list[float]):
            u_ref, vh_ref, cores = core_bases(task_factors(modules, weights, count))
            merged = merge_cores(cores, params.inner, values.get("density", 0.1), drop, generator)
            return vh_ref, u_ref @ merged

        return fuse_by_module(inputs, fuse)

    alpha = Knob("alpha", DEFAULT_ALPHA[params.inner], ALPHA_GRID[params.inner])
    knobs = (Knob("density", 0.1, DENSITY_GRID),) if params.inner == "ties" else ()
    return pick_on_support(loss_fn, params, alpha, build, knobs)
