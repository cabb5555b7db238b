"""What a request's ``model`` field names: the bare base, a catalog adapter, or a fusion spec.

A fusion spec is JSON (``{"method": "linear", "tasks": ["copy", "reverse"], "weights": [0.5,
0.5]}``). It is canonicalised — inputs sorted by name with their weights, weights as floats,
params with sorted keys — and hashed, so the same fusion written two ways gets one id
(``fused-<16 hex>``), which is the Serve multiplexed model id. Every name is checked with the
catalog's name rule; nothing a client sends ever becomes a file path or URL.

Every number of a spec is checked before any fusion starts: finite (JSON's ``NaN`` and
``Infinity`` are refused), weights within ``±MAX_ABS_WEIGHT``, parameters flat scalars within
``±MAX_ABS_PARAM`` and then against the method's own parameter model.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Literal

import pydantic

from engine.catalog.schema import check_name
from engine.errors import IcmfError, pydantic_faults

BASE_MODEL_ID = "base"
FUSED_PREFIX = "fused-"
MAX_SPEC_INPUTS = 16
MAX_ABS_WEIGHT = 100.0  # a fusion weight beyond this is a typo, and overflows float32 factors
MAX_ABS_PARAM = 1e6  # any numeric method parameter (the methods bound theirs further)
MAX_SEED = 2**63 - 1


class JsonError(ValueError):
    """Text that is not strict JSON: ``syntax`` for malformed text, else well-formed but unusable
    (``NaN``/``Infinity``, or nested too deeply)."""

    def __init__(self, message: str, syntax: bool):
        super().__init__(message)
        self.syntax = syntax

    def __reduce__(self):  # pickled across Ray with both arguments, not only the message
        return type(self), (str(self), self.syntax)


def _refuse_constant(name: str) -> Any:
    raise JsonError(f"{name} is not a JSON number (numbers must be finite)", syntax=False)


def loads_strict(text: str | bytes) -> Any:
    """``json.loads`` without ``NaN``/``Infinity`` and with nesting past the interpreter's
    recursion limit reported as a :class:`JsonError`, not a ``RecursionError``."""
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise JsonError("JSON nested too deeply", syntax=False) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise JsonError(str(exc), syntax=True) from None


class ModelFieldError(IcmfError, ValueError):
    """A malformed ``model`` field (HTTP 400 or 422)."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


