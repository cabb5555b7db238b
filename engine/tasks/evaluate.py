"""Evaluate a fused adapter on its tasks (docs/design.md §4).

Per task t, on t's held-out eval split: the loss of the base model ``L_base``, of t's own adapter
``L_t`` and of the fused adapter ``L_f`` (plus accuracy or exact match, and perplexity for LMs),
and the gap closure ``G_t = (L_base - L_f) / (L_base - L_t)``; then mean G and worst-task G.

t's own adapter is, in order: the one named explicitly (``own``); the input of task t recorded
in the fused adapter's provenance sidecar ``icmf_provenance.json``; the first catalog adapter of
task t. Adapters are applied unmerged to one base per model spec, removed again after use.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.adapters import load_adapter, save_adapter
from engine.adapters.io import PROVENANCE_FILE
from engine.catalog import Catalog
from engine.tasks.apply import adapted, check_adapter_dir
from engine.tasks.base import task_model
from engine.tasks.errors import TaskError
from engine.tasks.examples import load_task_examples
from engine.tasks.metrics import GAP_EPS, gap_closure, summarize_gaps
from engine.tasks.shared_base import adapted_fingerprint, group_by_spec, shared_base_fault
from engine.tasks.spec import TaskDefinition
from engine.tasks.store import load_task


# ---------------------------------------------------------------------------------- provenance
@dataclass(frozen=True)
class ProvenanceInput:
    """One input adapter of a fusion: catalog id (or adapter directory), its task, its weight."""

    id: str
    task: str
    weight: float | None = None


@dataclass
class Provenance:
    """The fused adapter's sidecar ``icmf_provenance.json`` (only the fields evaluation reads)."""

    method: str | None
    inputs: list[ProvenanceInput]
    raw: dict[str, Any] = field(default_factory=dict)


def read_provenance(adapter_dir: str | Path) -> Provenance | None:
    """The provenance sidecar of a fused adapter directory, or None if it has none.

    Expected shape: ``{"method": str, "inputs": [{"id": str, "task": str, "weight": float}, ...]}``
    (other keys are kept in ``raw``).

    Raises:
        TaskError: naming the file if it exists but does not have that shape.
    """
    path = Path(adapter_dir) / PROVENANCE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TaskError(f"{path}: invalid JSON ({exc})") from None
    inputs = data.get("inputs") if isinstance(data, dict) else None
    if not isinstance(inputs, list):
        raise TaskError(f"{path}: needs an 'inputs' list of {{'id', 'task', 'weight'}} objects")
    parsed, faults = [], []
    for i, item in enumerate(inputs):
        if not (
            isinstance(item, dict) and isinstance(item.get("id"), str) and isinstance(item.get("task"), str)
        ):
            faults.append(f"inputs[{i}] needs string 'id' and 'task'")
            continue
        weight = item.get("weight")
        parsed.append(
            ProvenanceInput(item["id"], item["task"], float(weight) if weight is not None else None)
        )
    if faults:
        raise TaskError(f"{path}: " + "; ".join(faults))
    method = data.get("method")
    return Provenance(method=str(method) if method is not None else None, inputs=parsed, raw=data)


# ---------------------------------------------------------------------------------- own adapters
@dataclass(frozen=True)
class OwnAdapter:
    """The adapter a task's fused result is compared with.

    Attributes:
        id: catalog id (or, from provenance, an adapter directory).
        source: ``explicit``, ``provenance`` or ``catalog-first``.
        path: set when ``id`` is an adapter directory rather than a catalog id.
    """

    id: str
    source: str
    path: str | None = None


def parse_own(values: Sequence[str] | Mapping[str, str], catalog: Catalog) -> dict[str, str]:
    """Explicit own adapters: ``{task: id}``, or ``["TASK=ID" | "ID", ...]`` (task from the catalog)."""
    if isinstance(values, Mapping):
        return dict(values)
    chosen: dict[str, str] = {}
    for value in values:
        task, sep, adapter_id = value.partition("=")
        if not sep:
            adapter_id, task = value, catalog.get(value)["task"]
        if task in chosen:
            raise TaskError(
                f"--own names two adapters for task {task!r} ({chosen[task]}, {adapter_id}); keep one"
            )
        chosen[task] = adapter_id
    return chosen


