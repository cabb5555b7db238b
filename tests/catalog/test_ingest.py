"""Catalog ingest: validation, atomicity, idempotency, export (no Ray needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.adapters import load_adapter
from engine.catalog import Catalog
from engine.errors import AdapterError, CatalogError, IngestError
from tests.helpers import make_adapter, rewrite_config, rewrite_weights, tiny_llama

REPO = Path(__file__).resolve().parents[2]


def rel_err(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture
def adapters(tmp_path):
    # rank 4, one module of the second adapter rank 2: exercises padding to r_max
    patterns = [{}, {"rank_pattern": {"layers.0.self_attn.q_proj": 2}}, {}]
    return [make_adapter(tmp_path / f"a{i}", seed=i, r=4, **patterns[i]) for i in range(3)]


def test_ingest_lists_and_exports_exactly(tmp_path, adapters):
    catalog = Catalog(tmp_path / "cat")
    report = catalog.ingest(adapters, task="copy", tags=["v1"])
    assert report.version == 1 and len(report.added) == 3
    entries = catalog.entries()
    assert [e["id"] for e in entries] == report.added
    assert {e["base_model"] for e in entries} == {"tests/tiny-llama"}
    assert entries[0]["tags"] == ["v1"] and entries[0]["task"] == "copy"
    layout = catalog.layout()
    assert layout.r_max == 4 and layout.num_modules == 4
    for path, adapter_id in zip(adapters, report.added, strict=True):
        original = load_adapter(path)
        exported = load_adapter(catalog.export(adapter_id, tmp_path / "out" / adapter_id))
        for name, module in original.modules.items():
            assert rel_err(exported.modules[name].delta(), module.delta()) < 1e-6


def test_ingest_is_idempotent_by_sha256(tmp_path, adapters):
    catalog = Catalog(tmp_path / "cat")
    first = catalog.ingest(adapters[:2], task="copy")
    again = catalog.ingest(adapters, task="copy")
    assert [d[1] for d in again.duplicates] == first.added
    assert len(again.added) == 1 and catalog.version() == 2
    assert catalog.ingest(adapters, task="copy").version == 2  # nothing new: no new version
    assert len(catalog.entries()) == 3


def test_a_bad_adapter_rejects_the_whole_batch_and_names_every_fault(tmp_path, adapters):
    bad = make_adapter(tmp_path / "bad", seed=9)
    rewrite_weights(bad, lambda t: {k: v * float("nan") for k, v in t.items()})
    pickle_only = make_adapter(tmp_path / "pickle", seed=10)
    (pickle_only / "adapter_model.safetensors").rename(pickle_only / "adapter_model.bin")
    catalog = Catalog(tmp_path / "cat")
    with pytest.raises(IngestError) as info:
        catalog.ingest([*adapters, bad, pickle_only], task="copy")
    assert {f.source for f in info.value.failures} == {str(bad), str(pickle_only)}
    assert "non-finite" in str(info.value) and "pickle" in str(info.value)
    assert catalog.version() == 0 and not (tmp_path / "cat").exists()


def test_skip_invalid_lands_the_valid_ones(tmp_path, adapters):
    bad = make_adapter(tmp_path / "bad", seed=9)
    rewrite_config(bad, r=16)
    report = Catalog(tmp_path / "cat").ingest([*adapters, bad], task="copy", skip_invalid=True)
    assert len(report.added) == 3 and [f.source for f in report.rejected] == [str(bad)]


def test_base_model_mismatch_and_layout_faults(tmp_path, adapters):
    catalog = Catalog(tmp_path / "cat")
    catalog.ingest(adapters, task="copy")
    wide = make_adapter(tmp_path / "wide", base=tiny_llama(hidden=48))  # same name, other shapes
    with pytest.raises(IngestError, match="trained on another base model"):
        catalog.ingest([wide], task="copy")
    big_rank = make_adapter(tmp_path / "big", r=8)
    with pytest.raises(IngestError, match="rank 8 exceeds the rank cap --r-max 4"):
        catalog.ingest([big_rank], task="copy", r_max=4)
    with pytest.raises(IngestError, match="--base-model is 'someone/else'"):
        catalog.ingest([adapters[0]], task="copy", base_model="someone/else")
    nameless = make_adapter(tmp_path / "nameless", seed=5)
    rewrite_config(nameless, base_model_name_or_path=None)
    with pytest.raises(IngestError, match="pass --base-model"):
        catalog.ingest([nameless], task="copy")
    assert catalog.ingest([nameless], task="copy", base_model="tests/tiny-llama").added


def test_two_base_models_get_two_layouts(tmp_path, adapters):
    catalog = Catalog(tmp_path / "cat")
    catalog.ingest(adapters, task="copy")
    wide_base = tiny_llama(hidden=48)
    wide_base.name_or_path = "tests/wide-llama"
    catalog.ingest([make_adapter(tmp_path / "wide", base=wide_base)], task="copy")
    assert len(set(catalog.manifest()["layout_id"].to_pylist())) == 2
    with pytest.raises(CatalogError, match="holds adapters of 2 base models"):
        catalog.layout()


def test_batch_with_disagreeing_shapes_is_rejected(tmp_path):
    a = make_adapter(tmp_path / "a")
    b = make_adapter(tmp_path / "b", base=tiny_llama(hidden=48))
    with pytest.raises(IngestError, match="a different base model"):
        Catalog(tmp_path / "cat").ingest([a, b], task="t")


def test_modules_to_save_travel_with_the_adapter(tmp_path):
    from tests.helpers import tiny_bert

    path = make_adapter(
        tmp_path / "cls", base=tiny_bert(), target_modules=("query", "value"), modules_to_save=["classifier"]
    )
    catalog = Catalog(tmp_path / "cat")
    (adapter_id,) = catalog.ingest([path], task="cls").added
    assert catalog.get(adapter_id)["extras"] == ["classifier.bias", "classifier.weight"]
    exported = load_adapter(catalog.export(adapter_id, tmp_path / "out"))
    torch.testing.assert_close(
        exported.extras["classifier.weight"], load_adapter(path).extras["classifier.weight"]
    )


def test_gauge_setting_is_fixed_per_catalog(tmp_path, adapters):
    catalog = Catalog(tmp_path / "cat")
    catalog.ingest(adapters[:1], task="t", gauge=False)
    assert catalog.settings()["gauge"] is False
    with pytest.raises(CatalogError, match="gauge=False"):
        catalog.ingest(adapters[1:], task="t", gauge=True)


@pytest.mark.parametrize("bad_id", ["../../etc/passwd", "a/b", "", ".hidden", "x" * 200])
def test_ids_and_task_names_never_become_paths(tmp_path, adapters, bad_id):
    catalog = Catalog(tmp_path / "cat")
    catalog.ingest(adapters[:1], task="t")
    with pytest.raises(ValueError, match="invalid adapter id"):
        catalog.get(bad_id)
    with pytest.raises(ValueError, match="invalid task name"):
        catalog.ingest(adapters[1:], task=bad_id)


def test_unknown_id_is_a_clear_error(tmp_path, adapters):
    catalog = Catalog(tmp_path / "cat")
    catalog.ingest(adapters[:1], task="t")
    with pytest.raises(CatalogError, match="no adapter 'nope'"):
        catalog.get("nope")


# ----------------------------------------------------------------------------- atomicity
CRASH_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from engine.catalog import catalog as module

    def crash(self, *args, **kwargs):
        os._exit(9)  # the process dies after writing shards, before committing the manifest

    module.Catalog._commit = crash
    module.Catalog(sys.argv[1]).ingest(sys.argv[3:], task=sys.argv[2])
    """
)


