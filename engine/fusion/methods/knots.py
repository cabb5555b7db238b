"""``knots``: align the LoRAs' updates in one SVD basis, then TIES or DARE-TIES there (KnOTS).

Stoica et al., "Model merging with SVD to tie the KnOTS" (ICLR 2025),
https://arxiv.org/abs/2410.19735, code https://github.com/gstoica27/KnOTS (``SVDMerger``).

Per module, the task updates are concatenated along the input dimension and decomposed once:
``[tau_1 | ... | tau_K] = U diag(s) [V_1^T | ... | V_K^T]``, so ``tau_i = U diag(s) V_i^T`` share
the basis ``U``. The scaled blocks ``diag(s) V_i^T`` (``k x d_in``, ``k <= sum r_i``) are merged
entry-wise by the inner method, and ``dW = alpha * U @ merged``:

- ``inner="ties"``: keep each task's top ``density`` entries by magnitude, elect the sign of the
  summed values, average the agreeing entries over their count (the reference's ``ties`` masking
  with ``merging_type="mean"``);
- ``inner="dare"``: first drop entries with probability ``drop`` and rescale by ``1/(1-drop)``
  (the reference's ``dare``), then the same TIES step.

Conventions: ``concat_across_output=True`` (the shared basis is on the output side); singular
values below ``1e-6`` of the largest are dropped (the reference drops ``s <= 1e-5``); the TIES trim
is per module (the reference trims each task's whole flattened model, which a per-module stream
cannot see). Exact low-rank: QR of the stacked ``B``'s and of each ``A_i^T`` and an ``R x R`` SVD;
the output has rank ``k``; no dense ``d_out x d_in`` product is formed.

Task vectors are ``tau_i = K w_i dW_i``. Defaults are the reference's ViT-B/32 LoRA configs
(``ties``: ``density=0.2``, ``alpha=0.6``; ``dare``: ``drop=0.1``, ``density=1.0``,
``alpha=0.7``). Unset ``alpha`` and ``density`` are searched on the support examples when the
context has ``loss_fn``; DARE's masks are drawn from the fusion's seed.
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
from engine.fusion.subspace import concat_svd, dare_drop, task_factors, ties_rows, zero_update

ALPHA_GRID = tuple(round(0.1 * i, 1) for i in range(1, 11))  # 0.1 .. 1.0
DENSITY_GRID = (0.1, 0.2, 0.4, 0.7, 1.0)
DEFAULTS = {"ties": {"alpha": 0.6, "density": 0.2}, "dare": {"alpha": 0.7, "density": 1.0}}


class KnotsParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    inner: Literal["ties", "dare"] = "ties"
    alpha: float | None = pydantic.Field(None, gt=0, description="global scale; None: picked or default")
    density: float | None = pydantic.Field(
        None, gt=0, le=1, description="TIES: share of each task's entries kept; None: picked or default"
    )
    drop: float | None = pydantic.Field(
        None, ge=0, lt=1, description="inner='dare': drop probability (default 0.1)"
    )

    @pydantic.model_validator(mode="after")
    def _drop_needs_dare(self):
        if self.drop is not None and self.inner != "dare":
            raise ValueError(f"drop is DARE's drop probability: set inner='dare' (got inner={self.inner!r})")
        return self

    @property
    def wanted_context(self) -> tuple[str, ...]:
        return support_wanted(self.alpha, self.density)


def knots_factors(
    factors: list[tuple[torch.Tensor, torch.Tensor]],
    density: float,
    drop: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KnOTS of task factors ``(A_i, B_i)`` at ``alpha = 1``: ``(A = merged [k, d_in], B = U)``."""
    U, s, vhs = concat_svd(factors)
    if s.numel() == 0:
        return zero_update(factors)
    scaled = torch.stack([(s[:, None] * vh).flatten() for vh in vhs])  # [K, k * d_in]
    if drop > 0:
        scaled = dare_drop(scaled, drop, generator)
    merged = ties_rows(scaled, density).view(s.shape[0], -1)
    return merged, U


@fusion_method("knots", KnotsParams, reference="https://arxiv.org/abs/2410.19735 (KnOTS)")
def knots(
    inputs: FusionInputs, params: KnotsParams, *, loss_fn: Callable[[LoraAdapter], float] | None = None
) -> tuple[LoraAdapter, dict]:
    """Shared SVD basis of the task updates, TIES or DARE-TIES on their aligned components (KnOTS)."""
    count = len(inputs.adapters)
    defaults = DEFAULTS[params.inner]
    drop = (0.1 if params.drop is None else params.drop) if params.inner == "dare" else 0.0

    def build(values: dict[str, float]) -> LoraAdapter:
        generator = inputs.generator()  # every candidate draws the same DARE masks

        def fuse(name: str, modules: list[LoraModule], weights: list[float]):
            return knots_factors(task_factors(modules, weights, count), values["density"], drop, generator)

        return fuse_by_module(inputs, fuse)

    alpha = Knob("alpha", defaults["alpha"], ALPHA_GRID)
    density = Knob("density", defaults["density"], DENSITY_GRID)
    return pick_on_support(loss_fn, params, alpha, build, (density,))
