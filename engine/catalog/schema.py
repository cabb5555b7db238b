"""Arrow schemas and names of a catalog's files (docs/design.md §5).

    <root>/catalog.json                      settings (format, gauge)
    <root>/manifest/v00000001.parquet        one full manifest per committed version
    <root>/layouts/<layout_id>.json          ordered modules and shapes
    <root>/weights/<layout_id>/<uuid>.parquet   weight shards: id, flat vector, module mask, extras
    <root>/stats/<layout_id>.parquet         per-slot statistics

A version becomes visible when its manifest file appears; shards are written first under fresh
names, so anything an interrupted write leaves behind is never referenced and never read.
"""

from __future__ import annotations

import re

import pyarrow as pa

from engine.errors import InvalidNameError

CATALOG_FORMAT = 1
SETTINGS_FILE = "catalog.json"
MANIFEST_DIR = "manifest"
LAYOUT_DIR = "layouts"
WEIGHTS_DIR = "weights"
STATS_DIR = "stats"

MANIFEST_FILE = re.compile(r"^v(\d{8})\.parquet$")
# Ids and task names end up in URLs, file listings and serving requests: keep them to a safe
# alphabet so none can ever be read as a path.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

MANIFEST_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("task", pa.string()),
        ("base_model", pa.string()),
        ("layout_id", pa.string()),
        ("rank", pa.int32()),
        ("alpha", pa.float64()),
        ("target_modules", pa.list_(pa.string())),
        ("num_params", pa.int64()),
        ("sha256", pa.string()),
        ("source", pa.string()),
        ("created", pa.timestamp("us", tz="UTC")),
        ("tags", pa.list_(pa.string())),
        ("shard", pa.string()),
        ("peft_config", pa.string()),
        ("extras", pa.list_(pa.string())),
    ]
)


def manifest_name(version: int) -> str:
    return f"v{version:08d}.parquet"


# A weight shard's row groups hold about this many bytes of weights: the unit a reader can skip
# or hand to a read task of its own (engine.catalog.streaming).
ROW_GROUP_BYTES = 16 * 2**20


def rows_per_row_group(size: int) -> int:
    """Adapters per row group in the weight shards of a layout of flat size ``size``."""
    return max(1, ROW_GROUP_BYTES // (4 * size))


def shard_schema(size: int, num_modules: int) -> pa.Schema:
    """Weight shard schema for a layout with flat size ``size`` and ``num_modules`` modules."""
    return pa.schema(
        [
            ("id", pa.string()),
            ("weights", pa.list_(pa.float32(), size)),
            ("mask", pa.list_(pa.bool_(), num_modules)),
            ("extras", pa.binary()),  # safetensors bytes of modules_to_save tensors, b"" if none
        ]
    )


def stats_schema(size: int) -> pa.Schema:
    return pa.schema(
        [
            ("count", pa.list_(pa.int64(), size)),
            ("mean", pa.list_(pa.float64(), size)),
            ("std", pa.list_(pa.float64(), size)),
        ]
    )


def check_name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise InvalidNameError(
            f"invalid {kind} {value!r}: use 1-128 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return value
