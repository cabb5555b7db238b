"""Ray Data streaming: one consistent array shape everywhere, and streaming statistics."""

from __future__ import annotations

import numpy as np
import pytest

from engine.catalog import Catalog, Moments
from engine.catalog.synth import long_tail_counts, parse_layout, synthesize

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def synth_catalog(tmp_path_factory):
    catalog = Catalog(tmp_path_factory.mktemp("synth") / "cat")
    synthesize(catalog, 60, parse_layout("tiny"), num_tasks=4, seed=3)
    return catalog


def reference_matrix(catalog: Catalog) -> tuple[list[str], np.ndarray, np.ndarray]:
    ids = [e["id"] for e in catalog.entries()]
    vectors = [catalog.read_vector(i) for i in ids]
    return ids, np.stack([v[0] for v in vectors]), np.stack([v[1] for v in vectors])


def test_rows_have_one_shape_on_driver_and_in_map_batches(ray_session, synth_catalog):
    layout = synth_catalog.layout()
    ds = synth_catalog.dataset()
    row = ds.take(1)[0]
    assert isinstance(row["weights"], np.ndarray) and row["weights"].shape == (layout.size,)
    assert row["weights"].dtype == np.float32 and row["mask"].shape == (layout.num_modules,)
    batch = ds.take_batch(7)
    assert batch["weights"].shape == (7, layout.size) and batch["mask"].dtype == bool

    def shapes(b):
        return {"shape": np.array([b["weights"].shape[1:]] * len(b["weights"]))}

    seen = ds.map_batches(shapes, batch_format="numpy", batch_size=5).take_all()
    assert {tuple(r["shape"]) for r in seen} == {(layout.size,)}
    pandas_batch = ds.map_batches(lambda df: df, batch_format="pandas").take(2)
    assert pandas_batch[0]["weights"].shape == (layout.size,)
    torch_batch = next(iter(ds.select_columns(["weights", "mask"]).iter_torch_batches(batch_size=4)))
    assert tuple(torch_batch["weights"].shape) == (4, layout.size)


def test_stream_carries_exact_weights_and_tasks(ray_session, synth_catalog):
    ids, weights, _ = reference_matrix(synth_catalog)
    rows = synth_catalog.dataset().take_all()
    by_id = {r["id"]: r for r in rows}
    assert sorted(by_id) == sorted(ids)
    for i, adapter_id in enumerate(ids):
        np.testing.assert_array_equal(by_id[adapter_id]["weights"], weights[i])
        assert by_id[adapter_id]["task"] == synth_catalog.get(adapter_id)["task"]
    task = "synth-01"
    only = synth_catalog.dataset(task=task).take_all()
    assert {r["task"] for r in only} == {task} and len(only) == synth_catalog.tasks()[task]


def test_train_workers_see_the_same_shape(ray_session, synth_catalog, tmp_path):
    import json
    import tempfile
    import uuid

    from ray import train
    from ray.train import Checkpoint, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    size = synth_catalog.layout().size

    def loop(config):
        shard = train.get_dataset_shard("train")
        shapes = set()
        rows = 0
        for batch in shard.iter_torch_batches(batch_size=8, dtypes=None):
            shapes.add(tuple(batch["weights"].shape[1:]))
            rows += batch["weights"].shape[0]
        metrics = {"rows": rows, "ok": shapes == {(config["size"],)}}
        # Ray Train v2 keeps only metrics reported with a checkpoint.
        with tempfile.TemporaryDirectory() as directory:
            with open(f"{directory}/metrics.json", "w") as handle:
                json.dump(metrics, handle)
            train.report(metrics, checkpoint=Checkpoint.from_directory(directory))

    trainer = TorchTrainer(
        loop,
        train_loop_config={"size": size},
        scaling_config=ScalingConfig(num_workers=1, use_gpu=False, resources_per_worker={"CPU": 1}),
        datasets={"train": synth_catalog.dataset().select_columns(["weights", "mask"])},
        run_config=RunConfig(storage_path=str(tmp_path), name=f"shapes-{uuid.uuid4().hex[:8]}"),
    )
    result = trainer.fit()
    assert result.metrics["ok"] is True and result.metrics["rows"] == len(synth_catalog.entries())


def test_streaming_stats_match_numpy_and_are_stored(ray_session, synth_catalog):
    layout = synth_catalog.layout()
    _, weights, masks = reference_matrix(synth_catalog)
    weights = weights.astype(np.float64)
    slot_mask = layout.slot_mask(masks)
    assert not slot_mask.all()  # synthetic adapters skip modules: exercises the masked statistics
    stats = synth_catalog.compute_stats()
    count = slot_mask.sum(0)
    mean = np.where(slot_mask, weights, 0).sum(0) / np.maximum(count, 1)
    var = (np.where(slot_mask, weights - mean, 0) ** 2).sum(0) / np.maximum(count, 1)
    np.testing.assert_array_equal(stats.count, count)
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(stats.std, np.sqrt(var), rtol=1e-6, atol=1e-9)
    stored = synth_catalog.stats()
    assert stored.manifest_version == synth_catalog.version() and stored.num_adapters == 60
    np.testing.assert_array_equal(stored.std, stats.std)


