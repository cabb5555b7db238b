"""Fusion methods behind one registry, and the API that fuses catalog adapters."""

from engine.fusion.api import (
    PROVENANCE_FILE,
    FusionResult,
    fuse_adapters,
    fuse_from_catalog,
    fusion_context,
)
from engine.fusion.context import FusionContext
from engine.fusion.registry import (
    FusionConfigError,
    FusionInputs,
    FusionMethod,
    fusion_method,
    get_method,
    list_methods,
)

__all__ = [
    "PROVENANCE_FILE",
    "FusionConfigError",
    "FusionContext",
    "FusionInputs",
    "FusionMethod",
    "FusionResult",
    "fuse_adapters",
    "fuse_from_catalog",
    "fusion_context",
    "fusion_method",
    "get_method",
    "list_methods",
]
