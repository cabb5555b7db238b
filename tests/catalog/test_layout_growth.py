"""Layouts that grow: any ingest order gives the same catalog, old shards read exactly in newer
layouts, a crash during growth leaves the previous version, concurrent ingests lose nothing."""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest
import torch

from engine.adapters import load_adapter
from engine.adapters.codec import from_flat, to_canonical, to_flat
from engine.adapters.layout import Layout, ModuleSpec
from engine.catalog import Catalog
from engine.catalog import catalog as catalog_module
from engine.catalog import fs as cfs
from engine.errors import CatalogError, CommitConflict, IngestError
from tests.helpers import make_adapter


def rel_err(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# name -> (make_adapter kwargs): subsets and supersets of target modules, ranks 2..16, rsLoRA,
# alpha patterns, non-square GQA k/v and the MLP (gate/up 32->64, down 64->32).
ADAPTERS = {
    "qv4": dict(r=4, target_modules=("q_proj", "v_proj")),
    "qv8": dict(r=8, alpha=4, target_modules=("q_proj", "v_proj")),
    "attn8": dict(r=8, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), use_rslora=True),
    "qvo2": dict(r=2, target_modules=("q_proj", "v_proj", "o_proj"), alpha_pattern={"o_proj": 3}),
    "mlp16": dict(r=16, target_modules=("gate_proj", "up_proj", "down_proj", "k_proj")),
}


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(root / name, seed=i, **kw) for i, (name, kw) in enumerate(ADAPTERS.items())}


def ingest_in_order(root, adapter_dirs, batches) -> Catalog:
    catalog = Catalog(root)
    for batch in batches:
        catalog.ingest([adapter_dirs[n] for n in batch], task="t")
    return catalog


def test_grown_contains_and_embed_are_exact():
    small = Layout("m", (ModuleSpec("l.0.q", 6, 4), ModuleSpec("l.0.v", 3, 4)), r_max=2)
    big = small.grown({"l.0.k": (3, 4), "l.1.q": (6, 4)}, r_max=5)
    assert big.contains(small) and not small.contains(big) and small.grown({}, 1) is small
    assert [m.name for m in big.modules] == ["l.0.k", "l.0.q", "l.0.v", "l.1.q"]
    with pytest.raises(ValueError, match="another base model"):
        small.grown({"l.0.q": (4, 4)})
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((3, small.size)).astype(np.float32)
    mask = np.array([[True, True], [True, False], [False, True]])
    padded, padded_mask = big.embed(small, weights, mask)
    assert padded.shape == (3, big.size) and padded_mask.tolist() == [
        [False, True, True, False],
        [False, True, False, False],
        [False, False, True, False],
    ]
    for row in range(3):
        old, new = from_flat(weights[row], small), from_flat(padded[row], big)
        for name in ("l.0.q", "l.0.v"):
            assert torch.equal(old.delta(name), new.delta(name))
        assert not new.A[big.index["l.0.k"]].any() and not new.A[big.index["l.1.q"]].any()
    assert np.count_nonzero(padded) == np.count_nonzero(weights)


ORDERS = {
    "subset first": [["qv4"], ["qv8"], ["attn8"], ["qvo2"], ["mlp16"]],
    "superset first": [["mlp16", "attn8"], ["qvo2"], ["qv8", "qv4"]],
    "rank growing": [["qvo2"], ["qv4"], ["qv8", "attn8"], ["mlp16"]],
    "one batch": [list(ADAPTERS)],
}


