"""Task vectors in a catalog: ``<catalog root>/task_vectors/<task>.json``, one file per task,
written atomically (any catalog URI: local, ``s3://``, ``memory://``), like task definitions."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from engine.catalog import Catalog
from engine.catalog import fs as cfs
from engine.catalog.schema import check_name
from engine.errors import CatalogError
from engine.task_vectors.vector import TaskVector, check_dims
from engine.tasks.errors import TaskError

VECTORS_DIR = "task_vectors"


def _catalog(catalog: Catalog | str) -> Catalog:
    return catalog if isinstance(catalog, Catalog) else Catalog(catalog)


def vector_path(catalog: Catalog, task: str) -> str:
    """Path of a task's vector file inside the catalog (``task`` is validated, never a path)."""
    return catalog.path(VECTORS_DIR, f"{check_name('task name', task)}.json")


def save_task_vectors(catalog: Catalog | str, vectors: Mapping[str, TaskVector]) -> list[str]:
    """Store each vector (replacing a task's earlier one atomically); returns the files' paths.

    Raises:
        TaskError: if vectors of one model disagree in dimension.
    """
    catalog = _catalog(catalog)
    check_dims(vectors)
    paths = []
    for vec in vectors.values():
        path = vector_path(catalog, vec.task)
        data = json.dumps(vec.to_record(), sort_keys=True).encode() + b"\n"
        cfs.write_bytes_atomic(catalog.fs, path, data)
        paths.append(path)
    return paths


def vector_tasks(catalog: Catalog | str) -> list[str]:
    """Tasks with a stored vector, sorted."""
    catalog = _catalog(catalog)
    names = cfs.list_names(catalog.fs, catalog.path(VECTORS_DIR))
    return sorted(n.removesuffix(".json") for n in names if n.endswith(".json") and not n.startswith("."))


def load_task_vectors(catalog: Catalog | str, tasks: Iterable[str] | None = None) -> dict[str, TaskVector]:
    """Stored vectors of ``tasks`` (default: every stored one), by task.

    Raises:
        CatalogError: if a named task has no stored vector.
        TaskError: if a file is damaged.
    """
    catalog = _catalog(catalog)
    stored = vector_tasks(catalog)
    names = stored if tasks is None else list(tasks)
    missing = [t for t in names if t not in stored]
    if missing:
        raise CatalogError(
            f"no task vector for {missing} in catalog {catalog.uri} (stored: {stored or 'none'}); "
            "compute them with `icmf taskvec`"
        )
    out = {}
    for task in names:
        path = vector_path(catalog, task)
        try:
            record = json.loads(cfs.read_bytes(catalog.fs, path))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TaskError(
                f"task vector {path}: invalid JSON ({exc}); recompute it with `icmf taskvec`"
            ) from None
        out[task] = TaskVector.from_record(record, path)
    return out
