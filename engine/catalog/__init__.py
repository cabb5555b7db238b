"""The adapter catalog: manifest, Parquet weight shards, layouts and statistics at a URI."""

from engine.catalog.catalog import AdapterRecord, Catalog, IngestReport, adapter_id
from engine.catalog.stats import Moments, SlotStats

__all__ = ["AdapterRecord", "Catalog", "IngestReport", "Moments", "SlotStats", "adapter_id"]