@pytest.mark.slow
def test_every_ingest_order_gives_the_same_catalog_and_exact_exports(tmp_path, adapter_dirs):
    catalogs = {
        name: ingest_in_order(tmp_path / name.replace(" ", "-"), adapter_dirs, order)
        for name, order in ORDERS.items()
    }
    grown = catalogs["subset first"]
    assert grown.version() == 5 and len(grown.layouts()) == 4  # qv8 only raised r_max 4 -> 8 once
    current = grown.layout()
    assert current.r_max == 16 and {m.name.rsplit(".", 1)[1] for m in current.modules} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    for catalog in catalogs.values():
        assert catalog.layout() == current  # same current layout, whatever the order
        entries = {e["sha256"]: e for e in catalog.entries()}
        assert sorted(entries) == sorted(e["sha256"] for e in grown.entries())
        for sha, entry in entries.items():
            ref_id = next(e["id"] for e in grown.entries() if e["sha256"] == sha)
            assert entry["id"] == ref_id
            ours, ours_mask, _ = catalog.read_vector(entry["id"], layout=current)
            ref, ref_mask, _ = grown.read_vector(ref_id, layout=current)
            np.testing.assert_array_equal(ours, ref)  # same content, bit for bit
            np.testing.assert_array_equal(ours_mask, ref_mask)
    for name, path in adapter_dirs.items():
        original = load_adapter(path)
        for catalog in catalogs.values():
            entry = next(e for e in catalog.entries() if e["source"] == str(path.resolve()))
            exported = load_adapter(catalog.export(entry["id"], tmp_path / "out" / f"{id(catalog)}-{name}"))
            assert set(exported.modules) == set(original.modules)
            for module_name, module in original.modules.items():
                assert rel_err(exported.modules[module_name].delta(), module.delta()) < 1e-6


def test_an_old_shard_reads_exactly_in_the_grown_layout(tmp_path, adapter_dirs):
    catalog = Catalog(tmp_path / "cat")
    first = catalog.ingest([adapter_dirs["qv4"]], task="t").added[0]
    old = catalog.layout()
    catalog.ingest([adapter_dirs["mlp16"]], task="t")
    new = catalog.layout()
    assert new.contains(old) and new != old and catalog.get(first)["layout_id"] == old.layout_id
    weights, mask, _ = catalog.read_vector(first, layout=new)
    direct = to_canonical(load_adapter(adapter_dirs["qv4"]), new, gauge=True)
    np.testing.assert_array_equal(weights, to_flat(direct).numpy())
    np.testing.assert_array_equal(mask, direct.mask.numpy())
    with pytest.raises(CatalogError, match="does not contain"):
        catalog.read_vector(catalog.entries()[1]["id"], layout=old)


def test_rank_cap_refuses_with_the_reason_and_never_truncates(tmp_path, adapter_dirs):
    catalog = Catalog(tmp_path / "cat")
    catalog.ingest([adapter_dirs["qv4"]], task="t", r_max=8)
    assert catalog.layout().r_max == 8  # a new layout is padded to the cap
    with pytest.raises(IngestError, match="rank 16 exceeds the rank cap --r-max 8") as info:
        catalog.ingest([adapter_dirs["mlp16"], adapter_dirs["qv8"]], task="t", r_max=8)
    assert len(info.value.failures) == 1 and catalog.version() == 1
    catalog.ingest([adapter_dirs["mlp16"]], task="t")  # no cap: the layout grows to rank 16
    assert catalog.layout().r_max == 16


def test_a_crash_during_growth_leaves_the_previous_version_readable(tmp_path, adapter_dirs, monkeypatch):
    catalog = Catalog(tmp_path / "cat")
    first = catalog.ingest([adapter_dirs["qv4"], adapter_dirs["qv8"]], task="t")
    before = catalog.layout()

    def crash(self, base_version, rows):
        raise KeyboardInterrupt("killed before the manifest commit")

    monkeypatch.setattr(Catalog, "_commit", crash)
    with pytest.raises(KeyboardInterrupt):
        catalog.ingest([adapter_dirs["attn8"], adapter_dirs["mlp16"]], task="t")
    monkeypatch.undo()
    reopened = Catalog(tmp_path / "cat")
    assert reopened.version() == first.version and reopened.layout() == before
    assert [e["id"] for e in reopened.entries()] == first.added
    shards = cfs.list_names(reopened.fs, reopened.path("weights", reopened.layout().layout_id))
    assert len(shards) == 1  # the grown layout's shards were deleted, the old one untouched
    original = load_adapter(adapter_dirs["qv8"])
    exported = load_adapter(reopened.export(first.added[1], tmp_path / "out"))
    for name, module in original.modules.items():
        assert rel_err(exported.modules[name].delta(), module.delta()) < 1e-6
    assert len(reopened.ingest([adapter_dirs["attn8"]], task="t").added) == 1  # and it can grow later


