"""Task definitions in a catalog: ``<catalog root>/tasks/<name>.json``, written atomically."""

from __future__ import annotations

import json
from datetime import datetime, timezone

from engine.catalog import Catalog
from engine.catalog import fs as cfs
from engine.catalog.schema import check_name
from engine.errors import CatalogError
from engine.tasks.errors import SpecError
from engine.tasks.spec import TaskDefinition, validate_spec

TASKS_DIR = "tasks"


def _catalog(catalog: Catalog | str) -> Catalog:
    return catalog if isinstance(catalog, Catalog) else Catalog(catalog)


def task_path(catalog: Catalog, name: str) -> str:
    """Path of a task's definition file inside the catalog (``name`` is validated, never a path)."""
    return catalog.path(TASKS_DIR, f"{check_name('task name', name)}.json")


def save_task(catalog: Catalog | str, definition: TaskDefinition, overwrite: bool = False) -> str:
    """Store ``definition`` in the catalog; returns the file's path.

    Relative paths in it (examples, model and tokenizer directories) are relative to the current
    directory and stored absolute; ``catalog:PATH`` keeps a path under the catalog root.

    Raises:
        CatalogError: if the task exists and ``overwrite`` is false.
    """
    catalog = _catalog(catalog)
    path = task_path(catalog, definition.name)
    if not overwrite and cfs.exists(catalog.fs, path):
        raise CatalogError(
            f"task {definition.name!r} already exists in {catalog.uri}; pick another name or overwrite it"
        )
    definition = definition.absolute_locations()
    if definition.created is None:
        definition = definition.model_copy(update={"created": datetime.now(timezone.utc).isoformat()})
    data = json.dumps(definition.model_dump(mode="json"), indent=2, sort_keys=True).encode() + b"\n"
    cfs.write_bytes_atomic(catalog.fs, path, data, exclusive=not overwrite)
    return path


def load_task(catalog: Catalog | str, name: str) -> TaskDefinition:
    """A task definition from the catalog.

    Raises:
        CatalogError: if there is no such task.
        SpecError: if its file is not a valid definition (every fault listed).
    """
    catalog = _catalog(catalog)
    path = task_path(catalog, name)
    if not cfs.exists(catalog.fs, path):
        known = ", ".join(task_names(catalog)) or "none"
        raise CatalogError(
            f"no task {name!r} in catalog {catalog.uri} (tasks: {known}); add it with `icmf task add`"
        )
    try:
        data = json.loads(cfs.read_bytes(catalog.fs, path))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SpecError(path, [f"invalid JSON: {exc}"]) from None
    definition = validate_spec(TaskDefinition, data, path)
    if definition.name != name:
        raise SpecError(path, [f"name: is {definition.name!r} but the file is for task {name!r}"])
    return definition


def task_names(catalog: Catalog | str) -> list[str]:
    """Names of the catalog's tasks, sorted."""
    catalog = _catalog(catalog)
    names = cfs.list_names(catalog.fs, catalog.path(TASKS_DIR))
    return sorted(n.removesuffix(".json") for n in names if n.endswith(".json") and not n.startswith("."))


def list_tasks(catalog: Catalog | str) -> list[TaskDefinition]:
    """Every task definition of the catalog, by name."""
    catalog = _catalog(catalog)
    return [load_task(catalog, name) for name in task_names(catalog)]