def test_crash_mid_ingest_leaves_previous_version_intact(tmp_path, adapters):
    uri = str(tmp_path / "cat")
    catalog = Catalog(uri)
    catalog.ingest(adapters[:1], task="t")
    before = catalog.entries()
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, uri, "t", *map(str, adapters[1:])],
        cwd=REPO,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 9, proc.stderr.decode()
    shards = list((tmp_path / "cat" / "weights").rglob("*.parquet"))
    assert len(shards) == 2  # the crashed ingest's shard is on disk ...
    reopened = Catalog(uri)
    assert reopened.version() == 1 and reopened.entries() == before  # ... but not visible
    report = reopened.ingest(adapters, task="t")
    assert len(report.added) == 2 and reopened.version() == 2


def test_failure_while_writing_removes_partial_shards(tmp_path, adapters, monkeypatch):
    catalog = Catalog(tmp_path / "cat")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Catalog, "_commit", boom)
    with pytest.raises(OSError, match="disk full"):
        catalog.ingest(adapters, task="t")
    assert not list((tmp_path / "cat").rglob("*.parquet"))


def test_readers_ignore_half_written_files(tmp_path, adapters):
    catalog = Catalog(tmp_path / "cat")
    catalog.ingest(adapters, task="t")
    manifest_dir = tmp_path / "cat" / "manifest"
    (manifest_dir / ".v00000002.parquet.tmp-deadbeef").write_bytes(b"PAR1 half")
    assert Catalog(tmp_path / "cat").version() == 1
    assert len(Catalog(tmp_path / "cat").entries()) == 3


