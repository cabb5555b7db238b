"""Fusing adapters: from adapters in memory, or from catalog ids or task names, to a PEFT adapter
directory with provenance; and :func:`fusion_context`, the one place the inputs of data-driven
methods (F-VAE, stored task vectors, few-shot objective) are assembled."""

from __future__ import annotations

import json
import platform
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from engine import __version__
from engine.adapters.io import PROVENANCE_FILE, save_adapter
from engine.adapters.lora import LoraAdapter
from engine.catalog.catalog import Catalog
from engine.catalog.fs import upload_dir
from engine.fusion.context import FusionContext
from engine.fusion.registry import FusionConfigError, FusionInputs, get_method

if TYPE_CHECKING:
    from engine.fusion.icm.inputs import IcmInputsCache
    from engine.fvae.artifact import FVAEArtifact
    from engine.tasks.fewshot import FewShotObjective


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
    context: FusionContext | None = None,
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
        context: extra inputs of data-driven methods (:func:`fusion_context` builds it).
        inputs_meta: per-adapter provenance (catalog id, task, sha256).

    Raises:
        FusionConfigError: unknown method, bad parameters or weights, a context field the
            method needs is unset, non-finite output.
    """
    if not adapters:
        raise FusionConfigError("nothing to fuse: give at least one adapter")
    spec = get_method(method)
    parsed = spec.parse_params(params)
    weights = _check_weights(weights, len(adapters))
    inputs = FusionInputs(adapters, weights, list(tasks or []), seed)
    # Methods report what they found (e.g. searched weights) in ``details``: provenance, not PEFT's config.
    fused, details = spec.call(inputs, parsed, context or FusionContext())
    final_weights = details.get("weights", weights)
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
        "details": details or None,
        "seed": seed,
        "icm_fusion_version": __version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "created": datetime.now(timezone.utc).isoformat(),
    }
    return FusionResult(fused, provenance)


def _select_entries(
    catalog: Catalog, adapter_ids: list[str] | None = None, tasks: list[str] | None = None
) -> list[dict[str, Any]]:
    """The manifest rows to fuse: the given ids, or for each task its first-ingested adapter (a
    task's row is looked up once, not again by its id: each lookup lists the manifest versions, a
    LIST on object stores)."""
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
    context: FusionContext | None = None,
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


def fusion_context(
    method: str,
    params: Mapping[str, Any] | None = None,
    *,
    catalog: Catalog | None = None,
    adapter_ids: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
    fvae: FVAEArtifact | str | Path | None = None,
    task_vectors: Mapping[str, torch.Tensor] | None = None,
    objective: FewShotObjective | Callable[[], FewShotObjective] | None = None,
    shots: int | None = None,
    support_selection: bool = True,
    icm_inputs_cache: IcmInputsCache | None = None,
) -> FusionContext:
    """The context ``method`` with ``params`` reads, built one way for the CLI, the server, the demo
    and the benchmarks (so ``icmf fuse`` and a served spec fuse the same adapter).

    What the call reads is the method's declaration (:meth:`FusionMethod.wanted`): the support
    loss for a method that needs one (``lorahub``, icm refinement) or has a hyperparameter left to
    pick on the support examples (``iso_c``, ``tsv``, ``knots``, ...; :mod:`engine.fusion.selection`),
    and each task's stored Gram matrices for ``regmean`` (computed on first use).

    Args:
        method: registry name; its declaration says which fields are read or needed.
        params: the method's parameters (they may require more, e.g. icm's ``refine_steps``).
        catalog: where the fused adapters live; the source of stored task vectors, task
            definitions and Gram matrices when those are not given.
        adapter_ids: the fused adapters' catalog ids, or
        tasks: the fused tasks (one adapter each).
        fvae: the trained F-VAE, or its directory/URI (loaded here).
        task_vectors: in-context vectors by task; default, when the method reads them and an
            F-VAE is given: the catalog's stored ones of the fused tasks (``icmf taskvec``).
        objective: the few-shot objective, or a function making it, called only when this call
            reads it; default then: built from the fused tasks' definitions in the catalog,
            ``shots`` examples each (their support split when None), on the F-VAE's layout when
            there is one. A method that only *may* use it (hyperparameter selection) gets it when
            every fused task has a definition, and takes its defaults otherwise.
        support_selection: False: hyperparameters left unset take their defaults instead of being
            picked on the support examples (no task model is loaded for them; a method that
            needs the support loss still gets it).
        icm_inputs_cache: a cache of icm's per-input encodings (servers).

    Raises:
        FusionConfigError: unknown method or invalid parameters.
    """
    spec = get_method(method)
    parsed = spec.parse_params(dict(params or {}))
    required = set(spec.required(parsed))
    wanted = set(spec.wanted(parsed)) if support_selection else required
    if isinstance(fvae, str | Path):
        from engine.fvae.artifact import FVAEArtifact

        fvae = FVAEArtifact.load(str(fvae))

    def fused_tasks() -> list[str]:
        if tasks:
            return list(tasks)
        return list(dict.fromkeys(catalog.get(i)["task"] for i in adapter_ids or ()))

    def defined() -> bool:  # every fused task has a definition (examples, model) in the catalog
        from engine.tasks.store import task_names

        return set(fused_tasks()) <= set(task_names(catalog))

    if task_vectors is None:
        task_vectors = {}
        if catalog is not None and fvae is not None and "task_vectors" in spec.accepts:
            task_vectors = _stored_task_vectors(catalog, fused_tasks())
    support = {"objective", "loss_fn"}
    if wanted & support and callable(objective):
        objective = objective()  # a factory: only a call that reads the objective pays for it
    elif not wanted & support:
        objective = None
    # A method that only may use the support loss gets it when the tasks are defined.
    if wanted & support and objective is None and catalog is not None and (required & support or defined()):
        objective = _catalog_objective(catalog, fused_tasks(), adapter_ids, fvae, shots)
    grams = None
    if "grams" in wanted and catalog is not None and defined():
        from engine.task_vectors.grams import task_grams

        grams = task_grams(catalog, fused_tasks(), _base_layout(catalog, fused_tasks(), adapter_ids))
    return FusionContext(
        fvae=fvae,
        task_vectors=task_vectors,
        objective=objective,
        icm_inputs_cache=icm_inputs_cache,
        grams=grams,
    )


def _stored_task_vectors(catalog: Catalog, tasks: list[str]) -> dict[str, torch.Tensor]:
    """In-context vectors stored in the catalog (``icmf taskvec``) for the tasks that have one: how
    icm conditions on a task its F-VAE never saw."""
    from engine.task_vectors import load_task_vectors, vector_tasks

    stored = set(vector_tasks(catalog))
    return {t: v.vector for t, v in load_task_vectors(catalog, [t for t in tasks if t in stored]).items()}


def _catalog_objective(
    catalog: Catalog, tasks: list[str], adapter_ids: Sequence[str] | None, fvae, shots: int | None
) -> FewShotObjective:
    """The few-shot objective over the fused tasks' support examples (task definitions in the
    catalog), on the F-VAE's layout, else on the fused adapters' base model's current layout."""
    from engine.tasks.fewshot import FewShotObjective

    layout = fvae.layout if fvae is not None else _base_layout(catalog, tasks, adapter_ids)
    return FewShotObjective.from_catalog(catalog, tasks, layout, k=shots)


def _base_layout(catalog: Catalog, tasks: list[str], adapter_ids: Sequence[str] | None):
    """The fused adapters' base model's current layout: it holds every input, whichever layout
    version stores it."""
    first = catalog.get(adapter_ids[0]) if adapter_ids else catalog.entries(task=tasks[0])[0]
    return catalog.layout_for_base_model(first["base_model"])
