"""Compute task vectors: plan on the driver, run in-process or on a Ray Data actor pool.

Per task the driver picks k examples (the task's support split, or an explicit examples file)
and the adapter(s) to apply, making one *unit* per (task, adapter). A unit's result is the mean
hidden state ``[d]`` of its k examples; a task's vector is the mean over its units (for equal k
this is the mean over all (adapter, example) pairs). The Ray path runs the same
:func:`unit_vector` inside actors that each build every base model once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

from engine.catalog import Catalog
from engine.errors import CatalogError, IcmfError
from engine.task_vectors.vector import (
    TaskVector,
    check_dims,
    example_id,
    mean_vector,
    select_examples,
    spec_hash,
)
from engine.tasks.errors import TaskError, raise_task_faults
from engine.tasks.spec import ROLES, ModelSpec, load_model_spec

AdapterChoice = str | Sequence[str]  # "first", "all", or catalog ids


@dataclass
class TaskPlan:
    """What one task's vector is computed from.

    Attributes:
        task: task name.
        spec: the model spec.
        examples: the k chosen examples (dicts keyed by the kind's roles).
        source: ``task:<name>`` (support split of the stored definition) or the examples file.
        adapters: catalog ids to apply, one unit each; empty = the base alone.
    """

    task: str
    spec: ModelSpec
    examples: list[dict[str, Any]]
    source: str
    adapters: list[str] = field(default_factory=list)

    def units(self) -> list[dict[str, Any]]:
        """One row per (task, adapter) (a single row with ``adapter=""`` for the base alone);
        JSON strings keep rows of different model kinds in one Arrow table."""
        spec_json = json.dumps(self.spec.model_dump(mode="json"), sort_keys=True)
        examples_json = json.dumps(self.examples)
        return [
            {"task": self.task, "adapter": adapter, "spec": spec_json, "examples": examples_json}
            for adapter in (self.adapters or [""])
        ]


# ---------------------------------------------------------------------------------- planning
def _examples_for(
    catalog: Catalog, task: str, source: str | None, model: ModelSpec | None
) -> tuple[ModelSpec, list[dict[str, Any]], str]:
    """(spec, all candidate examples, source label) of a task."""
    from engine.tasks.examples import load_examples, load_task_examples
    from engine.tasks.store import load_task, task_names

    definition = load_task(catalog, task) if task in task_names(catalog) else None
    if definition is not None and model is not None and spec_hash(model) != spec_hash(definition.model):
        raise TaskError(
            f"task {task!r} is defined in catalog {catalog.uri} with another model spec than the one "
            "given; drop --model (the definition's spec is used) or compute under a new task name"
        )
    spec = definition.model if definition is not None else model
    if spec is None:
        hint = "give --examples FILE and --model SPEC" if source is None else "give --model SPEC"
        raise TaskError(
            f"task {task!r} has no definition in catalog {catalog.uri}; add one with `icmf task add` or {hint}"
        )
    if source is None:
        if definition is None:
            raise TaskError(
                f"task {task!r} has no definition in catalog {catalog.uri} and no examples file; "
                "add it with `icmf task add` or give --examples FILE"
            )
        support = load_task_examples(definition, catalog).support
        return spec, support.to_list(), f"task:{task}"
    columns = {role: role for role in ROLES[spec.kind]}
    if definition is not None:  # the definition's column names apply to its own kind of file
        columns.update(definition.columns)
    rows = load_examples(source, columns, num_labels=spec.num_labels).to_list()
    return spec, rows, source


def _adapters_for(catalog: Catalog, task: str, choice: AdapterChoice) -> list[str]:
    if isinstance(choice, str) and choice in ("first", "all"):
        ids = [row["id"] for row in catalog.entries(task=task)]
        if not ids:
            raise TaskError(
                f"task {task!r} has no adapter in catalog {catalog.uri}; ingest one, name one with "
                "--adapter ID, or compute with the base alone (--no-adapter)"
            )
        return ids[:1] if choice == "first" else ids
    ids = [choice] if isinstance(choice, str) else list(choice)
    for adapter in ids:
        row = catalog.get(adapter)  # CatalogError if absent
        if row["task"] != task:
            raise TaskError(
                f"adapter {adapter!r} is for task {row['task']!r}, not {task!r}; name one of "
                f"{task!r}'s adapters (`icmf catalog ls --task {task}`)"
            )
    if not ids:
        raise TaskError(f"no adapter named for task {task!r}")
    return ids


def plan_task_vectors(
    catalog: Catalog | str,
    tasks: Sequence[str],
    k: int = 16,
    with_adapter: bool = True,
    examples: str | Mapping[str, str] | None = None,
    seed: int = 0,
    adapters: AdapterChoice | Mapping[str, AdapterChoice] = "first",
    model: ModelSpec | Mapping[str, Any] | str | None = None,
) -> list[TaskPlan]:
    """Choose each task's examples and adapters (see :func:`compute_task_vectors`), on the driver
    before any Ray work starts.

    Raises:
        TaskError: listing the faults of every task at once (definitions, examples, adapters).
    """
    catalog = catalog if isinstance(catalog, Catalog) else Catalog(catalog)
    if not tasks:
        raise TaskError("no tasks given; name at least one task")
    if isinstance(examples, str) and len(tasks) > 1:
        raise TaskError(f"one examples file for {len(tasks)} tasks; map each task to its file")
    spec = load_model_spec(model) if model is not None else None
    plans, faults = [], []
    for task in tasks:
        source = examples if isinstance(examples, str) or examples is None else examples.get(task)
        try:
            task_spec, rows, label = _examples_for(catalog, task, source, spec)
            chosen = select_examples(rows, k, seed, what=f"task {task!r} ({label})")
            choice = adapters.get(task, "first") if isinstance(adapters, Mapping) else adapters
            ids = _adapters_for(catalog, task, choice) if with_adapter else []
        except IcmfError as exc:
            faults.append(exc)
            continue
        plans.append(TaskPlan(task, task_spec, chosen, label, ids))
    raise_task_faults(faults, "cannot be planned")
    return plans


# ---------------------------------------------------------------------------------- one unit
def unit_vector(
    task_model, base: torch.nn.Module, catalog: Catalog | str, unit: Mapping[str, Any], batch_size: int = 32
) -> torch.Tensor:
    """Mean hidden state ``[d]`` of a unit's examples through ``base`` with its adapter applied
    (unmerged; ``base`` is left plain again)."""
    from engine.tasks.apply import adapted

    examples = json.loads(unit["examples"])
    adapter = unit["adapter"] or None
    with adapted(base, catalog=catalog if adapter else None, adapter_id=adapter) as model:
        return mean_vector(task_model.hidden_states(model, examples, batch_size))


class _Bases:
    """Base models built once per spec and reused for every adapter (one per process/actor)."""

    def __init__(self):
        self._models: dict[str, tuple[Any, torch.nn.Module]] = {}

    def get(self, spec_json: str, device: str = "cpu"):
        if spec_json not in self._models:
            from engine.tasks.base import task_model

            tm = task_model(json.loads(spec_json))
            self._models[spec_json] = (tm, tm.build_base().to(device))
        return self._models[spec_json]


def _finish(
    plans: Sequence[TaskPlan], results: Mapping[tuple[str, str], torch.Tensor], seed: int
) -> dict[str, TaskVector]:
    created = datetime.now(timezone.utc).isoformat()
    vectors = {}
    for plan in plans:
        per_adapter = torch.stack([results[(plan.task, a)] for a in (plan.adapters or [""])])
        vectors[plan.task] = TaskVector(
            task=plan.task,
            vector=mean_vector(per_adapter),
            k=len(plan.examples),
            example_ids=[example_id(e) for e in plan.examples],
            model=spec_hash(plan.spec),
            with_adapter=bool(plan.adapters),
            adapters=list(plan.adapters),
            examples_source=plan.source,
            seed=seed,
            created=created,
        )
    check_dims(vectors)
    return vectors


def run_in_process(
    catalog: Catalog | str, plans: Sequence[TaskPlan], batch_size: int = 32
) -> dict[tuple[str, str], torch.Tensor]:
    """Unit means ``{(task, adapter): [d]}`` computed here, without Ray (the reference path)."""
    bases = _Bases()
    out = {}
    for plan in plans:
        for unit in plan.units():
            tm, base = bases.get(unit["spec"])
            out[(unit["task"], unit["adapter"])] = unit_vector(tm, base, catalog, unit, batch_size)
    return out


# ---------------------------------------------------------------------------------- Ray
class UnitWorker:
    """Ray Data callable class: builds each base model once per actor, applies each unit's adapter."""

    def __init__(self, catalog_uri: str, batch_size: int, device: str):
        self.catalog = Catalog(catalog_uri)
        self.batch_size = batch_size
        self.device = device
        self.bases = _Bases()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        vectors = []
        for i in range(len(batch["task"])):
            unit = {key: batch[key][i] for key in ("task", "adapter", "spec", "examples")}
            tm, base = self.bases.get(unit["spec"], self.device)
            vectors.append(unit_vector(tm, base, self.catalog, unit, self.batch_size).numpy())
        return {
            "task": batch["task"],
            "adapter": batch["adapter"],
            # one list per row: units of different models may differ in d
            "vector": np.array([v.tolist() for v in vectors], dtype=object),
        }


def run_on_ray(
    catalog: Catalog | str,
    plans: Sequence[TaskPlan],
    concurrency: int | None = None,
    num_cpus: float = 1,
    num_gpus: float = 0,
    batch_size: int = 32,
) -> dict[tuple[str, str], torch.Tensor]:
    """Unit means ``{(task, adapter): [d]}`` from a Ray Data pipeline over an actor pool.

    ``from_items`` (one row per unit) -> ``map_batches(UnitWorker, concurrency=N)``; each actor
    builds the base model(s) once and applies adapters unmerged. Actors open the catalog by URI,
    so it must be reachable from the workers (a path or object store, not ``memory://``).
    """
    import ray.data

    from engine._ray import cluster_cpus, ensure_ray

    ensure_ray()
    catalog_uri = catalog.uri if isinstance(catalog, Catalog) else str(catalog)
    units = [unit for plan in plans for unit in plan.units()]
    if concurrency is None:
        cpus = cluster_cpus()
        concurrency = max(1, min(len(units), int(cpus // max(num_cpus, 1e-3)) or 1))
    dataset = ray.data.from_items(units, override_num_blocks=len(units)).map_batches(
        UnitWorker,
        fn_constructor_kwargs={
            "catalog_uri": catalog_uri,
            "batch_size": batch_size,
            "device": "cuda" if num_gpus else "cpu",
        },
        batch_size=1,  # one unit per call: units spread over the pool
        concurrency=concurrency,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
    )
    out = {}
    for row in dataset.take_all():
        out[(row["task"], row["adapter"])] = torch.tensor(np.asarray(row["vector"], dtype=np.float32))
    return out


# ---------------------------------------------------------------------------------- API
def compute_task_vectors(
    catalog: Catalog | str,
    tasks: Sequence[str],
    k: int = 16,
    with_adapter: bool = True,
    examples: str | Mapping[str, str] | None = None,
    seed: int = 0,
    concurrency: int | None = None,
    *,
    adapters: AdapterChoice | Mapping[str, AdapterChoice] = "first",
    model: ModelSpec | Mapping[str, Any] | str | None = None,
    use_ray: bool = True,
    num_cpus: float = 1,
    num_gpus: float = 0,
    batch_size: int = 32,
) -> dict[str, TaskVector]:
    """In-context task vectors: per task, the mean last-layer hidden state ``[d]`` over k examples.

    Args:
        catalog: the catalog (or its URI) holding the tasks' definitions and adapters.
        tasks: task names.
        k: examples per task.
        with_adapter: apply the task's adapter(s) (ICM-LoRA's reference does); false = base alone.
        examples: an examples file (one task) or ``{task: file}`` (JSONL/CSV/Parquet with the
            model kind's fields); tasks without one use their stored definition's support split.
        seed: seed of the shuffle that picks the first k examples.
        concurrency: actors in the Ray pool (default: as many as CPUs allow, at most one per unit).
        adapters: ``"first"`` (the task's first catalog adapter, as fusion and evaluation pick),
            ``"all"`` (mean of the vectors over every adapter of the task), catalog id(s), or a
            ``{task: choice}`` mapping.
        model: model spec for tasks with no stored definition (with an examples file).
        use_ray: false computes in this process (same numbers; no cluster).
        num_cpus, num_gpus: resources per actor (``num_gpus > 0`` puts the models on CUDA).
        batch_size: examples per forward pass.

    Returns:
        ``{task: TaskVector}`` in the order of ``tasks``.

    Raises:
        TaskError: a task with neither definition nor examples file, fewer than k examples, an
            adapter of another task or one that does not fit the model, or vectors of one model
            that differ in dimension.
        CatalogError: an adapter id not in the catalog.
    """
    catalog = catalog if isinstance(catalog, Catalog) else Catalog(catalog)
    if len(set(tasks)) != len(tasks):
        raise TaskError(f"tasks named twice: {sorted({t for t in tasks if list(tasks).count(t) > 1})}")
    if use_ray and catalog.uri.startswith("memory://"):  # fail before any work is planned
        raise CatalogError("a memory:// catalog is not visible to Ray workers; use use_ray=False (--local)")
    plans = plan_task_vectors(catalog, tasks, k, with_adapter, examples, seed, adapters, model)
    if use_ray:
        results = run_on_ray(catalog, plans, concurrency, num_cpus, num_gpus, batch_size)
    else:
        results = run_in_process(catalog, plans, batch_size)
    return _finish(plans, results, seed)
