"""The fusion-method registry: one interface for every method (mergekit's ``@merge_method`` idea).

A method is a pure function from :class:`FusionInputs` (adapters, weights, seed), its typed
parameters (a pydantic model) and the fields of :class:`~engine.fusion.context.FusionContext` it
names as keyword-only arguments, to ``(adapter, details)``: the fused
:class:`~engine.adapters.LoraAdapter` and what the method found (e.g. searched weights; recorded
in the provenance). As mergekit takes a merge method's inputs from its signature, the signature
is the declaration: a keyword-only argument without a default is a context field the method
cannot run without (checked before it runs), one with a default is optional. Adding a method is
one file in :mod:`engine.fusion.methods` with one ``@fusion_method`` decoration (``icm``, with
its inputs and latent rules, is the package :mod:`engine.fusion.icm`).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pydantic
import torch

from engine.adapters.lora import LoraAdapter
from engine.errors import IcmfError, pydantic_faults
from engine.fusion.context import CONTEXT_HINTS, FusionContext


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
    """

    adapters: list[LoraAdapter]
    weights: list[float]
    tasks: list[str] = dataclasses.field(default_factory=list)
    seed: int = 0

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)


# (inputs, params, **context fields) -> (fused adapter, details)
MethodFn = Callable[..., tuple[LoraAdapter, dict[str, Any]]]
_CONTEXT_FIELDS = frozenset(f.name for f in dataclasses.fields(FusionContext))


@dataclass(frozen=True)
class FusionMethod:
    """A registered method.

    Attributes:
        name: registry name (CLI ``--method``).
        params: pydantic model of its parameters (``extra="forbid"``).
        reference: where the method comes from (paper or code link).
        fuse: ``(inputs, params, **context) -> (LoraAdapter, details)``.
        summary: one line for listings (first docstring line of ``fuse``).
        needs: context fields the method cannot run without (keyword-only, no default).
        accepts: every context field it reads (``needs`` plus the optional ones).
    """

    name: str
    params: type[pydantic.BaseModel]
    reference: str
    fuse: MethodFn
    summary: str = ""
    needs: tuple[str, ...] = ()
    accepts: tuple[str, ...] = ()

    def parse_params(self, raw: dict[str, Any] | None) -> pydantic.BaseModel:
        """Validate ``raw`` into this method's parameters, listing every fault at once."""
        try:
            return self.params.model_validate(raw or {})
        except pydantic.ValidationError as exc:
            faults = "; ".join(pydantic_faults(exc.errors(), top="params"))
            valid = ", ".join(self.params.model_fields) or "none"
            raise FusionConfigError(
                f"invalid parameters for method {self.name!r}: {faults} (valid parameters: {valid})"
            ) from None

    def required(self, params: pydantic.BaseModel) -> tuple[str, ...]:
        """The context fields this call cannot run without: ``needs``, plus those the parameters
        ask for (a params model may define ``required_context``, e.g. icm's refinement needs the
        few-shot objective only when ``refine_steps > 0``)."""
        extra = tuple(getattr(params, "required_context", ()))
        return tuple(dict.fromkeys((*self.needs, *extra)))

    def wanted(self, params: pydantic.BaseModel) -> tuple[str, ...]:
        """The context fields this call reads when they are set: :meth:`required`, plus the
        optional ones its parameters ask for (``wanted_context``: e.g. ``loss_fn`` while a
        hyperparameter is left to be picked on the support examples)."""
        extra = tuple(getattr(params, "wanted_context", ()))
        return tuple(dict.fromkeys((*self.required(params), *extra)))

    def call(
        self, inputs: FusionInputs, params: pydantic.BaseModel, context: FusionContext
    ) -> tuple[LoraAdapter, dict[str, Any]]:
        """Run the method with the context fields it accepts, after checking the required ones."""
        missing = [name for name in self.required(params) if getattr(context, name) is None]
        if missing:
            faults = "; ".join(f"{CONTEXT_HINTS[name]} (context field {name!r})" for name in missing)
            raise FusionConfigError(f"method {self.name!r} needs {faults}")
        kwargs = {name: getattr(context, name) for name in self.accepts}
        result = self.fuse(inputs, params, **kwargs)
        if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], LoraAdapter)):
            raise TypeError(f"fusion method {self.name!r} must return (LoraAdapter, details dict)")
        adapter, details = result
        return adapter, dict(details or {})


def _context_arguments(name: str, fn: Callable) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(needs, accepts)`` from ``fn``'s keyword-only arguments; any other name is refused."""
    needs, accepts = [], []
    for arg in inspect.signature(fn).parameters.values():
        if arg.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        if arg.name not in _CONTEXT_FIELDS:
            raise ValueError(
                f"fusion method {name!r}: keyword-only argument {arg.name!r} is not a FusionContext "
                f"field ({', '.join(sorted(_CONTEXT_FIELDS))})"
            )
        accepts.append(arg.name)
        if arg.default is inspect.Parameter.empty:
            needs.append(arg.name)
    return tuple(needs), tuple(accepts)


_REGISTRY: dict[str, FusionMethod] = {}


def fusion_method(name: str, params: type[pydantic.BaseModel] = NoParams, reference: str = ""):
    """Register ``fn(inputs, params, *, <context fields>) -> (LoraAdapter, details)`` under ``name``."""

    def decorate(fn: MethodFn):
        if name in _REGISTRY:
            raise ValueError(f"fusion method {name!r} is registered twice")
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        needs, accepts = _context_arguments(name, fn)
        _REGISTRY[name] = FusionMethod(name, params, reference, fn, summary, needs, accepts)
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
