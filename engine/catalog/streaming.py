"""Ray Data streaming of a catalog's weight shards.

Ray hands a Parquet fixed-size-list column back in a different form in each place (Python lists
from ``take``, object arrays in numpy batches, ...). :func:`adapter_dataset` converts every batch
to Ray's tensor columns once, right after the read, so every consumer (driver, ``map_batches``,
``iter_torch_batches``, Train workers) sees ``weights`` as ``[N]`` float32 per row and ``mask``
as ``[M]`` bool.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine.catalog.stats import Moments
from engine.errors import CatalogError

if TYPE_CHECKING:
    import ray.data

    from engine.adapters.layout import Layout
    from engine.catalog.catalog import Catalog


def fixed_list_to_numpy(column: pa.ChunkedArray | pa.Array, width: int) -> np.ndarray:
    """A fixed-size-list (or list) Arrow column as a ``[rows, width]`` numpy array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(column), width)


def _to_tensor_rows(
    batch: pa.Table, id_to_task: dict[str, str], size: int, num_modules: int
) -> dict[str, np.ndarray]:
    """Arrow shard rows -> numpy dict with tensor columns and the task."""
    keep = pc.is_in(batch["id"], value_set=pa.array(list(id_to_task), pa.string()))
    if not pc.all(keep).as_py():  # filtering copies every column: only when rows must go
        batch = batch.filter(keep)
    ids = batch["id"].to_pylist()
    return {
        "id": np.asarray(ids, dtype=object),
        "task": np.asarray([id_to_task[i] for i in ids], dtype=object),
        "weights": fixed_list_to_numpy(batch["weights"], size).astype(np.float32, copy=False),
        "mask": fixed_list_to_numpy(batch["mask"], num_modules).astype(bool, copy=False),
    }


def _read_shards(
    batch: dict[str, np.ndarray],
    filesystem,
    id_to_task: dict[str, str],
    size: int,
    num_modules: int,
    rows: int,
) -> Iterator[dict[str, np.ndarray]]:
    """``map_batches`` UDF: open each listed shard and yield it ``rows`` adapters at a time.

    Reading shards named by the manifest directly (rather than ``read_parquet``) avoids Ray's
    per-scan file listing and footer-reader actors, and keeps blocks small, so reading and
    consuming overlap and worker memory follows ``rows``, not the shard size.
    """
    for path in batch["path"]:
        with filesystem.open_input_file(str(path)) as handle:
            reader = pq.ParquetFile(handle)
            for record_batch in reader.iter_batches(batch_size=rows, columns=["id", "weights", "mask"]):
                yield _to_tensor_rows(pa.Table.from_batches([record_batch]), id_to_task, size, num_modules)


def adapter_dataset(
    catalog: Catalog, layout_id: str | None = None, task: str | None = None, rows_per_block: int = 256
) -> ray.data.Dataset:
    """Stream one layout's adapters (optionally one task's) as a ``ray.data.Dataset``.

    Rows: ``id`` (str), ``task`` (str), ``weights`` (``[N]`` float32), ``mask`` (``[M]`` bool).
    Only shards the current manifest references are read, so leftovers of an interrupted write
    are never seen. One read task per shard; blocks of ``rows_per_block`` adapters.

    Args:
        catalog: the catalog.
        layout_id: layout to stream; may be omitted when the catalog has one.
        task: restrict to one task.
        rows_per_block: adapters per output block (bounds worker memory).
    """
    import ray.data

    layout = catalog.layout(layout_id)
    table = catalog.manifest()
    table = table.filter(pc.equal(table["layout_id"], layout.layout_id))
    if task is not None:
        table = table.filter(pc.equal(table["task"], task))
    if table.num_rows == 0:
        raise CatalogError(
            f"{catalog.uri}: no adapters in layout {layout.layout_id}"
            + (f" for task {task!r}" if task else "")
        )
    shards = sorted(set(table["shard"].to_pylist()))
    id_to_task = dict(zip(table["id"].to_pylist(), table["task"].to_pylist(), strict=True))
    listing = ray.data.from_items(
        [{"path": catalog._path(s)} for s in shards], override_num_blocks=len(shards)
    )
    return listing.map_batches(
        _read_shards,
        batch_size=1,
        batch_format="numpy",
        fn_kwargs={
            "filesystem": catalog.fs,
            "id_to_task": id_to_task,
            "size": layout.size,
            "num_modules": layout.num_modules,
            "rows": rows_per_block,
        },
    )


def _batch_moments(batch: dict[str, np.ndarray], module_sizes: np.ndarray) -> dict[str, np.ndarray]:
    slot_mask = np.repeat(batch["mask"], module_sizes, axis=1)
    m = Moments.of_batch(batch["weights"], slot_mask)
    return {
        "count": m.count[None],
        "mean": m.mean[None],
        "m2": m.m2[None],
        "rows": np.array([len(slot_mask)]),
    }


def streaming_moments(ds: ray.data.Dataset, layout: Layout, batch_size: int = 256) -> tuple[Moments, int]:
    """One streaming pass: per-batch partial moments on workers, merged on the driver as they
    arrive, so memory is bounded by a few ``[N]`` arrays whatever the catalog size.

    Returns:
        ``(moments, number of adapters)``.
    """
    partials = ds.map_batches(
        _batch_moments,
        batch_format="numpy",
        batch_size=batch_size,
        fn_kwargs={"module_sizes": layout.module_sizes},
    )
    total = Moments.zeros(layout.size)
    rows = 0
    for part in partials.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=1):
        total = total.merge(Moments(part["count"][0], part["mean"][0], part["m2"][0]))
        rows += int(part["rows"][0])
    return total, rows
