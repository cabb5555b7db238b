"""The adapter catalog: the system of record for adapters, layouts, weights and statistics.

Writes are atomic and ordered (layouts and weight shards first, under fresh names; the manifest
version that references them last), so a reader always sees one whole committed version and an
interrupted write leaves the previous version intact. Ingest is all-or-nothing per batch by
default: every adapter is validated before anything is written, and every fault is reported at
once. On a local filesystem a concurrent commit of the same version is detected (the manifest is
published with a hard link, which fails if the file exists), on S3 a conditional PUT and on GCS a
generation precondition refuse it (:func:`engine.catalog.fs.write_bytes_atomic`), and the losing
ingest starts again on the new version; other stores only check for the file first (with an
``UnsafeCommitWarning``), so serialise writers there.

Layouts grow: each base model has one *current* layout, the union of every layout its adapters
were written in. An adapter with new target modules or a higher rank makes ingest write a grown
layout (a superset) and store the new adapters in it; shards already written are never rewritten.
An adapter is read in any layout that contains its own (:meth:`Layout.embed`: zero padding,
absent modules masked), exactly.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from engine.adapters.codec import from_flat, to_canonical, to_flat, to_lora
from engine.adapters.io import CONFIG_NAME, WEIGHTS_NAME, load_adapter, save_adapter
from engine.adapters.layout import Layout, ModuleSpec
from engine.adapters.lora import LoraAdapter
from engine.catalog import fs as cfs
from engine.catalog.schema import (
    CATALOG_FORMAT,
    LAYOUT_DIR,
    MANIFEST_DIR,
    MANIFEST_FILE,
    MANIFEST_SCHEMA,
    SETTINGS_FILE,
    STATS_DIR,
    WEIGHTS_DIR,
    check_name,
    manifest_name,
    rows_per_row_group,
    shard_schema,
    stats_schema,
)
from engine.catalog.stats import SlotStats
from engine.errors import AdapterError, CatalogError, CommitConflict, IngestError
from engine.lru import ByteBoundedLRU

# Bounds on what one weight shard / row group holds, so readers stream in bounded memory.
SHARD_BYTES = 128 * 2**20
SHARD_MAX_ROWS = 1024
# An ingest that loses a commit race re-validates and re-encodes on the new version this often.
COMMIT_ATTEMPTS = 5

Progress = Callable[[int], None]


@dataclass
class AdapterRecord:
    """One adapter ready to be written: its manifest fields and its canonical flat form."""

    meta: dict[str, Any]
    weights: np.ndarray  # [N] float32
    mask: np.ndarray  # [M] bool
    extras: bytes = b""


@dataclass
class IngestReport:
    """What an ingest did.

    Attributes:
        version: the catalog version after the ingest (unchanged if nothing was added).
        added: ids of the adapters added.
        duplicates: ``(source, existing id)`` of adapters already in the catalog (same sha256).
        rejected: adapters refused (only with ``skip_invalid``; otherwise ingest raises).
    """

    version: int
    added: list[str] = field(default_factory=list)
    duplicates: list[tuple[str, str]] = field(default_factory=list)
    rejected: list[AdapterError] = field(default_factory=list)


@dataclass
class _Candidate:
    path: Path
    base_model: str
    sha256: str
    shapes: dict[str, tuple[int, int]]
    ranks: dict[str, int]


def adapter_id(task: str, sha256: str) -> str:
    """Deterministic id: ingesting the same files twice yields the same id."""
    return f"{task}-{sha256[:12]}"


def file_sha256(path: Path) -> str:
    """sha256 over an adapter directory's config and weights (what defines the adapter)."""
    digest = hashlib.sha256()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        with open(path / name, "rb") as handle:
            for block in iter(lambda h=handle: h.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def extras_to_bytes(extras: dict[str, torch.Tensor]) -> bytes:
    return save_safetensors_bytes({k: v.contiguous() for k, v in extras.items()}) if extras else b""


def extras_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    return dict(load_safetensors_bytes(data)) if data else {}


class Catalog:
    """A catalog at a URI (local directory, ``s3://bucket/prefix``, ``gs://...``, fsspec URIs).

    Example::

        catalog = Catalog("s3://adapters/prod")
        catalog.ingest(["runs/sst2-seed0", "runs/sst2-seed1"], task="sst2")
        ds = catalog.dataset(task="sst2")        # ray.data.Dataset: id, task, weights [N], mask [M]
    """

    def __init__(self, uri: str | Path, adapter_cache_bytes: int = 0):
        """Open the catalog at ``uri`` (a path or a pyarrow/fsspec URI).

        Args:
            adapter_cache_bytes: keep up to this many bytes of recently loaded adapters in memory
                (:meth:`load_adapter`), e.g. for a server that fuses the same inputs again and
                again. Ids are content hashes, so a cached adapter is never stale. 0: no cache.
        """
        self.fs, self.root = cfs.resolve_uri(uri)
        # A local path is made absolute here, on the process that was given it: a relative
        # ``uri`` handed on to Ray workers (whose working directory differs) would open another,
        # empty catalog there.
        self.uri = str(uri) if "://" in str(uri) else self.root
        self._manifests: dict[int, pa.Table] = {}
        self._layouts: dict[str, Layout] = {}
        self._adapter_cache = ByteBoundedLRU(adapter_cache_bytes)
        self._pinned: int | None = None
        self._in_gauge: bool | None = None

    def at(self, version: int | None = None) -> Catalog:
        """A view of this catalog pinned to ``version`` (default: the latest, listed once now).

        Every read of the view (:meth:`get`, :meth:`entries`, :meth:`layout`, :meth:`dataset`,
        ...) uses that one manifest version without listing the manifest directory again (a LIST
        per call on object stores): open one view per command or request. The view shares this
        catalog's caches; an ingest through it moves it to the version it committed.
        """
        view = copy.copy(self)
        view._pinned = self._list_version() if version is None else int(version)
        return view

    def __repr__(self) -> str:
        return f"Catalog({self.uri!r})"

    def path(self, *parts: str) -> str:
        """The path of ``parts`` under the catalog's root, in its filesystem (``self.fs``)."""
        return cfs.join(self.root, *parts)

    # ------------------------------------------------------------------ settings and versions
    def settings(self) -> dict[str, Any] | None:
        path = self.path(SETTINGS_FILE)
        if not cfs.exists(self.fs, path):
            return None
        return json.loads(cfs.read_bytes(self.fs, path))

    def _ensure_settings(self, gauge: bool | None, persist: bool = True) -> dict[str, Any]:
        """The catalog's settings; a new catalog gets defaults (written when ``persist``)."""
        settings = self.settings()
        if settings is None:
            settings = {
                "format": CATALOG_FORMAT,
                "gauge": True if gauge is None else bool(gauge),
                "created": datetime.now(timezone.utc).isoformat(),
            }
            if persist:
                data = json.dumps(settings).encode()
                cfs.write_bytes_atomic(self.fs, self.path(SETTINGS_FILE), data)
        elif settings.get("format") != CATALOG_FORMAT:
            raise CatalogError(f"{self.uri}: unsupported catalog format {settings.get('format')!r}")
        elif gauge is not None and bool(gauge) != settings["gauge"]:
            raise CatalogError(
                f"{self.uri}: the catalog was created with gauge={settings['gauge']}; every "
                "adapter of a catalog must share it (use another catalog to compare)"
            )
        return settings

    def version(self) -> int:
        """The pinned version of a view (:meth:`at`), else the latest committed version (0 for an
        empty or missing catalog)."""
        return self._list_version() if self._pinned is None else self._pinned

    def _list_version(self) -> int:
        versions = [
            int(m.group(1))
            for name in cfs.list_names(self.fs, self.path(MANIFEST_DIR))
            if (m := MANIFEST_FILE.match(name))
        ]
        return max(versions, default=0)

    def manifest(self, version: int | None = None) -> pa.Table:
        """The manifest table of ``version`` (latest by default); one row per adapter."""
        version = self.version() if version is None else version
        if version == 0:
            return MANIFEST_SCHEMA.empty_table()
        if version not in self._manifests:
            path = self.path(MANIFEST_DIR, manifest_name(version))
            try:
                self._manifests[version] = pq.read_table(path, filesystem=self.fs)
            except FileNotFoundError:
                raise CatalogError(f"{self.uri}: version {version} does not exist") from None
        return self._manifests[version]

    # ------------------------------------------------------------------ reading
    def entries(self, task: str | None = None) -> list[dict[str, Any]]:
        """Manifest rows as dicts, optionally of one task, in ingest order."""
        table = self.manifest()
        if task is not None:
            table = table.filter(pc.equal(table["task"], task))
        return table.to_pylist()

    def tasks(self) -> dict[str, int]:
        """Task name -> number of adapters."""
        counts: dict[str, int] = {}
        for task in self.manifest().column("task").to_pylist():
            counts[task] = counts.get(task, 0) + 1
        return counts

    def get(self, adapter_id: str) -> dict[str, Any]:
        """The manifest row of ``adapter_id``; :class:`CatalogError` if it is not in the catalog."""
        check_name("adapter id", adapter_id)
        table = self.manifest()
        rows = table.filter(pc.equal(table["id"], adapter_id)).to_pylist()
        if not rows:
            raise CatalogError(f"no adapter {adapter_id!r} in catalog {self.uri} (see `icmf catalog ls`)")
        return rows[0]

    def layout(self, layout_id: str | None = None) -> Layout:
        """A layout by id; without an id, the current layout of the catalog's only base model."""
        if layout_id is None:
            bases = sorted(set(self.manifest().column("base_model").to_pylist()))
            if len(bases) != 1:
                raise CatalogError(
                    f"{self.uri} holds adapters of {len(bases)} base models "
                    f"({', '.join(bases) or 'none'}); name a layout"
                )
            return self.layout_for_base_model(bases[0])
        if layout_id not in self._layouts:
            path = self.path(LAYOUT_DIR, f"{check_name('layout id', layout_id)}.json")
            if not cfs.exists(self.fs, path):
                raise CatalogError(f"{self.uri}: no layout {layout_id!r}")
            self._layouts[layout_id] = Layout.from_dict(json.loads(cfs.read_bytes(self.fs, path)))
        return self._layouts[layout_id]

    def layouts(self, base_model: str | None = None, manifest: pa.Table | None = None) -> list[Layout]:
        """The layouts the manifest's adapters are stored in (of one base model), oldest first."""
        table = self.manifest() if manifest is None else manifest
        if base_model is not None:
            table = table.filter(pc.equal(table["base_model"], base_model))
        ids = pc.unique(table["layout_id"]).to_pylist()
        return [self.layout(i) for i in ids]

    def layouts_readable_in(self, layout: Layout) -> list[Layout]:
        """The stored layouts whose adapters read exactly in ``layout``: itself and the older
        versions it contains (the adapters a dataset of ``layout`` streams)."""
        return [
            other
            for other in self.layouts(layout.base_model)
            if other.layout_id == layout.layout_id or layout.contains(other)
        ]

    def layout_for_base_model(self, base_model: str) -> Layout | None:
        """The current layout of ``base_model``: the union of the layouts its adapters are stored
        in (the newest one, since ingest only ever grows a layout); None if it has no adapters.
        Every adapter of the base model reads exactly in it."""
        return self._current_layout(self.manifest(), base_model)

    def _current_layout(self, manifest: pa.Table, base_model: str) -> Layout | None:
        layouts = self.layouts(base_model, manifest)
        if not layouts:
            return None
        current = Layout.union(layouts)
        return self._layouts.setdefault(current.layout_id, current)

    def read_vector(
        self, adapter_id: str, layout: Layout | None = None
    ) -> tuple[np.ndarray, np.ndarray, dict[str, torch.Tensor]]:
        """``(weights [N] float32, module mask [M] bool, modules_to_save tensors)`` of one adapter,
        in the layout it is stored in, or padded into ``layout`` (one that contains it)."""
        entry = self.get(adapter_id)
        weights, mask, extras = self._read_row(entry)
        if layout is not None:
            stored = self.layout(entry["layout_id"])
            if not layout.contains(stored):
                raise CatalogError(
                    f"{adapter_id} is stored in layout {stored.layout_id}, which layout "
                    f"{layout.layout_id} does not contain (another base model, or an older layout)"
                )
            weights, mask = layout.embed(stored, weights, mask)
        return weights, mask, extras

    def _read_row(self, entry: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, dict[str, torch.Tensor]]:
        """:meth:`read_vector` of a manifest row already looked up (one manifest lookup per read)."""
        adapter_id = entry["id"]
        table = pq.read_table(
            self.path(entry["shard"]), filesystem=self.fs, filters=[("id", "=", adapter_id)]
        )
        if table.num_rows != 1:
            raise CatalogError(f"{self.uri}: shard {entry['shard']} lacks adapter {adapter_id!r}")
        weights = table.column("weights").combine_chunks().flatten().to_numpy()
        mask = np.asarray(table.column("mask")[0].as_py(), dtype=bool)
        return weights.astype(np.float32, copy=False), mask, extras_from_bytes(table["extras"][0].as_py())

    def load_adapter(self, adapter_id: str) -> LoraAdapter:
        """A catalog adapter as a :class:`LoraAdapter` (scaling folded, same delta per module).

        Each call returns its own ``LoraAdapter`` (its dicts may be changed freely); with an
        adapter cache, the tensors are shared between calls and must not be written in place.
        """
        adapter = self._adapter_cache.get(adapter_id)
        if adapter is None:
            adapter = self._read_adapter(adapter_id)
            self._adapter_cache.put(adapter_id, adapter, adapter.nbytes())
        # The caller's own dicts and config; the (never written) tensors are shared.
        return replace(
            adapter,
            modules=dict(adapter.modules),
            config=copy.deepcopy(adapter.config),
            extras=dict(adapter.extras),
        )

    def _read_adapter(self, adapter_id: str) -> LoraAdapter:
        entry = self.get(adapter_id)
        weights, mask, extras = self._read_row(entry)
        canonical = from_flat(weights, self.layout(entry["layout_id"]), mask)
        config = json.loads(entry["peft_config"])
        # The row is in the catalog's gauge: its modules say so, and encoding them for an F-VAE
        # of the same gauge takes them as stored instead of computing the gauge again.
        return to_lora(
            canonical,
            config=config,
            extras=extras,
            source=f"{self.uri}#{adapter_id}",
            in_gauge=self._stored_in_gauge(),
        )

    def _stored_in_gauge(self) -> bool:
        """Whether rows are stored in the canonical gauge (fixed when the catalog was created; read
        once per :class:`Catalog`)."""
        if self._in_gauge is None:
            settings = self.settings()
            if settings is None:
                return False
            self._in_gauge = bool(settings.get("gauge", True))
        return self._in_gauge

    def export(self, adapter_id: str, out_dir: str | Path, overwrite: bool = False) -> Path:
        """Write a catalog adapter as a stock PEFT adapter directory."""
        return save_adapter(self.load_adapter(adapter_id), out_dir, overwrite=overwrite)

    # ------------------------------------------------------------------ ingest
    def ingest(
        self,
        paths: Sequence[str | Path],
        task: str,
        base_model: str | None = None,
        r_max: int | None = None,
        gauge: bool | None = None,
        tags: Sequence[str] = (),
        skip_invalid: bool = False,
        progress: Progress | None = None,
        base_config: Any = None,
    ) -> IngestReport:
        """Validate and add PEFT adapter directories of one task.

        Args:
            paths: adapter directories.
            task: task name shared by the batch.
            base_model: base model id; defaults to each config's ``base_model_name_or_path`` and
                must agree with it when both are set.
            r_max: a rank cap chosen to bound storage: an adapter of a higher rank is refused
                with that reason (never stored truncated). A layout this batch creates is padded
                to it. Without it, a higher-rank adapter grows the layout's ``r_max``.
            gauge: store modules in the canonical SVD gauge (fixed when the catalog is created;
                default True).
            skip_invalid: land the valid adapters and report the rest, instead of landing none.
            progress: called with the number of adapters processed since the last call.
            base_config: the base model's ``config.json`` (path, directory or dict): every
                adapter module must then be a ``Linear``/``Conv1D`` of that model with the same
                shape (:mod:`engine.adapters.shapes`; nothing is downloaded).

        Raises:
            IngestError: listing every rejected adapter with its cause (nothing is written).
        """
        check_name("task name", task)
        if r_max is not None and r_max <= 0:
            raise CatalogError(f"r_max must be positive, got {r_max}")
        base_shapes = None
        if base_config is not None:
            from engine.adapters.shapes import module_shapes

            try:
                base_shapes = module_shapes(base_config)
            except (ValueError, OSError, KeyError) as exc:
                raise CatalogError(f"cannot read the base model config: {exc}") from None
        for attempt in range(COMMIT_ATTEMPTS):
            try:
                report = self._ingest_once(
                    paths, task, base_model, r_max, gauge, tags, skip_invalid, progress, base_shapes
                )
            except CommitConflict:
                if attempt == COMMIT_ATTEMPTS - 1:
                    raise
                continue  # another writer committed first: validate and encode again on its version
            if self._pinned is not None:
                self._pinned = report.version
            return report
        raise AssertionError("unreachable")

    def _ingest_once(self, paths, task, base_model, r_max, gauge, tags, skip_invalid, progress, base_shapes):
        settings = self._ensure_settings(gauge, persist=False)
        version = self._list_version()  # one listing: the manifest and the report share the version
        manifest = self.manifest(version)
        known = dict(zip(manifest["sha256"].to_pylist(), manifest["id"].to_pylist(), strict=True))
        report = IngestReport(version=version)
        current = {
            base: self._current_layout(manifest, base) for base in set(manifest["base_model"].to_pylist())
        }
        candidates, failures = self._validate_batch(
            paths, base_model, r_max, known, current, report, progress, base_shapes
        )
        if failures and not skip_invalid:
            raise IngestError(failures)
        report.rejected = failures
        if not candidates:
            return report
        self._ensure_settings(settings["gauge"])  # a new catalog's settings land before its data
        layouts = self._layouts_for(candidates, current, r_max)
        records = self._encode(candidates, layouts, task, tags, settings["gauge"], progress)
        report.version = self.add_records(records, base_version=version)
        report.added = [adapter_id(task, c.sha256) for c in candidates]
        return report

    def _validate_batch(self, paths, base_model, r_max, known, current, report, progress, base_shapes):
        candidates: list[_Candidate] = []
        failures: list[AdapterError] = []
        seen: dict[str, str] = {}
        for raw in paths:
            path = Path(raw)
            try:
                candidate = self._validate_one(path, base_model, r_max, current, base_shapes)
            except AdapterError as exc:
                failures.append(exc)
            else:
                if candidate.sha256 in known:
                    report.duplicates.append((str(path), known[candidate.sha256]))
                elif candidate.sha256 in seen:
                    report.duplicates.append((str(path), f"{seen[candidate.sha256]} (same batch)"))
                else:
                    seen[candidate.sha256] = str(path)
                    candidates.append(candidate)
            if progress:
                progress(1)
        failures.extend(self._check_shared_shapes(candidates))
        bad = {f.source for f in failures}
        return [c for c in candidates if str(c.path) not in bad], failures

    def _validate_one(
        self,
        path: Path,
        base_model: str | None,
        r_max: int | None,
        current: dict[str, Layout],
        base_shapes: dict[str, tuple[int, int]] | None = None,
    ) -> _Candidate:
        adapter = load_adapter(path)
        declared = adapter.base_model
        if base_model and declared and declared != base_model:
            raise AdapterError(
                str(path),
                f"adapter_config.json names base model {declared!r} but --base-model is "
                f"{base_model!r}; fix one of them",
            )
        resolved = base_model or declared
        if not resolved:
            raise AdapterError(
                str(path),
                "no base model: adapter_config.json has no base_model_name_or_path; pass --base-model",
            )
        faults = []
        if base_shapes is not None:
            from engine.adapters.shapes import shape_faults

            faults += shape_faults({n: (m.d_out, m.d_in) for n, m in adapter.modules.items()}, base_shapes)
        layout = current.get(resolved)
        for name, module in adapter.modules.items():
            spec = layout.modules[layout.index[name]] if layout and name in layout.index else None
            if spec is not None and (module.d_out, module.d_in) != (spec.d_out, spec.d_in):
                faults.append(
                    f"{name}: delta shape {(module.d_out, module.d_in)} differs from "
                    f"{(spec.d_out, spec.d_in)} in layout {layout.layout_id} of base model "
                    f"{resolved!r}: the adapter was trained on another base model"
                )
        if r_max is not None and adapter.max_rank > r_max:
            faults.append(
                f"rank {adapter.max_rank} exceeds the rank cap --r-max {r_max} set for this ingest "
                "(raise or omit it to store the adapter at its own rank)"
            )
        if faults:
            raise AdapterError(str(path), "; ".join(faults))
        return _Candidate(
            path=path,
            base_model=resolved,
            sha256=file_sha256(path),
            shapes={n: (m.d_out, m.d_in) for n, m in adapter.modules.items()},
            ranks={n: m.rank for n, m in adapter.modules.items()},
        )

    @staticmethod
    def _check_shared_shapes(candidates: list[_Candidate]) -> list[AdapterError]:
        """Adapters of one base model in one batch must agree on every module's shape."""
        first: dict[tuple[str, str], tuple[tuple[int, int], Path]] = {}
        failures = []
        for c in candidates:
            for name, shape in c.shapes.items():
                seen_shape, seen_path = first.setdefault((c.base_model, name), (shape, c.path))
                if seen_shape != shape:
                    failures.append(
                        AdapterError(
                            str(c.path),
                            f"{name} has delta shape {shape} but {seen_path} (same base model "
                            f"{c.base_model!r}) has {seen_shape}: a different base model?",
                        )
                    )
                    break
        return failures

    @staticmethod
    def _layouts_for(
        candidates: list[_Candidate], current: dict[str, Layout], r_max: int | None
    ) -> dict[str, Layout]:
        """Per base model, the layout the batch is written in: the current one, or a grown
        superset when the batch brings new modules or a higher rank, or a new one."""
        layouts: dict[str, Layout] = {}
        for base in sorted({c.base_model for c in candidates}):
            group = [c for c in candidates if c.base_model == base]
            shapes = {n: s for c in group for n, s in c.shapes.items()}
            rank = max(r for c in group for r in c.ranks.values())
            existing = current.get(base)
            if existing is not None:
                layouts[base] = existing.grown(shapes, rank)
                continue
            specs = tuple(ModuleSpec(n, *shapes[n]) for n in Layout.sort_names(shapes))
            layouts[base] = Layout(base_model=base, modules=specs, r_max=max(rank, r_max or 0))
        return layouts

    def _encode(
        self, candidates, layouts, task, tags, gauge, progress
    ) -> Iterator[tuple[Layout, AdapterRecord]]:
        for c in candidates:
            # Re-read instead of holding every adapter from validation: memory stays one adapter.
            adapter = load_adapter(c.path)
            if file_sha256(c.path) != c.sha256:
                raise CatalogError(f"{c.path} changed during ingest; nothing was ingested, retry")
            layout = layouts[c.base_model]
            canonical = to_canonical(adapter, layout, gauge=gauge)
            config = dict(adapter.config, base_model_name_or_path=c.base_model)
            meta = {
                "id": adapter_id(task, c.sha256),
                "task": task,
                "base_model": c.base_model,
                "layout_id": layout.layout_id,
                "rank": adapter.max_rank,
                "alpha": float(adapter.config["lora_alpha"]),
                "target_modules": sorted(adapter.modules, key=Layout.name_key),
                "num_params": adapter.num_lora_params(),
                "sha256": c.sha256,
                "source": str(c.path.resolve()),
                "tags": list(tags),
                "peft_config": json.dumps(config, sort_keys=True),
                "extras": sorted(adapter.extras),
            }
            record = AdapterRecord(
                meta=meta,
                weights=to_flat(canonical).numpy(),
                mask=canonical.mask.numpy(),
                extras=extras_to_bytes(adapter.extras),
            )
            if progress:
                progress(1)
            yield layout, record

    # ------------------------------------------------------------------ the one write path
    def add_records(
        self, records: Iterable[tuple[Layout, AdapterRecord]], base_version: int | None = None
    ) -> int:
        """Write adapters in canonical form and commit a new version; returns that version.

        Shards are written first under fresh names; the manifest that references them is
        committed last. If anything fails before the commit, the shards written so far are
        deleted and the previous version stays the catalog's state (a grown layout's file may
        remain: it is content-addressed and unreferenced, so harmless).

        Args:
            base_version: the version the records were prepared against (default: the latest);
                :class:`CommitConflict` if another writer committed it first.
        """
        base_version = self._list_version() if base_version is None else base_version
        written: list[str] = []
        rows: list[dict[str, Any]] = []
        try:
            for layout, batch in _group_into_shards(records):
                self._write_layout(layout)
                shard = cfs.join(WEIGHTS_DIR, layout.layout_id, f"{uuid.uuid4().hex}.parquet")
                written.append(self.path(shard))
                self._write_shard(self.path(shard), layout, batch)
                now = datetime.now(timezone.utc)
                rows.extend(dict(r.meta, shard=shard, created=now) for r in batch)
            if not rows:
                return base_version
            return self._commit(base_version, rows)
        except BaseException:
            for path in written:
                cfs.delete_quietly(self.fs, path)
            raise

    def _write_layout(self, layout: Layout) -> None:
        path = self.path(LAYOUT_DIR, f"{layout.layout_id}.json")
        if not cfs.exists(self.fs, path):  # content-addressed: an existing file is identical
            data = json.dumps(layout.to_dict(), sort_keys=True).encode()
            cfs.write_bytes_atomic(self.fs, path, data)
        self._layouts[layout.layout_id] = layout

    def _write_shard(self, path: str, layout: Layout, batch: list[AdapterRecord]) -> None:
        for r in batch:
            if r.weights.shape != (layout.size,) or r.mask.shape != (layout.num_modules,):
                raise CatalogError(f"record {r.meta.get('id')} does not match layout {layout.layout_id}")
            if not np.isfinite(r.weights).all():
                raise CatalogError(f"record {r.meta.get('id')} has non-finite weights")
        flat = pa.array(np.concatenate([r.weights for r in batch]).astype(np.float32, copy=False))
        masks = pa.array(np.concatenate([r.mask for r in batch]).astype(bool, copy=False))
        table = pa.Table.from_arrays(
            [
                pa.array([r.meta["id"] for r in batch], pa.string()),
                pa.FixedSizeListArray.from_arrays(flat, layout.size),
                pa.FixedSizeListArray.from_arrays(masks, layout.num_modules),
                pa.array([r.extras for r in batch], pa.binary()),
            ],
            schema=shard_schema(layout.size, layout.num_modules),
        )
        cfs.write_parquet_atomic(self.fs, path, table, row_group_size=rows_per_row_group(layout.size))

    def _commit(self, base_version: int, rows: list[dict[str, Any]]) -> int:
        new = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
        table = pa.concat_tables([self.manifest(base_version), new]) if base_version else new
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        version = base_version + 1
        path = self.path(MANIFEST_DIR, manifest_name(version))
        cfs.write_bytes_atomic(self.fs, path, buffer.getvalue(), exclusive=True)
        self._manifests[version] = table
        return version

    # ------------------------------------------------------------------ streaming and statistics
    def dataset(
        self,
        layout_id: str | None = None,
        task: str | None = None,
        rows_per_block: int = 256,
        columns: Sequence[str] | None = None,
        ids: Sequence[str] | None = None,
    ):
        """A ``ray.data.Dataset`` of adapters (see :func:`engine.catalog.streaming.adapter_dataset`)."""
        from engine.catalog.streaming import adapter_dataset

        return adapter_dataset(
            self, layout_id=layout_id, task=task, rows_per_block=rows_per_block, columns=columns, ids=ids
        )

    def compute_stats(self, layout_id: str | None = None) -> SlotStats:
        """Compute per-slot statistics in one streaming pass, store them, and return them."""
        from engine.catalog.streaming import streaming_moments

        layout = self.layout(layout_id)
        version = self.version()
        dataset = self.dataset(layout.layout_id, columns=["weights", "mask"])
        moments, count = streaming_moments(dataset, layout)
        stats = SlotStats(layout.layout_id, version, count, moments.count, moments.mean, moments.std())
        table = pa.Table.from_arrays(
            [
                pa.FixedSizeListArray.from_arrays(pa.array(stats.count), layout.size),
                pa.FixedSizeListArray.from_arrays(pa.array(stats.mean), layout.size),
                pa.FixedSizeListArray.from_arrays(pa.array(stats.std), layout.size),
            ],
            schema=stats_schema(layout.size).with_metadata(
                {"manifest_version": str(version), "num_adapters": str(count)}
            ),
        )
        cfs.write_parquet_atomic(self.fs, self.path(STATS_DIR, f"{layout.layout_id}.parquet"), table)
        return stats

    def stats(self, layout_id: str | None = None) -> SlotStats | None:
        """Stored statistics of a layout, or None if never computed. Check ``manifest_version``
        against :meth:`version` to know whether they are current."""
        layout = self.layout(layout_id)
        path = self.path(STATS_DIR, f"{layout.layout_id}.parquet")
        if not cfs.exists(self.fs, path):
            return None
        table = pq.read_table(path, filesystem=self.fs)
        meta = table.schema.metadata
        column = lambda name: table.column(name).combine_chunks().flatten().to_numpy()  # noqa: E731
        return SlotStats(
            layout_id=layout.layout_id,
            manifest_version=int(meta[b"manifest_version"]),
            num_adapters=int(meta[b"num_adapters"]),
            count=column("count"),
            mean=column("mean"),
            std=column("std"),
        )


def _group_into_shards(
    records: Iterable[tuple[Layout, AdapterRecord]],
) -> Iterator[tuple[Layout, list[AdapterRecord]]]:
    """Consecutive records of one layout, cut at the shard size bounds."""
    current: Layout | None = None
    batch: list[AdapterRecord] = []
    for layout, record in records:
        limit = max(1, min(SHARD_MAX_ROWS, SHARD_BYTES // (4 * layout.size)))
        if batch and (layout.layout_id != current.layout_id or len(batch) >= limit):
            yield current, batch
            batch = []
        current = layout
        batch.append(record)
    if batch:
        yield current, batch