def test_moment_merging_is_order_free():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 9))
    mask = rng.random((50, 9)) > 0.2
    whole = Moments.of_batch(x, mask)
    merged = Moments.zeros(9)
    for part in np.array_split(np.arange(50), 7):
        merged = merged.merge(Moments.of_batch(x[part], mask[part]))
    np.testing.assert_array_equal(merged.count, whole.count)
    np.testing.assert_allclose(merged.mean, whole.mean, atol=1e-12)
    np.testing.assert_allclose(merged.std(), whole.std(), atol=1e-12)


def test_synthetic_catalog_is_long_tailed_and_idempotent(tmp_path):
    assert long_tail_counts(100, 5) == sorted(long_tail_counts(100, 5), reverse=True)
    assert sum(long_tail_counts(1000, 8)) == 1000 and min(long_tail_counts(10, 10)) == 1
    catalog = Catalog(tmp_path / "cat")
    version, added = synthesize(catalog, 30, parse_layout("layers=1,d=8,r=2"), num_tasks=3, seed=1)
    counts = sorted(catalog.tasks().values(), reverse=True)
    assert added == 30 and counts[0] > counts[-1]
    assert synthesize(catalog, 30, parse_layout("layers=1,d=8,r=2"), num_tasks=3, seed=1) == (version, 0)
    with pytest.raises(ValueError, match="invalid layout"):
        parse_layout("layers=two")


def test_blocks_follow_rows_per_block_and_columns_keep_them(ray_session, synth_catalog):
    # Ray Data would coalesce a shard's batches into one block (up to 128 MiB) without the bound.
    ds = synth_catalog.dataset(rows_per_block=8, columns=["task", "weights"])
    rows = [m.num_rows for bundle in ds.iter_internal_ref_bundles() for m in bundle.metadata]
    assert sum(rows) == 60 and max(rows) <= 8
    assert set(ds.take(1)[0]) == {"task", "weights"}
    with pytest.raises(ValueError, match="subset"):
        synth_catalog.dataset(columns=["weights", "nope"])


def test_streaming_task_sums_match_the_manifest(ray_session, synth_catalog):
    from engine.catalog.streaming import streaming_task_sums

    ids, weights, _ = reference_matrix(synth_catalog)
    tasks = np.array([synth_catalog.get(i)["task"] for i in ids])
    sums = streaming_task_sums(synth_catalog.dataset(rows_per_block=16), tasks=["synth-00", "synth-02"])
    assert sorted(sums) == ["synth-00", "synth-02"]
    for task, (total, count) in sums.items():
        assert count == int((tasks == task).sum())
        np.testing.assert_allclose(
            total, weights[tasks == task].sum(axis=0, dtype=np.float64), rtol=1e-6, atol=1e-9
        )


def _manifest(counts: dict[str, int]):
    import pyarrow as pa

    # Tasks interleaved, as several ingests of several tasks would leave them.
    rows = [(task, i) for i in range(max(counts.values())) for task in counts if i < counts[task]]
    return pa.table({"id": [f"{t}-{i}" for t, i in rows], "task": [t for t, _ in rows]})


@pytest.mark.parametrize("parts", [1, 2, 3, 5])
def test_split_by_task_is_disjoint_balanced_and_covers_every_task(parts):
    import pyarrow as pa
    import pyarrow.compute as pc

    from engine.catalog.streaming import split_by_task

    counts = {"head": 11, "mid": 5, "odd": 7, "pair": 2, "one": 1}
    table = _manifest(counts)
    shares = split_by_task(table, parts)
    assert len(shares) == parts
    small = {t for t, c in counts.items() if c < parts}
    for share in shares:
        assert set(share["task"].to_pylist()) == set(counts)  # every share covers every task
        ids = share["id"].to_pylist()
        assert len(ids) == len(set(ids))
        assert ids == [i for i in table["id"].to_pylist() if i in set(ids)]  # manifest order kept
    for task, count in counts.items():
        per_share = [[i for i in s["id"].to_pylist() if i.startswith(f"{task}-")] for s in shares]
        if task in small:  # too few to give each share its own: every share gets all of them
            assert all(len(p) == count for p in per_share)
            continue
        flat = [i for p in per_share for i in p]
        assert sorted(flat) == sorted(f"{task}-{i}" for i in range(count))  # disjoint, complete
        assert max(map(len, per_share)) - min(map(len, per_share)) <= 1
        # contiguous runs of the task's rows, share 0 first
        assert flat == [f"{task}-{i}" for i in range(count)]
    big = [s.filter(pc.invert(pc.is_in(s["task"], pa.array(sorted(small) or [""])))).num_rows for s in shares]
    assert max(big) - min(big) <= 1  # the tasks' odd rows are spread over the shares
    with pytest.raises(ValueError, match="positive"):
        split_by_task(table, 0)


