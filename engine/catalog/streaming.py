"""Ray Data streaming of a catalog's weight shards.

Ray hands a Parquet fixed-size-list column back in a different form in each place (Python lists
from ``take``, object arrays in numpy batches, ...). :func:`adapter_dataset` converts every batch
to Ray's tensor columns once, right after the read, so every consumer (driver, ``map_batches``,
``iter_torch_batches``, Train workers) sees ``weights`` as ``[N]`` float32 per row and ``mask``
as ``[M]`` bool.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
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


COLUMNS = ("id", "task", "weights", "mask")


def fixed_list_to_numpy(column: pa.ChunkedArray | pa.Array, width: int) -> np.ndarray:
    """A fixed-size-list (or list) Arrow column as a ``[rows, width]`` numpy array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(column), width)


def _to_tensor_rows(
    batch: pa.Table, ids: pa.Array, tasks: pa.Array, size: int, num_modules: int
) -> dict[str, np.ndarray]:
    """Arrow shard rows -> numpy dict with tensor columns and the task.

    ``ids``/``tasks``: the manifest's entries of this shard (rows of other ids are dropped).
    """
    index = pc.index_in(batch["id"], value_set=ids)
    if index.null_count:  # filtering copies every column: only when rows must go
        keep = pc.is_valid(index)
        batch, index = batch.filter(keep), index.filter(keep)
    return {
        "id": batch["id"].to_numpy(zero_copy_only=False),
        "task": tasks.take(index).to_numpy(zero_copy_only=False),
        "weights": fixed_list_to_numpy(batch["weights"], size).astype(np.float32, copy=False),
        "mask": fixed_list_to_numpy(batch["mask"], num_modules).astype(bool, copy=False),
    }


def _read_shards(
    listing: pa.Table, filesystem, size: int, num_modules: int, rows: int, columns: Sequence[str] = COLUMNS
) -> Iterator[dict[str, np.ndarray]]:
    """``map_batches`` UDF: open each listed shard and yield it ``rows`` adapters at a time.

    Reading shards named by the manifest directly (rather than ``read_parquet``) avoids Ray's
    per-scan file listing and footer-reader actors, and keeps blocks small, so reading and
    consuming overlap and worker memory follows ``rows``, not the shard size. Each listing row
    carries its shard's ids and tasks, so a read task gets only its own shard's part of the
    manifest (not an id -> task map of the whole catalog).
    """
    for i, path in enumerate(listing["path"].to_pylist()):
        ids, tasks = listing["ids"][i].values, listing["tasks"][i].values
        with filesystem.open_input_file(str(path)) as handle:
            reader = pq.ParquetFile(handle)
            for record_batch in reader.iter_batches(batch_size=rows, columns=["id", "weights", "mask"]):
                table = pa.Table.from_batches([record_batch])
                out = _to_tensor_rows(table, ids, tasks, size, num_modules)
                yield {name: out[name] for name in columns}


