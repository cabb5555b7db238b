"""The fusion-method registry: one interface for every method (mergekit's ``@merge_method`` idea).

A method is a pure function from :class:`FusionInputs` (adapters, weights, seed) and its typed
parameters (a pydantic model) to one :class:`~engine.adapters.LoraAdapter`. Adding a method is one
file in :mod:`engine.fusion.methods` with one ``@fusion_method`` decoration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pydantic
import torch

from engine.adapters.lora import LoraAdapter
from engine.errors import IcmfError


class FusionConfigError(IcmfError, ValueError):
    """Unknown method or invalid parameters; the message lists every fault."""


class NoParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")


@dataclass
class FusionInputs:
    """What every method receives.

    Attributes:
        adapters: the adapters to fuse (any ranks; each module's ``scaling`` must be honoured).
        weights: one weight per adapter.
        tasks: the task of each adapter (methods that score examples need them).
        seed: seed for methods that draw random numbers (DARE, LoRAHub).
        context: extra inputs of data-driven methods (e.g. few-shot examples and a task model).
    """

    adapters: list[LoraAdapter]
    weights: list[float]
    tasks: list[str] = field(default_factory=list)
    seed: int = 0
    context: dict[str, Any] = field(default_factory=dict)

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)


@dataclass(frozen=True)
class FusionMethod:
    """A registered method.

    Attributes:
        name: registry name (CLI ``--method``).
        params: pydantic model of its parameters (``extra="forbid"``).
        reference: where the method comes from (paper or code link).
        fuse: ``(inputs, params) -> LoraAdapter``.
        summary: one line for listings (first docstring line of ``fuse``).
    """

    name: str
    params: type[pydantic.BaseModel]
    reference: str
    fuse: Callable[[FusionInputs, Any], LoraAdapter]
    summary: str = ""

    def parse_params(self, raw: dict[str, Any] | None) -> pydantic.BaseModel:
        """Validate ``raw`` into this method's parameters, listing every fault at once."""
        try:
            return self.params.model_validate(raw or {})
        except pydantic.ValidationError as exc:
            faults = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'params'}: {e['msg']}" for e in exc.errors()
            )
            valid = ", ".join(self.params.model_fields) or "none"
            raise FusionConfigError(
                f"invalid parameters for method {self.name!r}: {faults} (valid parameters: {valid})"
            ) from None


_REGISTRY: dict[str, FusionMethod] = {}


def fusion_method(name: str, params: type[pydantic.BaseModel] = NoParams, reference: str = ""):
    """Register ``fn(inputs, params) -> LoraAdapter`` under ``name``."""

    def decorate(fn: Callable[[FusionInputs, Any], LoraAdapter]):
        if name in _REGISTRY:
            raise ValueError(f"fusion method {name!r} is registered twice")
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        _REGISTRY[name] = FusionMethod(name, params, reference, fn, summary)
        return fn

    return decorate


def _load_builtin_methods() -> None:
    import engine.fusion.methods  # noqa: F401  (registers on import)


def get_method(name: str) -> FusionMethod:
    """The method called ``name``; :class:`FusionConfigError` lists the valid names otherwise."""
    _load_builtin_methods()
    if name not in _REGISTRY:
        raise FusionConfigError(
            f"unknown fusion method {name!r}; valid methods: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[name]


def list_methods() -> list[FusionMethod]:
    _load_builtin_methods()
    return [_REGISTRY[n] for n in sorted(_REGISTRY)]
