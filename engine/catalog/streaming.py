"""Ray Data streaming of a catalog's weight shards.

Ray hands a Parquet fixed-size-list column back in a different form in each place (Python lists
from ``take``, object arrays in numpy batches, ...). :func:`adapter_dataset` converts every batch
to Ray's tensor columns once, right after the read, so every consumer (driver, ``map_batches``,
``iter_torch_batches``, Train workers) sees ``weights`` as ``[N]`` float32 per row and ``mask``
as ``[M]`` bool.

A catalog whose layout grew holds shards of several layout versions of one base model. A dataset
has one layout and one ``[N]``: the requested (by default the current, newest) layout. Each read
task pads its shard's rows into it (:meth:`Layout.embed`: zero rank components, absent modules
masked off), so every consumer sees one consistent shape. A shard already in the dataset's layout
(every shard of a catalog that never grew) is read exactly as before, with no copy.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine._ray import cluster_cpus
from engine.adapters.layout import Layout
from engine.catalog.schema import rows_per_row_group
from engine.catalog.stats import Moments
from engine.errors import CatalogError

if TYPE_CHECKING:
    import ray.data

    from engine.catalog.catalog import Catalog


COLUMNS = ("id", "task", "weights", "mask")


def fixed_list_to_numpy(column: pa.ChunkedArray | pa.Array, width: int) -> np.ndarray:
    """A fixed-size-list (or list) Arrow column as a ``[rows, width]`` numpy array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(column), width)


def _to_tensor_rows(
    batch: pa.Table, ids: pa.Array, tasks: pa.Array, source: Layout, target: Layout
) -> dict[str, np.ndarray]:
    """Arrow shard rows of layout ``source`` -> numpy dict with tensor columns (in ``target``,
    which contains ``source``) and the task.

    ``ids``/``tasks``: the manifest's entries of this shard (rows of other ids are dropped).
    """
    index = pc.index_in(batch["id"], value_set=ids)
    if index.null_count:  # filtering copies every column: only when rows must go
        keep = pc.is_valid(index)
        batch, index = batch.filter(keep), index.filter(keep)
    weights = fixed_list_to_numpy(batch["weights"], source.size).astype(np.float32, copy=False)
    mask = fixed_list_to_numpy(batch["mask"], source.num_modules).astype(bool, copy=False)
    weights, mask = target.embed(source, weights, mask)
    return {
        "id": batch["id"].to_numpy(zero_copy_only=False),
        "task": tasks.take(index).to_numpy(zero_copy_only=False),
        "weights": weights,
        "mask": mask,
    }


def _row_groups_holding(reader: pq.ParquetFile, ids: pa.Array) -> list[int] | None:
    """The row groups of a shard that hold any of ``ids``, or None when ``ids`` are all its rows.

    A Train worker's share of a catalog (:func:`split_by_task`) or one read task's run of a
    shard's row groups (:func:`shard_ranges`) names part of a shard; reading only the id column
    first keeps the bytes it reads close to its part, not the whole shard.
    """
    if len(ids) >= reader.metadata.num_rows:
        return None
    wanted = pc.is_in(reader.read(columns=["id"])["id"], value_set=ids).to_numpy(zero_copy_only=False)
    bounds = np.cumsum([0] + [reader.metadata.row_group(g).num_rows for g in range(reader.num_row_groups)])
    return [g for g in range(reader.num_row_groups) if wanted[bounds[g] : bounds[g + 1]].any()]


def _read_shards(
    listing: pa.Table, filesystem, target: dict, rows: int, columns: Sequence[str] = COLUMNS
) -> Iterator[dict[str, np.ndarray]]:
    """``map_batches`` UDF: open each listed shard and yield it ``rows`` adapters at a time.

    Reading shards named by the manifest directly (rather than ``read_parquet``) avoids Ray's
    per-scan file listing and footer-reader actors, and keeps blocks small, so reading and
    consuming overlap and worker memory follows ``rows``, not the shard size. Each listing row
    carries its shard's ids and tasks, so a read task gets only its own shard's part of the
    manifest (not an id -> task map of the whole catalog); row groups holding none of them are
    skipped. ``target``: the dataset's layout (``Layout.to_dict``); a listing row's ``layout`` is
    its shard's own, empty when it is the target.
    """
    target_layout = Layout.from_dict(target)
    for i, path in enumerate(listing["path"].to_pylist()):
        ids, tasks = listing["ids"][i].values, listing["tasks"][i].values
        own = listing["layout"][i].as_py()
        source = Layout.from_dict(json.loads(own)) if own else target_layout
        with filesystem.open_input_file(str(path)) as handle:
            reader = pq.ParquetFile(handle)
            groups = _row_groups_holding(reader, ids)
            if groups == []:
                continue
            batches = reader.iter_batches(
                batch_size=rows, row_groups=groups, columns=["id", "weights", "mask"]
            )
            for record_batch in batches:
                table = pa.Table.from_batches([record_batch])
                out = _to_tensor_rows(table, ids, tasks, source, target_layout)
                yield {name: out[name] for name in columns}