class FusionSpec(pydantic.BaseModel):
    """A fusion request: catalog ``adapters`` or ``tasks`` (one adapter per task), fused by
    ``method`` with one weight per input (default uniform)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    method: str = pydantic.Field(min_length=1, max_length=64)
    adapters: list[str] | None = pydantic.Field(None, min_length=1, max_length=MAX_SPEC_INPUTS)
    tasks: list[str] | None = pydantic.Field(None, min_length=1, max_length=MAX_SPEC_INPUTS)
    weights: list[float] | None = None
    params: dict[str, bool | int | float | str | None] = pydantic.Field(default_factory=dict, max_length=32)
    seed: int = pydantic.Field(0, ge=0, le=MAX_SEED)
    support_selection: bool = True  # False: unset hyperparameters take defaults (no support loss)

    @pydantic.model_validator(mode="after")
    def _check(self) -> FusionSpec:
        faults = []
        if (self.adapters is None) == (self.tasks is None):
            faults.append("give exactly one of 'adapters' or 'tasks'")
        names = self.adapters or self.tasks or []
        for name in names:
            try:
                check_name("adapter id" if self.adapters else "task", name)
            except ValueError as exc:
                faults.append(str(exc))
        if len(set(names)) != len(names):
            faults.append("inputs must be distinct")
        if self.weights is not None:
            if len(self.weights) != len(names):
                faults.append(f"got {len(self.weights)} weight(s) for {len(names)} input(s)")
            if not all(math.isfinite(w) and abs(w) <= MAX_ABS_WEIGHT for w in self.weights):
                faults.append(f"weights must be finite numbers within ±{MAX_ABS_WEIGHT:g}")
        for key, value in self.params.items():
            if isinstance(value, float) and not (math.isfinite(value) and abs(value) <= MAX_ABS_PARAM):
                faults.append(f"params.{key} must be a finite number within ±{MAX_ABS_PARAM:g}")
            elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_ABS_PARAM:
                faults.append(f"params.{key} must be within ±{MAX_ABS_PARAM:g}")
            elif isinstance(value, str) and len(value) > 64:
                faults.append(f"params.{key} is over 64 characters")
        try:
            check_name("method", self.method)
        except ValueError as exc:
            faults.append(str(exc))
        if faults:
            raise ValueError("; ".join(faults))
        return self

    @property
    def kind(self) -> Literal["adapters", "tasks"]:
        return "adapters" if self.adapters is not None else "tasks"

    def canonical(self) -> dict[str, Any]:
        """The spec with inputs sorted by name (weights follow) and uniform weights made explicit."""
        names = list(self.adapters or self.tasks or [])
        weights = self.weights if self.weights is not None else [1.0 / len(names)] * len(names)
        pairs = sorted(zip(names, (float(w) for w in weights), strict=True))
        canonical = {
            "method": self.method.lower(),
            self.kind: [n for n, _ in pairs],
            "weights": [w for _, w in pairs],
            "params": self.params,
            "seed": self.seed,
        }
        if not self.support_selection:  # only when off: specs written before it keep their ids
            canonical["support_selection"] = False
        return canonical

    def model_id(self) -> str:
        """``fused-<sha256[:16]>`` of the canonical JSON."""
        text = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return FUSED_PREFIX + hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Target:
    """A resolved ``model`` field.

    Attributes:
        kind: ``base``, ``adapter`` (catalog id) or ``fusion``.
        model_id: the multiplexed model id (``base``, the catalog id, or ``fused-<hash>``).
        spec: the canonical fusion spec (``fusion`` only).
    """

    kind: Literal["base", "adapter", "fusion"]
    model_id: str
    spec: dict[str, Any] | None = None


def parse_model_field(model: str, base_aliases: tuple[str, ...] = (), max_chars: int = 4096) -> Target:
    """Resolve an OpenAI ``model`` string (syntax only; existence is checked by the caller).

    Raises:
        ModelFieldError: 400 for unparseable JSON or an oversized field, 422 for a well-formed but
            invalid spec or name.
    """
    if not isinstance(model, str) or not model:
        raise ModelFieldError("'model' must be a non-empty string", 400)
    if len(model) > max_chars:
        raise ModelFieldError(f"'model' is {len(model)} characters; at most {max_chars}", 400)
    if model == BASE_MODEL_ID or model in base_aliases:
        return Target("base", BASE_MODEL_ID)
    if model.lstrip().startswith("{"):
        return fusion_target(_parse_json(model))
    try:
        check_name("adapter id", model)
    except ValueError as exc:
        raise ModelFieldError(str(exc), 422) from None
    return Target("adapter", model)


def fusion_target(raw: Any) -> Target:
    try:
        spec = FusionSpec.model_validate(raw)
    except pydantic.ValidationError as exc:
        reasons = "; ".join(pydantic_faults(exc.errors(), top="spec"))
        raise ModelFieldError(f"invalid fusion spec: {reasons}", 422) from None
    return Target("fusion", spec.model_id(), spec.canonical())


def check_method_params(spec: dict[str, Any]) -> None:
    """Validate a canonical spec's ``params`` against its method's parameter model (cheap; the
    fusion itself would fail the same way, after reading every input).

    Raises:
        ModelFieldError: 422 for an unknown method or invalid parameters.
    """
    from engine.fusion.registry import get_method

    try:
        get_method(spec["method"]).parse_params(spec["params"])
    except ValueError as exc:
        raise ModelFieldError(f"invalid fusion spec: {exc}", 422) from None


def _parse_json(text: str) -> Any:
    try:
        return loads_strict(text)
    except JsonError as exc:
        # A syntax error is a malformed request (400); well-formed but unusable is a bad spec.
        if exc.syntax:
            raise ModelFieldError(
                f"'model' looks like a fusion spec but is not valid JSON: {exc}", 400
            ) from None
        raise ModelFieldError(f"invalid fusion spec: {exc}", 422) from None