def resolve_own(
    catalog: Catalog,
    tasks: Sequence[str],
    provenance: Provenance | None = None,
    own: Sequence[str] | Mapping[str, str] | None = None,
) -> dict[str, OwnAdapter]:
    """Each task's own adapter: explicit ``own``, else provenance, else the task's first catalog adapter.

    Raises:
        TaskError: if an explicit adapter is for a task not evaluated, or a task has no adapter.
        CatalogError: if a named id is not in the catalog.
    """
    explicit = parse_own(own or [], catalog)
    stray = sorted(set(explicit) - set(tasks))
    if stray:
        raise TaskError(
            f"--own names adapters for task(s) {stray} not among the evaluated tasks {list(tasks)}"
        )
    chosen = {}
    for task in tasks:
        if task in explicit:
            catalog.get(explicit[task])  # must exist
            chosen[task] = OwnAdapter(explicit[task], "explicit")
        elif provenance and (item := next((i for i in provenance.inputs if i.task == task), None)):
            chosen[task] = _from_provenance(catalog, item)
        else:
            entries = catalog.entries(task=task)
            if not entries:
                raise TaskError(
                    f"task {task!r} has no adapter in catalog {catalog.uri} and none is named; "
                    "ingest one or pass --own TASK=ID"
                )
            chosen[task] = OwnAdapter(entries[0]["id"], "catalog-first")
    return chosen


def _from_provenance(catalog: Catalog, item: ProvenanceInput) -> OwnAdapter:
    if item.id in set(catalog.manifest()["id"].to_pylist()):
        return OwnAdapter(item.id, "provenance")
    if Path(item.id).is_dir():
        return OwnAdapter(item.id, "provenance", path=item.id)
    raise TaskError(
        f"provenance input {item.id!r} (task {item.task!r}) is neither in catalog {catalog.uri} "
        "nor an adapter directory; pass --own TASK=ID"
    )


# ---------------------------------------------------------------------------------- results
@dataclass
class TaskEval:
    """One task's numbers.

    Attributes:
        task: task name.
        kind: model kind of the task.
        examples: held-out examples evaluated.
        own: the task's own adapter.
        base, own_metrics, fused: metrics of the base model, the own adapter, the fused adapter
            (``loss`` always; ``accuracy`` or ``exact_match`` and ``perplexity``).
        gap: gap closure G_t, or None (see ``note``).
        note: why ``gap`` is None.
    """

    task: str
    kind: str
    examples: int
    own: OwnAdapter
    base: dict[str, float]
    own_metrics: dict[str, float]
    fused: dict[str, float]
    gap: float | None
    note: str | None = None


@dataclass
class FusionEval:
    """Evaluation of one fused adapter on its tasks (:func:`evaluate_fusion`)."""

    adapter: str
    method: str | None
    tasks: list[TaskEval]
    mean_gap: float | None
    worst_gap: float | None
    worst_task: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def task_result(
    task: str, kind: str, own: OwnAdapter, base: dict, own_metrics: dict, fused: dict
) -> TaskEval:
    """Assemble a :class:`TaskEval` and its gap closure from the three metric dicts."""
    gap = gap_closure(base["loss"], own_metrics["loss"], fused["loss"])
    note = None
    if gap is None:
        diff = base["loss"] - own_metrics["loss"]
        note = (
            f"L_base - L_own = {diff:.3g} <= {GAP_EPS:g}: the own adapter does not improve on the "
            "base model, so gap closure is undefined"
        )
    return TaskEval(task, kind, int(base["examples"]), own, base, own_metrics, fused, gap, note)


def summarize(adapter: str, method: str | None, results: list[TaskEval]) -> FusionEval:
    mean, worst, worst_task = summarize_gaps({r.task: r.gap for r in results})
    return FusionEval(adapter, method, results, mean, worst, worst_task)