def test_dataset_of_ids_streams_only_them_and_skips_other_row_groups(ray_session, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    import engine.catalog.schema as schema_module
    from engine.catalog.streaming import _row_groups_holding
    from engine.errors import CatalogError

    layout = parse_layout("tiny")
    monkeypatch.setattr(schema_module, "ROW_GROUP_BYTES", 4 * layout.size * 4)  # 4 adapters a group
    catalog = Catalog(tmp_path / "cat")
    synthesize(catalog, 20, layout, num_tasks=2, seed=1)
    entries = catalog.entries()
    wanted = [e["id"] for e in entries[5:7]] + [entries[-1]["id"]]
    rows = catalog.dataset(ids=wanted, rows_per_block=2).take_all()
    assert sorted(r["id"] for r in rows) == sorted(wanted)
    assert all(r["task"] == catalog.get(r["id"])["task"] for r in rows)
    reader = pq.ParquetFile(catalog.path(entries[0]["shard"]))
    assert reader.num_row_groups == 5
    assert _row_groups_holding(reader, pa_ids(wanted)) == [1, 4]
    assert _row_groups_holding(reader, pa_ids([e["id"] for e in entries])) is None
    with pytest.raises(CatalogError, match=r"1 id.*nope-0"):
        catalog.dataset(ids=[*wanted, "nope-0"])


def pa_ids(ids):
    import pyarrow as pa

    return pa.array(ids, pa.string())


@pytest.mark.parametrize(
    ("rows", "group", "parts", "expected"),
    [
        (1000, 256, 2, [(0, 512), (512, 1000)]),
        (1000, 256, 1, [(0, 1000)]),
        (1000, 256, 8, [(0, 256), (256, 512), (512, 768), (768, 1000)]),
        (20, 4, 3, [(0, 4), (4, 12), (12, 20)]),
        (3, 1, 2, [(0, 1), (1, 3)]),
        (1, 256, 4, [(0, 1)]),
    ],
)
def test_shard_ranges_cut_whole_row_groups(rows, group, parts, expected):
    from engine.catalog.streaming import shard_ranges

    assert shard_ranges(rows, group, parts) == expected


def test_read_tasks_per_shard_fill_the_cpus_once():
    from engine.catalog.streaming import read_tasks_per_shard

    assert [read_tasks_per_shard(shards, 2) for shards in (1, 2, 3, 10)] == [2, 1, 1, 1]
    assert [read_tasks_per_shard(shards, 64) for shards in (1, 10, 64, 100)] == [64, 7, 1, 1]


def test_a_shard_split_across_read_tasks_streams_every_adapter_once(ray_session, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    import engine.catalog.schema as schema_module
    from engine.catalog.streaming import read_listing

    layout = parse_layout("tiny")
    monkeypatch.setattr(schema_module, "ROW_GROUP_BYTES", 4 * layout.size * 4)  # 4 adapters a group
    catalog = Catalog(tmp_path / "cat")
    synthesize(catalog, 20, layout, num_tasks=3, seed=2)
    assert len({e["shard"] for e in catalog.entries()}) == 1
    assert pq.ParquetFile(catalog.path(catalog.entries()[0]["shard"])).num_row_groups == 5

    listing = read_listing(catalog, catalog.manifest(), layout, [layout], cpus=3)
    shares = [t["ids"][0].as_py() for t in listing]
    assert [len(s) for s in shares] == [4, 8, 8]  # whole row groups: 1, 2 and 2 of the 5
    assert [i for share in shares for i in share] == [
        e["id"] for e in catalog.entries()
    ]  # each once, in order
    assert len(read_listing(catalog, catalog.manifest(), layout, [layout], cpus=1)) == 1

    ids, weights, _ = reference_matrix(catalog)
    dataset = catalog.dataset(rows_per_block=3)
    assert dataset.context.op_resource_reservation_enabled is False  # one wave of 2 read tasks
    rows = dataset.take_all()
    assert sorted(r["id"] for r in rows) == sorted(ids)
    by_id = {r["id"]: r for r in rows}
    for i, adapter_id in enumerate(ids):
        np.testing.assert_array_equal(by_id[adapter_id]["weights"], weights[i])
        assert by_id[adapter_id]["task"] == catalog.get(adapter_id)["task"]


def test_a_scan_of_more_shards_than_cpus_keeps_one_task_per_shard(ray_session, tmp_path, monkeypatch):
    import engine.catalog.catalog as catalog_module

    monkeypatch.setattr(catalog_module, "SHARD_MAX_ROWS", 4)
    catalog = Catalog(tmp_path / "cat")
    synthesize(catalog, 20, parse_layout("tiny"), num_tasks=2, seed=4)
    assert len({e["shard"] for e in catalog.entries()}) == 5
    dataset = catalog.dataset()
    assert dataset.context.op_resource_reservation_enabled is True  # 5 read tasks on 2 CPUs
    assert sorted(r["id"] for r in dataset.take_all()) == sorted(e["id"] for e in catalog.entries())
