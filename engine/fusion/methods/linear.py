"""``linear``: PEFT's ``add_weighted_adapter(combination_type="linear")``.

Convention (PEFT): ``A = sum_i sign(w_i s_i) sqrt|w_i s_i| A_i`` and
``B = sum_i sqrt|w_i s_i| B_i`` on the adapters' own factors, so the product has cross terms
``B_i A_j``: a cheap, rough approximation of the weighted sum that depends on each adapter's basis.
PEFT needs equal ranks per module; here lower ranks are zero-padded to the largest (the same delta
per adapter; the cross terms then pair rank components by index, as PEFT's would at equal ranks).
A module an adapter does not target is fused over the adapters that do (see
:mod:`engine.fusion.modulewise`).
"""

from __future__ import annotations

import math

import torch

from engine.adapters.lora import LoraAdapter, LoraModule
from engine.fusion.modulewise import fuse_by_module, padded_to_rank
from engine.fusion.registry import FusionInputs, NoParams, fusion_method


def factor_weights(modules: list[LoraModule], weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's per-factor weights: ``(for A: signed sqrt|w s|, for B: sqrt|w s|)``, each ``[K]``."""
    scaled = [w * m.scaling for m, w in zip(modules, weights, strict=True)]
    for_a = torch.tensor([math.copysign(math.sqrt(abs(x)), x) for x in scaled])
    for_b = torch.tensor([math.sqrt(abs(x)) for x in scaled])
    return for_a, for_b


def _linear_module(name: str, modules: list[LoraModule], weights: list[float]):
    modules = padded_to_rank(modules)
    for_a, for_b = factor_weights(modules, weights)
    A = sum(c * m.A.float() for c, m in zip(for_a.tolist(), modules, strict=True))
    B = sum(c * m.B.float() for c, m in zip(for_b.tolist(), modules, strict=True))
    return A, B


@fusion_method("linear", reference="https://github.com/huggingface/peft (add_weighted_adapter, linear)")
def linear(inputs: FusionInputs, params: NoParams) -> tuple[LoraAdapter, dict]:
    """Weighted sum of the A factors and of the B factors separately (PEFT's linear)."""
    return fuse_by_module(inputs, _linear_module), {}
