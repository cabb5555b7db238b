"""Everything about a meta-training run that can be checked on the driver, checked before any Ray
Train worker starts (and before Ray itself, from the CLI), every fault listed at once.

:func:`plan_training` checks the catalog and its layout, the training tasks and their adapters,
the task definitions and examples the data fusion loss reads (readable, fields present, enough
rows for the split), that the tasks' model specs agree on the adapted modules
(:mod:`engine.tasks.shared_base`), the stored task vectors, and an estimate of a worker's memory
(:func:`estimate_memory`) against what a worker has.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import torch

from engine.adapters.layout import Layout
from engine.errors import IcmfError
from engine.meta.config import MetaConfigError, MetaTrainConfig

GIB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    """A training worker's main memory use, in bytes.

    Attributes:
        pool: the worker's pooled adapters (weights and module masks).
        model: the F-VAE's parameters, gradients and the two AdamW moments.
        activations: every layer's output for one episode (its adapters plus the fused and anchored
            decodes), kept for the backward pass, and as much again for their gradients.
        parameters: the F-VAE's parameter count (not bytes; ``model`` is 16 bytes of each).
    """

    pool: int
    model: int
    activations: int
    parameters: int = 0

    @property
    def total(self) -> int:
        return self.pool + self.model + self.activations

    def describe(self) -> str:
        parts = (
            ("adapter pool", self.pool),
            ("F-VAE + optimiser", self.model),
            ("activations", self.activations),
        )
        return f"{self.total / GIB:.2f} GiB (" + ", ".join(f"{n} {b / GIB:.2f}" for n, b in parts) + ")"


def estimate_memory(
    cfg: MetaTrainConfig, layout: Layout, cond_dim: int, pooled_adapters: int
) -> MemoryEstimate:
    """Estimate a worker's memory from the F-VAE built on the meta device (no memory is used):
    its exact parameter count and the sizes of its layers' outputs for one episode."""
    from engine.fvae.model import FVAE
    from engine.meta.train import fvae_config

    batch = cfg.train.max_tasks + 2
    outputs = [0]

    def count(_module, _inputs, output) -> None:
        tensors = output if isinstance(output, (tuple, list)) else [output]
        outputs[0] += sum(t.numel() for t in tensors if isinstance(t, torch.Tensor))

    with torch.device("meta"):
        model = FVAE(fvae_config(cfg, layout, cond_dim))
        leaves = [m for m in model.modules() if not list(m.children())]
        hooks = [m.register_forward_hook(count) for m in leaves]
        try:
            model(torch.zeros(batch, layout.size), torch.zeros(batch, cond_dim))
        finally:
            for hook in hooks:
                hook.remove()
    params = sum(p.numel() for p in model.parameters())
    adapter_bytes = 4 * layout.size + len(layout.modules)
    return MemoryEstimate(
        pool=pooled_adapters * adapter_bytes,
        model=16 * params,
        activations=2 * 4 * outputs[0],
        parameters=params,
    )


def worker_memory_bytes(workers: int) -> int | None:
    """Memory one training worker can count on: with Ray connected, its ``memory`` resource (per
    node, shared by the workers); before an embedded Ray starts, this machine's available memory
    shared by the workers; None when only a remote cluster (``RAY_ADDRESS``) could tell."""
    import sys

    ray = sys.modules.get("ray")  # not imported: not connected (importing it costs seconds)
    if ray is not None and ray.is_initialized():
        nodes = [n["Resources"].get("memory", 0.0) for n in ray.nodes() if n.get("Alive")]
        if not nodes:
            return None
        return int(min(max(nodes), sum(nodes) / workers))
    if os.environ.get("RAY_ADDRESS"):
        return None
    import psutil

    return int(psutil.virtual_memory().available / workers)


@dataclass
class TrainingPlan:
    """What :func:`plan_training` checked and found, reused by :func:`engine.meta.train.train_fvae`.

    Attributes:
        catalog: the opened catalog.
        layout: the layout trained on.
        tasks: the training tasks.
        fusion_loss: ``data`` or ``proxy``.
        workers: training workers.
        shares: the manifest rows each worker streams (:func:`engine.meta.train.worker_shares`).
        memory: the estimate of one worker's memory.
        memory_checked: whether the estimate was compared with a worker's memory (not when only
            the remote cluster could tell; :func:`check_memory` then does once Ray is connected).
    """

    catalog: Any
    layout: Layout
    tasks: list[str]
    fusion_loss: str
    workers: int
    shares: list[pa.Table]
    memory: MemoryEstimate
    memory_checked: bool = False


def memory_fault(estimate: MemoryEstimate, available: int) -> str | None:
    if estimate.total <= available:
        return None
    return (
        f"memory: a training worker needs about {estimate.describe()} but has about "
        f"{available / GIB:.2f} GiB; lower train.capacity_per_task or train.max_tasks, use a smaller "
        "F-VAE (fvae.arch: tokens for very large adapters), fewer workers per node, or more memory"
    )


def check_memory(plan: TrainingPlan) -> None:
    """Compare the plan's memory estimate with a worker's memory once Ray is connected.

    Raises:
        MetaConfigError: the estimate exceeds it.
    """
    if plan.memory_checked:
        return
    available = worker_memory_bytes(plan.workers)
    fault = memory_fault(plan.memory, available) if available is not None else None
    if fault:
        raise MetaConfigError(f"cannot train: 1 fault:\n  - {fault}")
    plan.memory_checked = available is not None


