"""Sparsifying merges: ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``.

Each works on tensors element-wise, so it needs the dense ``dW = s B A`` of a module; modules are
streamed one at a time (``space="delta"``, the default), the merged ``dW`` is then truncated by SVD
to ``rank`` (PEFT's ``*_svd`` variants). ``space="factors"`` reproduces PEFT's plain variants,
which apply the merge to the A factors and to the B factors separately (lower ranks zero-padded
to the largest, see :func:`engine.fusion.modulewise.padded_to_rank`). A module an adapter does not
target is merged over the adapters that do.

Conventions for the sign election (``ties``, ``dare_ties``):

- ``convention="peft"`` (PEFT's ``merge_utils``): the majority sign is elected on the pruned,
  *unweighted* tensors; weights are applied after; agreeing entries are averaged by their count.
- ``convention="mergekit"`` (mergekit's ``generalized_task_arithmetic``): the sign is elected on the
  *weighted* tensors, and agreeing entries are divided by the sum of their weights.

Random dropping (DARE) draws from a generator seeded with the fusion's ``seed``.
"""

from __future__ import annotations

from typing import Literal

import pydantic
import torch

from engine.adapters.lora import LoraAdapter, LoraModule
from engine.fusion.lowrank import dense_to_lowrank
from engine.fusion.methods.linear import factor_weights
from engine.fusion.modulewise import dense_delta, fuse_by_module, padded_to_rank
from engine.fusion.registry import FusionInputs, fusion_method

Kind = Literal["ties", "dare_linear", "dare_ties", "magnitude_prune"]


class PruneParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    density: float = pydantic.Field(0.5, gt=0, le=1, description="fraction of entries kept per task")
    space: Literal["delta", "factors"] = "delta"
    rank: int | None = pydantic.Field(
        None, gt=0, description="delta space: output rank (default: largest input)"
    )
    clamp: float | None = pydantic.Field(None, gt=0, le=1, description="delta space: PEFT's svd_clamp")


class SignParams(PruneParams):
    majority_sign: Literal["total", "frequency"] = "total"
    convention: Literal["peft", "mergekit"] = "peft"


def _prune_random(tensor: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    if density >= 1:
        return tensor
    keep = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * keep / density


def _merge_utils():
    # Imported when a merge runs: importing PEFT pulls in transformers' models (seconds), which
    # every `icmf` command would otherwise pay when the CLI lists the methods.
    from peft.utils import merge_utils

    return merge_utils


def _prune_magnitude(tensor: torch.Tensor, density: float) -> torch.Tensor:
    return tensor if density >= 1 else _merge_utils().magnitude_based_pruning(tensor, density)


def _elect_and_merge(pruned: list[torch.Tensor], weights: torch.Tensor, params: SignParams) -> torch.Tensor:
    stacked = torch.stack(pruned)  # [K, ...]
    w = weights.view((-1,) + (1,) * (stacked.dim() - 1)).to(stacked.dtype)
    if params.convention == "peft":
        merge_utils = _merge_utils()
        agree = merge_utils.calculate_majority_sign_mask(stacked, method=params.majority_sign)
        return merge_utils.disjoint_merge(stacked * w, agree)
    weighted = stacked * w
    votes = weighted.sum(0) if params.majority_sign == "total" else weighted.sign().sum(0)
    agree = weighted.sign() == torch.where(votes >= 0, 1.0, -1.0)
    divisor = (w * agree).sum(0)
    divisor[divisor.abs() < 1e-8] = 1.0
    return (weighted * agree).sum(0) / divisor


def merge_tensors(
    kind: Kind,
    tensors: list[torch.Tensor],
    weights: torch.Tensor,
    params: PruneParams,
    generator: torch.Generator,
) -> torch.Tensor:
    """Merge same-shape tensors ``[K] x [...]`` with one sparsifying method."""
    if kind in ("ties", "magnitude_prune"):
        pruned = [_prune_magnitude(t, params.density) for t in tensors]
    else:
        pruned = [_prune_random(t, params.density, generator) for t in tensors]
    if kind in ("ties", "dare_ties"):
        return _elect_and_merge(pruned, weights, params)
    w = weights.view((-1,) + (1,) * tensors[0].dim()).to(tensors[0].dtype)
    return (torch.stack(pruned) * w).sum(0)


def _fuse(kind: Kind, inputs: FusionInputs, params: PruneParams) -> tuple[LoraAdapter, dict]:
    generator = inputs.generator()

    def fuse(name: str, modules: list[LoraModule], weights: list[float]):
        if params.space == "factors":
            modules = padded_to_rank(modules)
            for_a, for_b = factor_weights(modules, weights)
            A = merge_tensors(kind, [m.A.float() for m in modules], for_a, params, generator)
            B = merge_tensors(kind, [m.B.float() for m in modules], for_b, params, generator)
            return A, B
        deltas = [dense_delta(m) for m in modules]
        merged = merge_tensors(kind, deltas, torch.tensor(weights), params, generator)
        return dense_to_lowrank(merged, params.rank or max(m.rank for m in modules), params.clamp)

    return fuse_by_module(inputs, fuse), {}


TIES_REF = "https://arxiv.org/abs/2306.01708 (TIES-Merging)"
DARE_REF = "https://arxiv.org/abs/2311.03099 (DARE: Language Models are Super Mario)"


@fusion_method("ties", SignParams, reference=TIES_REF)
def ties(inputs: FusionInputs, params: SignParams) -> tuple[LoraAdapter, dict]:
    """Trim to the top-density magnitudes, elect signs, average the agreeing entries (TIES)."""
    return _fuse("ties", inputs, params)


@fusion_method("dare_ties", SignParams, reference=DARE_REF)
def dare_ties(inputs: FusionInputs, params: SignParams) -> tuple[LoraAdapter, dict]:
    """Drop entries at random (rescaled by 1/density), then TIES sign election and merge."""
    return _fuse("dare_ties", inputs, params)


@fusion_method("dare_linear", PruneParams, reference=DARE_REF)
def dare_linear(inputs: FusionInputs, params: PruneParams) -> tuple[LoraAdapter, dict]:
    """Drop entries at random (rescaled by 1/density), then the weighted sum."""
    return _fuse("dare_linear", inputs, params)


@fusion_method(
    "magnitude_prune", PruneParams, reference="https://github.com/huggingface/peft (magnitude_prune)"
)
def magnitude_prune(inputs: FusionInputs, params: PruneParams) -> tuple[LoraAdapter, dict]:
    """Keep each task's top-density magnitudes, then the weighted sum."""
    return _fuse("magnitude_prune", inputs, params)