# ---------------------------------------------------------------------------------- evaluation
def evaluate_fusion(
    catalog: Catalog | str,
    tasks: Sequence[str],
    adapter: str | Path,
    own: Sequence[str] | Mapping[str, str] | None = None,
    batch_size: int = 32,
    max_eval: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> FusionEval:
    """Evaluate the fused adapter directory ``adapter`` on ``tasks`` of ``catalog``.

    Args:
        catalog: the catalog holding the task definitions and the tasks' own adapters.
        tasks: task names (each with a definition, see :mod:`engine.tasks.store`).
        adapter: the fused PEFT adapter directory (optionally with ``icmf_provenance.json``).
        own: explicit own adapters (``{task: id}`` or ``["TASK=ID" | "ID", ...]``).
        batch_size: examples per forward pass.
        max_eval: evaluate at most this many held-out examples per task (the first of the split).
        progress: called with 1 after each of the 3 x len(tasks) evaluations.

    Returns:
        Per task L_base, L_own, L_fused, accuracy / exact match, perplexity (LMs) and G; mean G
        and worst-task G over the tasks where G is defined.
    """
    catalog = catalog if isinstance(catalog, Catalog) else Catalog(catalog)
    adapter = check_adapter_dir(adapter)
    if not tasks or len(set(tasks)) != len(tasks):
        raise TaskError(f"tasks must be distinct task names, got {list(tasks)}")
    definitions = {t: load_task(catalog, t) for t in tasks}
    provenance = read_provenance(adapter)
    owns = resolve_own(catalog, tasks, provenance, own)
    examples = {t: _eval_examples(definitions[t], catalog, max_eval) for t in tasks}
    step = progress or (lambda _n: None)
    metrics: dict[str, dict[str, dict]] = {t: {} for t in tasks}
    groups = list(_group_by_model(definitions).values())
    models = [task_model(definitions[group[0]].model) for group in groups]
    bases = [model.build_base() for model in models]
    if len(groups) > 1:  # one fused adapter for every task: the modules it adapts must agree
        names = sorted(load_adapter(adapter).modules)
        fault = shared_base_fault(groups, [adapted_fingerprint(base, names) for base in bases])
        if fault is not None:
            raise TaskError(fault)
    for group, model, base in zip(groups, models, bases, strict=True):
        for t in group:
            metrics[t]["base"] = model.metrics(base, examples[t], batch_size)
            step(1)
        for t in group:
            with (
                _fused_with_task_head(adapter, catalog, owns[t]) as fused_dir,
                adapted(base, fused_dir) as fused,
            ):
                metrics[t]["fused"] = model.metrics(fused, examples[t], batch_size)
            step(1)
        for t in group:
            with _own_applied(base, catalog, owns[t]) as own_model:
                metrics[t]["own"] = model.metrics(own_model, examples[t], batch_size)
            step(1)
    results = [
        task_result(t, definitions[t].model.kind, owns[t], m["base"], m["own"], m["fused"])
        for t, m in metrics.items()
    ]
    return summarize(str(adapter), provenance.method if provenance else None, results)


def _eval_examples(definition: TaskDefinition, catalog: Catalog, max_eval: int | None) -> list[dict]:
    held_out = load_task_examples(definition, catalog).eval
    if max_eval is not None:
        held_out = held_out.select(range(min(max_eval, held_out.num_rows)))
    return held_out.to_list()


def _group_by_model(definitions: Mapping[str, TaskDefinition]) -> dict[str, list[str]]:
    """Tasks sharing one model spec share one base model; each other spec (e.g. another head)
    gets its own."""
    return group_by_spec({task: definition.model for task, definition in definitions.items()})


@contextmanager
def _fused_with_task_head(adapter: Path, catalog: Catalog, own: OwnAdapter):
    """The fused adapter as task t sees it: a fused LoRA carries no task head (heads are per task),
    so a task whose own adapter has ``modules_to_save`` (e.g. a classifier) is scored with the fused
    LoRA plus its own head, like a multi-head multi-task model."""
    fused = load_adapter(adapter)
    if fused.extras:
        yield adapter
        return
    own_adapter = load_adapter(own.path) if own.path is not None else catalog.load_adapter(own.id)
    if not own_adapter.extras:
        yield adapter
        return
    fused.extras = dict(own_adapter.extras)
    fused.config["modules_to_save"] = own_adapter.config.get("modules_to_save")
    with tempfile.TemporaryDirectory() as directory:
        yield save_adapter(fused, Path(directory) / "fused")


def _own_applied(base, catalog: Catalog, own: OwnAdapter):
    if own.path is not None:
        return adapted(base, own.path)
    return adapted(base, catalog=catalog, adapter_id=own.id)