def plan_training(
    cfg: MetaTrainConfig, workers: int | None = None, worker_memory: int | None = None
) -> TrainingPlan:
    """Check a training run on the driver, without Ray Train (and without Ray unless it is
    connected already); see the module docstring.

    Args:
        cfg: the validated config.
        workers: overrides ``train.workers``.
        worker_memory: bytes a worker has (default :func:`worker_memory_bytes`).

    Raises:
        MetaConfigError: every fault found, one per line.
    """
    from engine.catalog import Catalog
    from engine.meta.train import worker_shares

    num_workers = workers or cfg.train.workers
    if num_workers < 1:
        raise MetaConfigError(f"workers must be >= 1, got {num_workers}")
    try:
        catalog = Catalog(cfg.catalog)
        if catalog.version() == 0:
            raise MetaConfigError(f"catalog: {cfg.catalog} holds no adapters (is the path right?)")
        layout = catalog.layout(cfg.layout_id)
    except IcmfError as exc:
        raise MetaConfigError(f"cannot train: 1 fault:\n  - {exc}") from None
    faults: list[str] = []
    available = sorted(catalog.tasks())
    unknown = sorted(set(cfg.tasks or []) - set(available))
    if unknown:
        faults.append(f"tasks: {unknown} have no adapters in {cfg.catalog} (tasks: {available})")
    tasks = cfg.task_filter(available)
    manifest = catalog.manifest()
    in_layout = set(manifest.filter(pc.equal(manifest["layout_id"], layout.layout_id))["task"].to_pylist())
    other_layout = [t for t in tasks if t not in in_layout]
    if other_layout and cfg.tasks is not None:  # named on purpose; else tasks of other base models
        faults.append(
            f"tasks {other_layout} have no adapters in layout {layout.layout_id}; name their layout "
            "with layout_id or leave them out (exclude_tasks)"
        )
    tasks = [t for t in tasks if t in in_layout]
    if not tasks:
        faults.append(f"no training tasks: catalog {cfg.catalog} has {available}, the config keeps none")
    fusion_loss = "proxy"
    if tasks:
        fusion_loss, task_faults = _check_tasks(cfg, catalog, layout, tasks)
        faults += task_faults
    unknown_ids = sorted(set(cfg.exclude_adapters) - set(manifest["id"].to_pylist()))
    if unknown_ids:
        faults.append(f"exclude_adapters: {unknown_ids} are not adapters of {cfg.catalog}")
    shares = (
        worker_shares(
            catalog, layout.layout_id, tasks, num_workers, cfg.train.data_split, cfg.exclude_adapters
        )
        if tasks
        else []
    )
    emptied = sorted(set(tasks) - {t for share in shares for t in share["task"].to_pylist()})
    if emptied:
        faults.append(f"exclude_adapters leaves tasks {emptied} without any training adapter")
    pooled = max((_pooled(share, cfg.train.capacity_per_task) for share in shares), default=0)
    memory = estimate_memory(cfg, layout, cfg.task_vectors.dim, pooled)
    available_memory = worker_memory if worker_memory is not None else worker_memory_bytes(num_workers)
    if available_memory is not None:
        fault = memory_fault(memory, available_memory)
        if fault:
            faults.append(fault)
    if faults:
        lines = "\n".join(f"  - {f}" for f in faults)
        raise MetaConfigError(f"cannot train: {len(faults)} fault(s):\n{lines}")
    return TrainingPlan(
        catalog, layout, tasks, fusion_loss, num_workers, shares, memory, available_memory is not None
    )


def _pooled(share: pa.Table, capacity: int) -> int:
    counts: dict[str, int] = {}
    for task in share["task"].to_pylist():
        counts[task] = counts.get(task, 0) + 1
    return sum(min(capacity, n) for n in counts.values())


def _check_tasks(cfg: MetaTrainConfig, catalog, layout: Layout, tasks: list[str]) -> tuple[str, list[str]]:
    """The fusion loss, and the faults of the tasks' definitions, examples, models and vectors."""
    from engine.meta.train import context_vectors, resolve_fusion_loss
    from engine.tasks.examples import load_task_examples
    from engine.tasks.shared_base import check_shared_base
    from engine.tasks.store import load_task

    faults = []
    try:
        fusion_loss = resolve_fusion_loss(cfg, catalog, tasks)
    except MetaConfigError as exc:
        faults.append(str(exc))
        fusion_loss = "data"
    if fusion_loss == "data":
        split = cfg.train.fusion_examples
        needed = 2 if cfg.train.inner_steps else 1
        specs = {}
        for task in tasks:
            try:
                definition = load_task(catalog, task)
                specs[task] = definition.model
                rows = getattr(load_task_examples(definition, catalog), split).num_rows
            except IcmfError as exc:
                faults.append(f"task {task!r}: {exc}")
                continue
            if cfg.train.support_k is not None:
                rows = min(rows, cfg.train.support_k)
            if rows < needed:
                faults.append(
                    f"task {task!r}: its {split} split has {rows} example(s); the data fusion loss "
                    f"needs >= {needed}{' (inner_steps splits them in two)' if needed == 2 else ''}: "
                    "add examples, change the task's split, or set train.fusion_examples"
                )
        try:
            check_shared_base(specs, [m.name for m in layout.modules])
        except IcmfError as exc:
            faults.append(str(exc))
    try:
        context_vectors(cfg, catalog, tasks)
    except IcmfError as exc:
        faults.append(str(exc))
    return fusion_loss, faults
