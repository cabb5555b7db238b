"""Helpers for methods that fuse module by module (pure tensor math).

Adapters of one base model may target different modules and ranks (a catalog's layout grows,
see :mod:`engine.catalog.catalog`). The fused adapter targets the *union* of the inputs' modules;
each module is fused over the inputs that target it, with their own weights, not renormalised:
an input that does not target a module contributes ``dW = 0`` there, exactly what it does to the
model (PEFT's ``add_weighted_adapter`` convention). Factor-space methods (``linear``, the pruning
methods with ``space="factors"``, ``lorahub`` with ``compose="factors"``) zero-pad a module's
ranks to the largest among its inputs (:func:`padded_to_rank`: the same delta per input).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.adapters.layout import Layout
from engine.adapters.lora import LoraAdapter, LoraModule
from engine.fusion.registry import FusionInputs

# (module name, the adapters' modules of that name, their weights) -> fused (A, B)
ModuleFuser = Callable[[str, list[LoraModule], list[float]], tuple[torch.Tensor, torch.Tensor]]


def module_names(adapters: list[LoraAdapter]) -> list[str]:
    """Union of the adapters' modules in model order."""
    return Layout.sort_names({name for a in adapters for name in a.modules})


def folded(module: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, scaling * B)``: the factors of the module's effective delta."""
    return module.A.float(), module.B.float() * module.scaling


def fuse_by_module(inputs: FusionInputs, fuse_module: ModuleFuser) -> LoraAdapter:
    """Apply ``fuse_module`` to every module, streaming one module at a time.

    An adapter that does not target a module is left out of that module's fusion (as PEFT does).
    The fused adapter has scaling 1 and keeps the first adapter's config (task type, base model).
    """
    modules = {}
    for name in module_names(inputs.adapters):
        present = [(a, w) for a, w in zip(inputs.adapters, inputs.weights, strict=True) if name in a.modules]
        A, B = fuse_module(name, [a.modules[name] for a, _ in present], [w for _, w in present])
        modules[name] = LoraModule(A=A.float().contiguous(), B=B.float().contiguous(), scaling=1.0)
    return fused_adapter(inputs, modules)


def fused_adapter(inputs: FusionInputs, modules: dict[str, LoraModule]) -> LoraAdapter:
    config = {
        key: value
        for key, value in inputs.adapters[0].config.items()
        if key in ("task_type", "base_model_name_or_path", "fan_in_fan_out", "bias", "peft_version")
    }
    config.update(peft_type="LORA", r=1, lora_alpha=1)
    return LoraAdapter(modules=modules, config=config, source="<fused>")


def padded_to_rank(modules: list[LoraModule]) -> list[LoraModule]:
    """``modules`` with zero rank components appended up to their largest rank: each keeps its
    exact delta, and factor-space methods can add their ``A`` and ``B`` factors."""
    rank = max(m.rank for m in modules)
    padded = []
    for m in modules:
        if m.rank == rank:
            padded.append(m)
            continue
        A = torch.cat([m.A, m.A.new_zeros(rank - m.rank, m.d_in)], dim=0)
        B = torch.cat([m.B, m.B.new_zeros(m.d_out, rank - m.rank)], dim=1)
        padded.append(LoraModule(A=A, B=B, scaling=m.scaling))
    return padded


def dense_delta(module: LoraModule) -> torch.Tensor:
    """``scaling * B @ A``, ``[d_out, d_in]`` float32: for the dense methods, one module at a time."""
    A, B = folded(module)
    return B @ A
