"""``cat``: the exact weighted sum, as a LoRA whose rank is the sum of the input ranks.

Convention (PEFT's ``cat``): ``A = [w_1 s_1 A_1; ...; w_K s_K A_K]``, ``B = [B_1 ... B_K]``, so
``B A = sum_i w_i s_i B_i A_i`` exactly.
"""

from __future__ import annotations

import torch

from engine.adapters.lora import LoraAdapter, LoraModule
from engine.fusion.modulewise import fuse_by_module
from engine.fusion.registry import FusionInputs, NoParams, fusion_method


def _cat_module(name: str, modules: list[LoraModule], weights: list[float]):
    A = torch.cat([m.A.float() * (w * m.scaling) for m, w in zip(modules, weights, strict=True)], dim=0)
    B = torch.cat([m.B.float() for m in modules], dim=1)
    return A, B


@fusion_method("cat", reference="https://github.com/huggingface/peft (add_weighted_adapter, cat)")
def cat(inputs: FusionInputs, params: NoParams) -> tuple[LoraAdapter, dict]:
    """Exact weighted sum of the deltas; output rank = sum of input ranks."""
    return fuse_by_module(inputs, _cat_module), {}