def _one_list(values: pa.Array) -> pa.ListArray:
    """A one-row list column holding ``values``."""
    return pa.ListArray.from_arrays(pa.array([0, len(values)], pa.int32()), values)


def read_tasks_per_shard(shards: int, cpus: int) -> int:
    """Read tasks per shard: enough that a catalog of few shards still reads on every CPU (one
    per shard once there are as many shards as CPUs)."""
    return max(1, -(-cpus // max(1, shards)))


def shard_ranges(rows: int, rows_per_group: int, parts: int) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges cutting a shard's ``rows`` manifest rows into at most ``parts``
    contiguous pieces of whole row groups (``rows_per_group`` rows each), as even as whole
    groups allow. A shard's manifest rows are in the order they were written, so each piece's
    read task reads only its own row groups (:func:`_row_groups_holding`)."""
    groups = -(-rows // rows_per_group)
    parts = max(1, min(parts, groups))
    edges = [min(rows, (p * groups // parts) * rows_per_group) for p in range(parts + 1)]
    return list(itertools.pairwise(edges))


def _only_ids(table: pa.Table, ids: pa.Array, uri: str, layout_id: str) -> pa.Table:
    """Manifest rows of ``ids``; an id not among ``table``'s rows is an error, not a silent skip."""
    kept = table.filter(pc.is_in(table["id"], value_set=ids))
    if kept.num_rows != len(pc.unique(ids)):
        unknown = pc.filter(ids, pc.invert(pc.is_in(ids, value_set=table["id"]))).to_pylist()
        raise CatalogError(
            f"{uri}: {len(unknown)} id(s) not in layout {layout_id}: {unknown[:5]}"
            + (" ..." if len(unknown) > 5 else "")
        )
    return kept


def _run_ends(counts: np.ndarray, parts: int) -> np.ndarray:
    """``[tasks, parts]``: where each share's run of each task's rows ends.

    A task of ``q * parts + r`` rows gives each share ``q`` rows and ``r`` shares one more; the
    extra rows go round-robin over shares across tasks, so shares' totals differ by at most one.
    """
    base, extra = np.divmod(counts, parts)
    first = (np.cumsum(extra) - extra) % parts  # the share that takes this task's first extra row
    gets_extra = (np.arange(parts)[None, :] - first[:, None]) % parts < extra[:, None]
    return np.cumsum(base[:, None] + gets_extra, axis=1)


def split_by_task(table: pa.Table, parts: int) -> list[pa.Table]:
    """Split manifest rows into ``parts`` task-balanced shares, e.g. one per Ray Train worker.

    Each task's rows, in manifest order, are cut into ``parts`` contiguous runs whose sizes differ
    by at most one (as do the shares' totals), so every share holds about ``1/parts`` of every
    task and the shares are disjoint. Contiguous runs keep a share's rows in few shards and row
    groups (shards hold consecutive ingests, often of one task), so a consumer reads about its
    share's bytes. A task with fewer rows than ``parts`` cannot give every share one of its own:
    its rows go to *every* share (replicated), so that every share still covers every task.

    Args:
        table: manifest rows with at least ``id`` and ``task``.
        parts: number of shares (> 0).

    Returns:
        ``parts`` tables with ``table``'s columns, rows in manifest order.
    """
    if parts < 1:
        raise ValueError(f"parts must be positive, not {parts}")
    tasks = table["task"].to_numpy(zero_copy_only=False)
    _, task_of_row, counts = np.unique(tasks, return_inverse=True, return_counts=True)
    # Each row's position within its task: a stable sort by task keeps manifest order in a task.
    order = np.argsort(task_of_row, kind="stable")
    position = np.empty(len(tasks), np.int64)
    position[order] = np.arange(len(tasks)) - np.repeat(np.cumsum(counts) - counts, counts)
    replicated = counts < parts
    ends = _run_ends(np.where(replicated, parts, counts), parts)[task_of_row]
    share = np.zeros(len(tasks), np.int64)
    for p in range(parts - 1):
        share += position >= ends[:, p]
    replicated = replicated[task_of_row]
    return [table.filter(pa.array(replicated | (share == p))) for p in range(parts)]


def read_listing(
    catalog: Catalog, table: pa.Table, layout: Layout, stored: Sequence[Layout], cpus: int
) -> list[pa.Table]:
    """The read tasks of a scan of manifest rows ``table``: one-row tables (``path``, ``ids``,
    ``tasks``, ``layout``), one per shard, or per contiguous run of its row groups when there
    are fewer shards than ``cpus`` (:func:`read_tasks_per_shard`, :func:`shard_ranges`).
    ``layout`` is the dataset's; a row's ``layout`` is its shard's own (``Layout.to_dict`` JSON),
    empty when that is ``layout``. ``stored``: the layouts ``table``'s shards are in."""
    per_shard = table.group_by(["shard", "layout_id"], use_threads=False).aggregate(
        [("id", "list"), ("task", "list")]
    )
    per_shard = per_shard.sort_by("shard")
    by_id = {s.layout_id: s for s in stored}
    parts = read_tasks_per_shard(per_shard.num_rows, cpus)
    listing = []
    for i, (shard, layout_id) in enumerate(
        zip(per_shard["shard"].to_pylist(), per_shard["layout_id"].to_pylist(), strict=True)
    ):
        ids, tasks = per_shard["id_list"][i].values, per_shard["task_list"][i].values
        own = "" if layout_id == layout.layout_id else json.dumps(by_id[layout_id].to_dict())
        for start, stop in shard_ranges(len(ids), rows_per_row_group(by_id[layout_id].size), parts):
            listing.append(
                pa.table(
                    {
                        "path": [catalog.path(shard)],
                        "ids": _one_list(ids[start:stop]),
                        "tasks": _one_list(tasks[start:stop]),
                        "layout": [own],
                    }
                )
            )
    return listing


def adapter_dataset(
    catalog: Catalog,
    layout_id: str | None = None,
    task: str | None = None,
    rows_per_block: int = 256,
    columns: Sequence[str] | None = None,
    ids: Sequence[str] | pa.Array | None = None,
) -> ray.data.Dataset:
    """Stream one layout's adapters (optionally one task's, or only ``ids``) as a ``ray.data.Dataset``.

    Rows: ``id`` (str), ``task`` (str), ``weights`` (``[N]`` float32), ``mask`` (``[M]`` bool).
    The layout's adapters are every adapter stored in it or in a layout it contains (an older
    version of it), the latter padded on read, so ``N`` and ``M`` are the same in every row.
    Only shards the current manifest references are read, so leftovers of an interrupted write
    are never seen. One read task per shard, or per run of its row groups when the catalog has
    fewer shards than the cluster has CPUs; blocks of ``rows_per_block`` adapters.

    Memory does not grow with the catalog: the driver sends each read task only its shard's
    ids and tasks, and the dataset's ``target_max_block_size`` is set to ``rows_per_block``
    adapters (Ray Data would otherwise coalesce a shard's batches into one block of up to
    128 MiB, so every consumer would map whole shards).

    Args:
        catalog: the catalog.
        layout_id: layout to stream; may be omitted when the catalog has one base model (its
            current layout is streamed).
        task: restrict to one task.
        rows_per_block: adapters per output block (bounds worker memory).
        columns: a subset of ``id``, ``task``, ``weights``, ``mask`` to keep. Prefer this to
            ``select_columns``: Ray Data fuses a projection into the read and then emits one
            block per shard, not per ``rows_per_block``.
        ids: stream only these adapters (e.g. one Train worker's share, :func:`split_by_task`);
            shards and row groups holding none of them are not read.

    Raises:
        CatalogError: no adapters to stream, or ``ids`` naming adapters not in the layout.
    """
    import ray.data

    columns = tuple(COLUMNS if columns is None else columns)
    if not columns or set(columns) - set(COLUMNS):
        raise ValueError(f"columns must be a non-empty subset of {COLUMNS}, not {columns!r}")

    catalog = catalog.at(catalog.version())  # one manifest version for the whole dataset
    layout = catalog.layout(layout_id)
    table = catalog.manifest()
    stored = catalog.layouts_readable_in(layout)
    table = table.filter(pc.is_in(table["layout_id"], value_set=pa.array([s.layout_id for s in stored])))
    if task is not None:
        table = table.filter(pc.equal(table["task"], task))
    if ids is not None:
        table = _only_ids(table, pa.array(ids, pa.string()), catalog.uri, layout.layout_id)
    if table.num_rows == 0:
        raise CatalogError(
            f"{catalog.uri}: no adapters in layout {layout.layout_id}"
            + (f" for task {task!r}" if task else "")
        )
    cpus = cluster_cpus()
    listing = read_listing(catalog, table, layout, stored, cpus)
    read_tasks = len(listing)
    listing = ray.data.from_arrow(listing)
    # ``listing`` holds its own copy of the DataContext: this bounds the blocks of this dataset
    # (and of datasets derived from it) without touching the process-wide context.
    listing.context.target_max_block_size = max(1, rows_per_block) * 4 * layout.size
    if read_tasks <= cpus:
        # A scan of at most one read task per CPU is one wave of reads. Ray Data's per-operator
        # reservation shares CPUs among operators across many waves, and it budgets them from a
        # cluster size it learns asynchronously and refreshes once a second: until then the
        # budget is zero and reads run one task at a time, so one wave was read one task after
        # another. A longer scan keeps the reservation and the backpressure it brings.
        listing.context.op_resource_reservation_enabled = False
    return listing.map_batches(
        _read_shards,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs={
            "filesystem": catalog.fs,
            "target": layout.to_dict(),
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