def test_a_lost_commit_race_is_retried_on_the_new_version(tmp_path, adapter_dirs, monkeypatch):
    root = tmp_path / "cat"
    Catalog(root).ingest([adapter_dirs["qv4"]], task="t")
    real_commit = Catalog._commit
    raced = []

    def commit_after_a_rival(self, base_version, rows):
        if not raced:  # a second writer grows the layout and commits this version first
            raced.append(None)
            raced[0] = Catalog(root).ingest([adapter_dirs["attn8"]], task="rival").version
        return real_commit(self, base_version, rows)

    monkeypatch.setattr(Catalog, "_commit", commit_after_a_rival)
    report = Catalog(root).ingest([adapter_dirs["mlp16"], adapter_dirs["qvo2"]], task="t")
    assert raced == [2] and report.version == 3
    catalog = Catalog(root)
    assert sorted(catalog.tasks().items()) == [("rival", 1), ("t", 3)]
    assert catalog.layout().contains(catalog.layout(catalog.get(report.added[0])["layout_id"]))


def test_concurrent_ingests_on_a_local_catalog_lose_no_adapter(tmp_path, adapter_dirs):
    root = tmp_path / "cat"
    names = list(ADAPTERS)
    errors: list[BaseException] = []

    def ingest(name: str) -> None:
        try:
            Catalog(root).ingest([adapter_dirs[name]], task=name)
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=ingest, args=(n,)) for n in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    catalog = Catalog(root)
    assert sorted(catalog.tasks()) == sorted(names) and catalog.version() == len(names)


def test_exclusive_publish_raises_commit_conflict(tmp_path):
    fs, root = cfs.resolve_uri(tmp_path)
    path = cfs.join(root, "v.bin")
    cfs.write_bytes_atomic(fs, path, b"a", exclusive=True)
    with pytest.raises(CommitConflict):
        cfs.write_bytes_atomic(fs, path, b"b", exclusive=True)
    assert cfs.read_bytes(fs, path) == b"a"


def test_a_pinned_view_lists_the_manifest_once(tmp_path, adapter_dirs, monkeypatch):
    catalog = Catalog(tmp_path / "cat")
    ids = catalog.ingest([adapter_dirs["qv4"], adapter_dirs["qv8"]], task="t").added
    listings = []
    real = cfs.list_names
    monkeypatch.setattr(cfs, "list_names", lambda fs, d: listings.append(d) or real(fs, d))
    view = catalog.at()
    for adapter_id, _ in itertools.product(ids, range(3)):
        view.get(adapter_id)
        view.load_adapter(adapter_id)
    view.entries()
    view.layout()
    assert len(listings) == 1 and view.version() == 1
    Catalog(tmp_path / "cat").ingest([adapter_dirs["attn8"]], task="t")  # another writer
    assert view.version() == 1 and len(view.entries()) == 2  # the view stays on its version
    assert catalog.at().version() == 2
    report = view.ingest([adapter_dirs["qvo2"]], task="t")
    assert report.version == 3 and view.version() == 3
    assert catalog_module.COMMIT_ATTEMPTS > 1


