"""Fusing adapters: from adapters in memory, or from catalog ids or task names, to a PEFT adapter
directory with provenance."""

from __future__ import annotations

import json
import platform
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from engine import __version__
from engine.adapters.io import save_adapter
from engine.adapters.lora import LoraAdapter
from engine.catalog.catalog import Catalog
from engine.catalog.fs import upload_dir
from engine.fusion.registry import FusionConfigError, FusionInputs, get_method

PROVENANCE_FILE = "icmf_provenance.json"


@dataclass
class FusionResult:
    """A fused adapter and the record of how it was made."""

    adapter: LoraAdapter
    provenance: dict[str, Any]

    def save(self, out_dir: str | Path, overwrite: bool = False) -> Path | str:
        """Write a stock PEFT adapter directory plus ``icmf_provenance.json``, atomically; ``out_dir``
        may be an object-store URI (``s3://...``): job outputs must outlive the worker's disk.
        Non-finite values are refused (nothing is written)."""
        sidecar = json.dumps(self.provenance, indent=2, sort_keys=True).encode()
        if "://" in str(out_dir):  # object store: stage locally, then upload (config last)
            with tempfile.TemporaryDirectory(prefix="icmf-fused-") as staging:
                local = save_adapter(
                    self.adapter, Path(staging) / "adapter", extra_files={PROVENANCE_FILE: sidecar}
                )
                return upload_dir(local, str(out_dir), overwrite=overwrite, last="adapter_config.json")
        return save_adapter(
            self.adapter, out_dir, overwrite=overwrite, extra_files={PROVENANCE_FILE: sidecar}
        )


def _check_weights(weights: list[float] | None, count: int) -> list[float]:
    if weights is None:
        return [1.0 / count] * count if count else []
    if len(weights) != count:
        raise FusionConfigError(f"got {len(weights)} weight(s) for {count} adapter(s); give one per adapter")
    return [float(w) for w in weights]


def fuse_adapters(
    adapters: list[LoraAdapter],
    method: str,
    weights: list[float] | None = None,
    params: dict[str, Any] | None = None,
    seed: int = 0,
    tasks: list[str] | None = None,
    context: dict[str, Any] | None = None,
    inputs_meta: list[dict[str, Any]] | None = None,
) -> FusionResult:
    """Fuse ``adapters`` with a registered method.

    Args:
        adapters: adapters to fuse (at least one).
        method: registry name (see ``icmf fuse --help`` or :func:`engine.fusion.list_methods`).
        weights: one per adapter; default uniform ``1/K``.
        params: the method's parameters (validated; every fault listed).
        seed: seed of the method's random draws.
        tasks: task of each adapter.
        context: extra inputs of data-driven methods.
        inputs_meta: per-adapter provenance (catalog id, task, sha256).

    Raises:
        FusionConfigError: unknown method, bad parameters or weights, non-finite output.
    """
    if not adapters:
        raise FusionConfigError("nothing to fuse: give at least one adapter")
    spec = get_method(method)
    parsed = spec.parse_params(params)
    weights = _check_weights(weights, len(adapters))
    inputs = FusionInputs(adapters, weights, list(tasks or []), seed, dict(context or {}))
    fused = spec.fuse(inputs, parsed)
    # Methods may report what they found (e.g. searched weights); it goes to provenance, not PEFT's config.
    details = fused.config.pop("icmf_details", None)
    final_weights = (details or {}).get("weights", weights)
    bad = [
        n for n, m in fused.modules.items() if not (torch.isfinite(m.A).all() and torch.isfinite(m.B).all())
    ]
    if bad:
        raise FusionConfigError(
            f"method {method!r} produced non-finite values in {', '.join(bad)}; nothing written"
        )
    meta = inputs_meta or [{"source": a.source} for a in adapters]
    provenance = {
        "method": method,
        "params": parsed.model_dump(),
        "reference": spec.reference,
        "inputs": [dict(m, weight=w) for m, w in zip(meta, final_weights, strict=True)],
        "details": details,
        "seed": seed,
        "icm_fusion_version": __version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "created": datetime.now(timezone.utc).isoformat(),
    }
    return FusionResult(fused, provenance)


def select_adapters(
    catalog: Catalog, adapter_ids: list[str] | None = None, tasks: list[str] | None = None
) -> list[str]:
    """Adapter ids to fuse: the given ids, or for each task its first-ingested adapter."""
    return [e["id"] for e in _select_entries(catalog, adapter_ids, tasks)]


def _select_entries(
    catalog: Catalog, adapter_ids: list[str] | None = None, tasks: list[str] | None = None
) -> list[dict[str, Any]]:
    """The manifest rows of :func:`select_adapters`' choice (a task's row is looked up once, not
    again by its id: each lookup lists the manifest versions, a LIST on object stores)."""
    if bool(adapter_ids) == bool(tasks):
        raise FusionConfigError("give either adapter ids or task names (exactly one of the two)")
    if adapter_ids:
        return [catalog.get(i) for i in adapter_ids]
    rows = []
    for task in tasks:
        entries = catalog.entries(task=task)
        if not entries:
            known = ", ".join(sorted(catalog.tasks())) or "none"
            raise FusionConfigError(f"task {task!r} has no adapters in {catalog.uri} (tasks: {known})")
        rows.append(entries[0])
    return rows


def fuse_from_catalog(
    catalog: Catalog,
    method: str,
    adapter_ids: list[str] | None = None,
    tasks: list[str] | None = None,
    weights: list[float] | None = None,
    params: dict[str, Any] | None = None,
    seed: int = 0,
    context: dict[str, Any] | None = None,
) -> FusionResult:
    """Fuse catalog adapters named by id, or one adapter per task (its first-ingested one)."""
    entries = _select_entries(catalog, adapter_ids, tasks)
    ids = [e["id"] for e in entries]
    # One base model; its adapters may be stored in different versions of its layout (other
    # target modules and ranks): every method fuses the union of their modules.
    if len({e["base_model"] for e in entries}) > 1:
        raise FusionConfigError("the adapters belong to different base models; fuse one base model at a time")
    adapters = [catalog.load_adapter(i) for i in ids]
    meta = [
        {"id": e["id"], "task": e["task"], "sha256": e["sha256"], "catalog": catalog.uri} for e in entries
    ]
    result = fuse_adapters(
        adapters, method, weights, params, seed, [e["task"] for e in entries], context, inputs_meta=meta
    )
    result.adapter.config["base_model_name_or_path"] = entries[0]["base_model"]
    return result
