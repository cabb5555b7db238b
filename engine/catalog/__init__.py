"""The adapter catalog: manifest, Parquet weight shards, layouts and statistics at a URI.

``Catalog`` and friends are imported lazily: Ray Data workers that only read shards
(:mod:`engine.catalog.streaming`) then never import torch.
"""

from engine.catalog.stats import Moments, SlotStats

_LAZY = {"AdapterRecord", "Catalog", "IngestReport", "adapter_id"}

__all__ = ["AdapterRecord", "Catalog", "IngestReport", "Moments", "SlotStats", "adapter_id"]


def __getattr__(name: str):
    if name in _LAZY:
        from engine.catalog import catalog

        return getattr(catalog, name)
    raise AttributeError(f"module 'engine.catalog' has no attribute {name!r}")
