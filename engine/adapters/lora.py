"""In-memory LoRA adapter: per-module ``(A, B, scaling)`` plus the PEFT config it came with."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

# PEFT prefixes every saved key with the wrapper's attribute path; module names in this engine
# are relative to the base model, exactly as PEFT's ``target_modules`` and patterns see them.
PEFT_KEY_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraModule:
    """One adapted linear module: ``delta_W = scaling * B @ A``.

    Attributes:
        A: down projection, shape ``[r, d_in]``.
        B: up projection, shape ``[d_out, r]``.
        scaling: the factor PEFT applies (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA).
        in_gauge: the factors are already in the canonical SVD gauge
            (:func:`engine.adapters.gauge.canonical_gauge`; scaling 1), as a gauge catalog stores
            them: :func:`engine.adapters.codec.to_canonical` takes them as they are instead of
            computing the gauge again. A module built from other factors has it false.
    """

    A: torch.Tensor
    B: torch.Tensor
    scaling: float = 1.0
    in_gauge: bool = False

    def __post_init__(self) -> None:
        if self.in_gauge and self.scaling != 1.0:
            raise ValueError(f"a module in the canonical gauge has scaling 1, got {self.scaling}")

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def d_in(self) -> int:
        return int(self.A.shape[1])

    @property
    def d_out(self) -> int:
        return int(self.B.shape[0])

    def delta(self) -> torch.Tensor:
        """Dense ``scaling * B @ A``, shape ``[d_out, d_in]``; for tests and small modules only."""
        return self.scaling * (self.B.double() @ self.A.double())


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter held in memory.

    Attributes:
        modules: module name (relative to the base model) -> :class:`LoraModule`.
        config: the adapter's ``adapter_config.json`` as a dict.
        extras: ``modules_to_save`` tensors (e.g. a classification head), keyed by parameter
            name relative to the base model; they travel with the adapter but are not LoRA.
        source: where the adapter was read from, for messages and provenance.
    """

    modules: dict[str, LoraModule]
    config: dict[str, Any]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    source: str = "<memory>"

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def max_rank(self) -> int:
        return max(m.rank for m in self.modules.values())

    def num_lora_params(self) -> int:
        return sum(m.A.numel() + m.B.numel() for m in self.modules.values())

    def nbytes(self) -> int:
        """Bytes held by the LoRA factors and the ``modules_to_save`` tensors."""
        tensors = [t for m in self.modules.values() for t in (m.A, m.B)] + list(self.extras.values())
        return sum(t.numel() * t.element_size() for t in tensors)


def match_pattern(patterns: dict[str, Any], module_name: str) -> str | None:
    """Return the first key of a PEFT ``rank_pattern``/``alpha_pattern`` matching ``module_name``.

    Same rule as PEFT (``peft.utils.other.get_pattern_key``): a key matches a module whose name is
    the key or ends with ``"." + key``, the key read as a regular expression.
    """
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def module_rank_and_alpha(config: dict[str, Any], module_name: str) -> tuple[int, float]:
    """The rank and alpha PEFT would give ``module_name`` under ``config``."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rank_key = match_pattern(rank_pattern, module_name)
    alpha_key = match_pattern(alpha_pattern, module_name)
    rank = int(rank_pattern[rank_key]) if rank_key is not None else int(config["r"])
    alpha = float(alpha_pattern[alpha_key]) if alpha_key is not None else float(config["lora_alpha"])
    return rank, alpha


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's scaling: ``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank
