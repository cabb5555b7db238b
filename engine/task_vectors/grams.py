"""RegMean's Gram matrices per task: computed with Ray Data through the base model, stored in the
catalog next to the task definition, read back one module at a time.

A task's statistics are ``G_m = X_m^T X_m / n_m`` for every module ``m`` of the base model's
layout, over the real token positions of the task's *support* examples (the examples fusion may
use, never the eval split) run through the bare base model
(:func:`engine.tasks.grams.input_gram_sums`).

Storage: ``<catalog>/tasks/<task>.grams/<key>/``, one safetensors file per module (tensor
``gram``, float64) and ``grams.json`` (written last: a directory without it is incomplete) mapping
module names to files. ``key`` is content-addressed: the sha256 of the model spec, the ids of the
support examples and the module names, so a task whose examples or model change (or whose base
model's layout grows) gets new Gram matrices on its next use; older keys of the task are deleted
when a new one is written.

Computation: one Ray Data row per (task, example); ``map_batches`` over an actor pool, each actor
building each model once and returning the additive parts ``(X^T X, n)`` of its batch per module;
the driver sums them as they stream in. :func:`run_grams_in_process` is the same computation
without Ray (the reference path, and ``memory://`` catalogs, which Ray workers cannot see).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

from engine.adapters.layout import Layout
from engine.catalog import Catalog
from engine.catalog import fs as cfs
from engine.errors import IcmfError
from engine.task_vectors.vector import example_id, spec_hash
from engine.tasks.errors import TaskError, raise_task_faults
from engine.tasks.spec import ModelSpec

GRAMS_FORMAT = "icmf-grams/1"
INDEX_FILE = "grams.json"
TENSOR = "gram"

Sums = tuple[dict[str, torch.Tensor], dict[str, int]]  # module -> X^T X, module -> positions


@dataclass
class GramPlan:
    """One task's Gram computation: its model spec, support examples and content key."""

    task: str
    spec: ModelSpec
    examples: list[dict[str, Any]]
    key: str


def gram_key(spec: ModelSpec, examples: Sequence[Mapping[str, Any]], layout: Layout) -> str:
    """The content address of a task's Gram matrices (16 hex digits)."""
    record = {
        "format": GRAMS_FORMAT,
        "model": spec_hash(spec),
        "examples": [example_id(e) for e in examples],
        "modules": sorted(m.name for m in layout.modules),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def grams_dir(catalog: Catalog, task: str) -> str:
    """The task's Gram folder, next to its definition (``task`` is checked by the definition's path)."""
    from engine.tasks.store import task_path

    return task_path(catalog, task).removesuffix(".json") + ".grams"


class StoredGrams(Mapping[str, torch.Tensor]):
    """One task's stored Gram matrices by module, each read from the catalog when asked for (a
    fusion streams module by module and never holds every task's matrices at once)."""

    def __init__(self, catalog: Catalog, task: str, key: str, files: Mapping[str, str]):
        self.catalog, self.task, self.key = catalog, task, key
        self._files = dict(files)

    def __getitem__(self, module: str) -> torch.Tensor:
        from safetensors.torch import load

        name = self._files[module]  # KeyError for a module the task has no matrix of
        path = cfs.join(grams_dir(self.catalog, self.task), self.key, name)
        return load(cfs.read_bytes(self.catalog.fs, path))[TENSOR]

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def __repr__(self) -> str:
        return f"StoredGrams(task={self.task!r}, key={self.key!r}, modules={len(self)})"


def stored_grams(catalog: Catalog, task: str, key: str) -> StoredGrams | None:
    """The task's Gram matrices stored under ``key``, or None (absent or incomplete)."""
    index = cfs.join(grams_dir(catalog, task), key, INDEX_FILE)
    if not cfs.exists(catalog.fs, index):
        return None
    try:
        record = json.loads(cfs.read_bytes(catalog.fs, index))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # damaged: recomputed and rewritten
    if record.get("format") != GRAMS_FORMAT or record.get("key") != key:
        return None
    return StoredGrams(catalog, task, key, record["files"])


def save_grams(catalog: Catalog, plan: GramPlan, sums: Sums) -> StoredGrams:
    """Write one task's Gram matrices (module files first, the index last), then delete the task's
    Gram matrices under other keys."""
    from safetensors.torch import save

    totals, counts = sums
    folder = cfs.join(grams_dir(catalog, plan.task), plan.key)
    files = {}
    for i, module in enumerate(Layout.sort_names(totals)):  # depth order, whatever order they came in
        files[module] = f"{i:05d}.safetensors"
        gram = (totals[module] / counts[module]).double().contiguous()
        data = save({TENSOR: gram}, metadata={"module": module, "positions": str(counts[module])})
        cfs.write_bytes_atomic(catalog.fs, cfs.join(folder, files[module]), data)
    record = {
        "format": GRAMS_FORMAT,
        "key": plan.key,
        "task": plan.task,
        "model": spec_hash(plan.spec),
        "examples": len(plan.examples),
        "positions": {m: int(n) for m, n in counts.items()},
        "files": files,
        "created": datetime.now(timezone.utc).isoformat(),
    }
    index = json.dumps(record, indent=2, sort_keys=True).encode() + b"\n"
    cfs.write_bytes_atomic(catalog.fs, cfs.join(folder, INDEX_FILE), index)
    _delete_other_keys(catalog, plan.task, plan.key)
    return StoredGrams(catalog, plan.task, plan.key, files)


def _delete_other_keys(catalog: Catalog, task: str, key: str) -> None:
    """Remove the task's Gram matrices stored under any key but ``key`` (stale statistics)."""
    import pyarrow.fs as pafs

    selector = pafs.FileSelector(grams_dir(catalog, task), allow_not_found=True)
    for info in catalog.fs.get_file_info(selector):
        if info.base_name == key:
            continue
        try:
            if info.type == pafs.FileType.Directory:
                catalog.fs.delete_dir(info.path)
            else:
                catalog.fs.delete_file(info.path)
        except OSError:
            pass  # another writer's cleanup got there first


# ---------------------------------------------------------------------------------- planning
def plan_grams(catalog: Catalog, tasks: Sequence[str], layout: Layout) -> list[GramPlan]:
    """Each task's model spec, support examples and key, on the driver before any Ray work.

    Raises:
        TaskError: listing every task without a definition or with an empty support split.
    """
    from engine.tasks.examples import load_task_examples
    from engine.tasks.store import load_task

    plans, faults = [], []
    for task in dict.fromkeys(tasks):
        try:
            definition = load_task(catalog, task)
            support = load_task_examples(definition, catalog).support.to_list()
        except IcmfError as exc:
            faults.append(exc)
            continue
        if not support:
            faults.append(TaskError(f"task {task!r}: its support split is empty; no Gram matrices"))
            continue
        plans.append(GramPlan(task, definition.model, support, gram_key(definition.model, support, layout)))
    raise_task_faults(faults, "cannot have their Gram matrices computed")
    return plans


# ---------------------------------------------------------------------------------- computing
class _Hosts:
    """One base model with LoRA slots per model spec (per process or actor), reused for every batch."""

    def __init__(self, layout: Layout, device: str = "cpu"):
        self.layout, self.device = layout, device
        self._hosts: dict[str, Any] = {}

    def get(self, spec_json: str):
        if spec_json not in self._hosts:
            from engine.tasks.base import task_model
            from engine.tasks.functional import LoraHost

            model = task_model(json.loads(spec_json))
            self._hosts[spec_json] = LoraHost(model, self.layout, base=model.build_base().to(self.device))
        return self._hosts[spec_json]


def _spec_json(spec: ModelSpec) -> str:
    return json.dumps(spec.model_dump(mode="json"), sort_keys=True)


def _add(into: Sums, part: Sums) -> None:
    for module, total in part[0].items():
        into[0][module] = into[0][module] + total if module in into[0] else total
        into[1][module] = into[1].get(module, 0) + part[1][module]


def _batch_sums(hosts: _Hosts, spec_json: str, examples: Sequence[Mapping[str, Any]]) -> Sums:
    from engine.tasks.grams import input_gram_sums

    host = hosts.get(spec_json)
    return input_gram_sums(host, host.task_model.encode(list(examples)))


def run_grams_in_process(plans: Sequence[GramPlan], layout: Layout, batch_size: int = 16) -> dict[str, Sums]:
    """Each task's ``(X^T X, n)`` per module, computed here without Ray (the reference path)."""
    from engine.tasks.base import batches

    hosts, out = _Hosts(layout), {}
    for plan in plans:
        out[plan.task] = ({}, {})
        for chunk in batches(plan.examples, batch_size):
            _add(out[plan.task], _batch_sums(hosts, _spec_json(plan.spec), chunk))
    return out


class GramWorker:
    """Ray Data callable class: each actor builds every model once; a batch of example rows (of
    any tasks) becomes one row per (task, module) holding ``X^T X`` (float64 bytes) and ``n``."""

    def __init__(self, catalog_uri: str, layout_id: str, device: str):
        self.hosts = _Hosts(Catalog(catalog_uri).layout(layout_id), device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for task, spec, example in zip(batch["task"], batch["spec"], batch["example"], strict=True):
            groups.setdefault((str(task), str(spec)), []).append(json.loads(example))
        tasks, modules, counts, grams = [], [], [], []
        for (task, spec), examples in groups.items():
            totals, positions = _batch_sums(self.hosts, spec, examples)
            for module, total in totals.items():
                tasks.append(task), modules.append(module), counts.append(positions[module])
                grams.append(total.cpu().numpy().tobytes())
        return {
            "task": np.array(tasks, dtype=object),
            "module": np.array(modules, dtype=object),
            "count": np.array(counts, dtype=np.int64),
            "gram": np.array(grams, dtype=object),
        }


def run_grams_on_ray(
    catalog: Catalog,
    plans: Sequence[GramPlan],
    layout: Layout,
    concurrency: int | None = None,
    batch_size: int = 16,
    num_cpus: float = 1,
    num_gpus: float = 0,
) -> dict[str, Sums]:
    """Each task's ``(X^T X, n)`` per module from a Ray Data pass over the tasks' examples.

    ``from_items`` (one row per example) -> ``map_batches(GramWorker)`` on an actor pool; the
    driver sums the per-batch parts as they stream in (``iter_rows``), so it holds one running sum
    per (task, module), never every batch's. Actors open the catalog by URI.
    """
    import ray
    import ray.data

    from engine._ray import cluster_cpus, ensure_ray

    ensure_ray()
    rows = [
        {"task": plan.task, "spec": _spec_json(plan.spec), "example": json.dumps(example)}
        for plan in plans
        for example in plan.examples
    ]
    if concurrency is None:
        cpus = cluster_cpus()
        batches = -(-len(rows) // batch_size)
        concurrency = max(1, min(batches, int(cpus // max(num_cpus, 1e-3)) or 1))
    dataset = ray.data.from_items(rows).map_batches(
        GramWorker,
        fn_constructor_kwargs={
            "catalog_uri": catalog.uri,
            "layout_id": layout.layout_id,
            "device": "cuda" if num_gpus else "cpu",
        },
        batch_size=batch_size,
        concurrency=concurrency,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
    )
    out: dict[str, Sums] = {plan.task: ({}, {}) for plan in plans}
    for row in dataset.iter_rows():
        module = str(row["module"])
        d_in = layout.modules[layout.index[module]].d_in
        total = torch.from_numpy(np.frombuffer(row["gram"], dtype=np.float64).copy()).view(d_in, d_in)
        _add(out[str(row["task"])], ({module: total}, {module: int(row["count"])}))
    return out


# ---------------------------------------------------------------------------------- API
def task_grams(
    catalog: Catalog,
    tasks: Sequence[str],
    layout: Layout,
    *,
    use_ray: bool | None = None,
    concurrency: int | None = None,
    batch_size: int = 16,
    num_gpus: float = 0,
) -> dict[str, StoredGrams]:
    """Each task's Gram matrices over ``layout``'s modules: the stored ones when their key matches
    the task's current model and support examples, else computed now (Ray Data; in process for a
    ``memory://`` catalog or ``use_ray=False``) and stored.

    Raises:
        TaskError: a task without a definition or support examples, or whose model does not have
            the layout's modules.
    """
    plans = plan_grams(catalog, tasks, layout)
    found = {plan.task: stored_grams(catalog, plan.task, plan.key) for plan in plans}
    missing = [plan for plan in plans if found[plan.task] is None]
    if missing:
        if use_ray is None:
            use_ray = not catalog.uri.startswith("memory://")
        if use_ray:
            sums = run_grams_on_ray(catalog, missing, layout, concurrency, batch_size, num_gpus=num_gpus)
        else:
            sums = run_grams_in_process(missing, layout, batch_size)
        for plan in missing:
            found[plan.task] = save_grams(catalog, plan, sums[plan.task])
    return found