def adapter_dataset(
    catalog: Catalog,
    layout_id: str | None = None,
    task: str | None = None,
    rows_per_block: int = 256,
    columns: Sequence[str] | None = None,
) -> ray.data.Dataset:
    """Stream one layout's adapters (optionally one task's) as a ``ray.data.Dataset``.

    Rows: ``id`` (str), ``task`` (str), ``weights`` (``[N]`` float32), ``mask`` (``[M]`` bool).
    Only shards the current manifest references are read, so leftovers of an interrupted write
    are never seen. One read task per shard; blocks of ``rows_per_block`` adapters.

    Memory does not grow with the catalog: the driver sends each read task only its shard's
    ids and tasks, and the dataset's ``target_max_block_size`` is set to ``rows_per_block``
    adapters (Ray Data would otherwise coalesce a shard's batches into one block of up to
    128 MiB, so every consumer would map whole shards).

    Args:
        catalog: the catalog.
        layout_id: layout to stream; may be omitted when the catalog has one.
        task: restrict to one task.
        rows_per_block: adapters per output block (bounds worker memory).
        columns: a subset of ``id``, ``task``, ``weights``, ``mask`` to keep. Prefer this to
            ``select_columns``: Ray Data fuses a projection into the read and then emits one
            block per shard, not per ``rows_per_block``.
    """
    import ray.data

    columns = tuple(COLUMNS if columns is None else columns)
    if not columns or set(columns) - set(COLUMNS):
        raise ValueError(f"columns must be a non-empty subset of {COLUMNS}, not {columns!r}")

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
    per_shard = table.group_by("shard", use_threads=False).aggregate([("id", "list"), ("task", "list")])
    per_shard = per_shard.sort_by("shard")
    listing = ray.data.from_arrow(
        [
            pa.table(
                {
                    "path": [catalog._path(shard)],
                    "ids": per_shard["id_list"].slice(i, 1),
                    "tasks": per_shard["task_list"].slice(i, 1),
                }
            )
            for i, shard in enumerate(per_shard["shard"].to_pylist())
        ]
    )
    # ``listing`` holds its own copy of the DataContext: this bounds the blocks of this dataset
    # (and of datasets derived from it) without touching the process-wide context.
    listing.context.target_max_block_size = max(1, rows_per_block) * 4 * layout.size
    return listing.map_batches(
        _read_shards,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs={
            "filesystem": catalog.fs,
            "size": layout.size,
            "num_modules": layout.num_modules,
            "rows": rows_per_block,
            "columns": columns,
        },
    )


def _batch_moments(
    batch: dict[str, np.ndarray], module_sizes: np.ndarray, chunk: int = 32
) -> dict[str, np.ndarray]:
    """Partial moments of one batch, ``chunk`` rows at a time: the float64 temporaries of
    :meth:`Moments.of_batch` are ``chunk x N`` instead of ``batch x N`` (8 MiB vs 64+ MiB per
    temporary at N = 16,384 and 256-row batches)."""
    weights, mask = batch["weights"], batch["mask"]
    m = Moments.zeros(weights.shape[1])
    for start in range(0, len(weights), chunk):
        slot_mask = np.repeat(mask[start : start + chunk], module_sizes, axis=1)
        m = m.merge(Moments.of_batch(weights[start : start + chunk], slot_mask))
    return {
        "count": m.count[None],
        "mean": m.mean[None],
        "m2": m.m2[None],
        "rows": np.array([len(weights)]),
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


def _batch_task_sums(batch: dict[str, np.ndarray], tasks: Sequence[str] | None) -> dict[str, np.ndarray]:
    names = batch["task"].astype(str)
    weights = batch["weights"]
    present = sorted(set(names.tolist()) if tasks is None else set(names.tolist()) & set(tasks))
    sums = np.zeros((len(present), weights.shape[1]), np.float64)
    counts = np.zeros(len(present), np.int64)
    for i, task in enumerate(present):
        rows = np.flatnonzero(names == task)
        sums[i] = weights[rows].sum(axis=0, dtype=np.float64)
        counts[i] = len(rows)
    return {"task": np.asarray(present, dtype=object), "sum": sums, "count": counts}


def streaming_task_sums(
    ds: ray.data.Dataset, tasks: Sequence[str] | None = None, batch_size: int = 256
) -> dict[str, tuple[np.ndarray, int]]:
    """Per-task sums of the adapters' weights in one streaming pass: partial sums on workers,
    merged on the driver, which never maps an adapter block (memory: tasks x N float64).

    Returns:
        ``{task: (sum [N] float64, number of adapters)}`` for every task present (of ``tasks``).
    """
    partials = ds.map_batches(
        _batch_task_sums,
        batch_format="numpy",
        batch_size=batch_size,
        fn_kwargs={"tasks": None if tasks is None else sorted(tasks)},
    )
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for part in partials.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
        for task, row, count in zip(part["task"], part["sum"], part["count"], strict=True):
            task = str(task)
            sums[task] = sums[task] + row if task in sums else row.astype(np.float64, copy=True)
            counts[task] = counts.get(task, 0) + int(count)
    return {task: (sums[task], counts[task]) for task in sorted(sums)}