@pytest.mark.ray
@pytest.mark.slow
def test_a_grown_catalog_streams_one_shape_on_driver_map_batches_and_train_workers(
    ray_session, tmp_path, adapter_dirs
):
    import json
    import tempfile
    import uuid

    from ray import train
    from ray.train import Checkpoint, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    catalog = ingest_in_order(tmp_path / "cat", adapter_dirs, ORDERS["subset first"])
    layout = catalog.layout()
    assert len(catalog.layouts()) == 4
    rows = catalog.dataset(rows_per_block=2).take_all()
    assert sorted(r["id"] for r in rows) == sorted(e["id"] for e in catalog.entries())
    for row in rows:
        weights, mask, _ = catalog.read_vector(row["id"], layout=layout)
        np.testing.assert_array_equal(row["weights"], weights)
        np.testing.assert_array_equal(row["mask"], mask)

    def shapes(batch):
        return {
            "shape": np.array([batch["weights"].shape[1:] + batch["mask"].shape[1:]] * len(batch["mask"]))
        }

    seen = catalog.dataset().map_batches(shapes, batch_format="numpy", batch_size=3).take_all()
    assert {tuple(r["shape"]) for r in seen} == {(layout.size, layout.num_modules)}
    # An older layout streams only the adapters it can hold, in its own shape.
    first = catalog.layout(catalog.entries()[0]["layout_id"])
    old_rows = catalog.dataset(first.layout_id).take_all()
    assert len(old_rows) == 1 and old_rows[0]["weights"].shape == (first.size,)

    def loop(config):
        found = set()
        count = 0
        for batch in train.get_dataset_shard("train").iter_torch_batches(batch_size=2, dtypes=None):
            found.add(tuple(batch["weights"].shape[1:]) + tuple(batch["mask"].shape[1:]))
            count += batch["weights"].shape[0]
        metrics = {"rows": count, "ok": found == {(config["size"], config["modules"])}}
        with tempfile.TemporaryDirectory() as directory:  # Train v2 keeps metrics with a checkpoint
            with open(f"{directory}/metrics.json", "w") as handle:
                json.dump(metrics, handle)
            train.report(metrics, checkpoint=Checkpoint.from_directory(directory))

    trainer = TorchTrainer(
        loop,
        train_loop_config={"size": layout.size, "modules": layout.num_modules},
        scaling_config=ScalingConfig(num_workers=1, use_gpu=False, resources_per_worker={"CPU": 1}),
        datasets={"train": catalog.dataset(columns=["weights", "mask"])},
        run_config=RunConfig(storage_path=str(tmp_path), name=f"grown-{uuid.uuid4().hex[:8]}"),
    )
    result = trainer.fit()
    assert result.metrics["ok"] is True and result.metrics["rows"] == len(ADAPTERS)


def test_train_worker_shares_cover_every_layout_version(tmp_path, adapter_dirs):
    from engine.meta.train import worker_shares

    catalog = ingest_in_order(tmp_path / "cat", adapter_dirs, [["qv4"], ["attn8"], ["mlp16"]])
    layout = catalog.layout()
    shares = worker_shares(catalog, layout.layout_id, ["t"], 2, "full")
    assert sorted(shares[0]["id"].to_pylist()) == sorted(e["id"] for e in catalog.entries())
    oldest = catalog.layout(catalog.entries()[0]["layout_id"])
    assert worker_shares(catalog, oldest.layout_id, ["t"], 2, "full")[0].num_rows == 1


def test_union_keeps_a_stored_superset_and_its_module_order():
    from engine.catalog.synth import build_layout

    small = build_layout(2, ("q_proj", "v_proj"), 8, 2, base_model="m")
    big = build_layout(2, ("q_proj", "k_proj", "v_proj"), 8, 4, base_model="m")  # layer-major order
    assert Layout.union([small, big]) is big and Layout.union([big, small]) is big
    other = Layout.union([small, Layout("m", (ModuleSpec("model.layers.0.mlp.up_proj", 16, 8),), 1)])
    assert other.contains(small) and other.num_modules == small.num_modules + 1