def test_concurrent_commit_of_the_same_version_is_refused(tmp_path, adapters):
    writer_a = Catalog(tmp_path / "cat")
    writer_a.ingest(adapters[:1], task="t")
    writer_b = Catalog(tmp_path / "cat")
    base = writer_b.version()
    writer_a.ingest(adapters[1:2], task="t")  # commits version 2 first
    row = dict(writer_a.entries()[0], id="other-id", sha256="0" * 64)
    with pytest.raises(CatalogError, match="concurrent writer"):
        writer_b._commit(base, [row])
    assert len(Catalog(tmp_path / "cat").entries()) == 2


def test_read_vector_matches_canonical_layout(tmp_path, adapters):
    catalog = Catalog(tmp_path / "cat")
    (first, *_) = catalog.ingest(adapters, task="t").added
    weights, mask, extras = catalog.read_vector(first)
    layout = catalog.layout()
    assert weights.shape == (layout.size,) and weights.dtype == np.float32
    assert mask.shape == (layout.num_modules,) and mask.all() and extras == {}
    settings = json.loads((tmp_path / "cat" / "catalog.json").read_text())
    assert settings["gauge"] is True and os.path.isdir(tmp_path / "cat" / "layouts")


def test_export_refuses_to_clobber(tmp_path, adapters):
    catalog = Catalog(tmp_path / "cat")
    (first, *_) = catalog.ingest(adapters, task="t").added
    catalog.export(first, tmp_path / "out")
    with pytest.raises(AdapterError, match="already exists"):
        catalog.export(first, tmp_path / "out")


def test_adapter_read_cache_is_bounded_and_returns_independent_copies(tmp_path, adapters):
    import pickle

    plain = Catalog(tmp_path / "cat")
    ids = list(plain.ingest(adapters, task="copy").added)
    one = plain.load_adapter(ids[0]).nbytes()
    cached = Catalog(tmp_path / "cat", adapter_cache_bytes=one)  # room for exactly one adapter
    first = cached.load_adapter(ids[0])
    first.config["edited"] = True  # a caller's edits stay its own
    first.modules.clear()
    again = cached.load_adapter(ids[0])
    assert "edited" not in again.config and set(again.modules) == set(plain.load_adapter(ids[0]).modules)
    assert (
        again.modules[next(iter(again.modules))].A
        is cached.load_adapter(ids[0]).modules[next(iter(again.modules))].A
    )  # served from memory
    cached.load_adapter(ids[1])  # evicts ids[0]
    assert cached._adapter_cache.get(ids[0]) is None and cached._adapter_cache.get(ids[1]) is not None
    for a, b in zip(
        cached.load_adapter(ids[1]).modules.values(), plain.load_adapter(ids[1]).modules.values(), strict=True
    ):
        torch.testing.assert_close(a.A, b.A)
    assert pickle.loads(pickle.dumps(cached))._adapter_cache.get(ids[1]) is None  # pickles empty
