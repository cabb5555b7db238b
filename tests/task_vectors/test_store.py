"""Storage in the catalog: round trip, atomic overwrite, any URI, damaged and missing files."""

from __future__ import annotations

import json

import pytest
import torch

from engine.catalog import Catalog
from engine.errors import CatalogError
from engine.task_vectors import TaskVector, load_task_vectors, save_task_vectors, vector_tasks
from engine.tasks.errors import TaskError


def vec(task: str, d: int = 6, model: str = "sha256:x") -> TaskVector:
    return TaskVector(task=task, vector=torch.randn(d), k=3, example_ids=["1", "2", "3"], model=model,
                      with_adapter=False, created="now")  # fmt: skip


@pytest.mark.parametrize("uri", ["dir", "memory://tv-store"])
def test_round_trip_and_overwrite(tmp_path, uri):
    catalog = Catalog(str(tmp_path / "cat") if uri == "dir" else uri)
    a, b = vec("a"), vec("b")
    save_task_vectors(catalog, {"a": a, "b": b})
    assert vector_tasks(catalog) == ["a", "b"]
    loaded = load_task_vectors(catalog)
    assert torch.equal(loaded["a"].vector, a.vector) and loaded["b"].to_record() == b.to_record()
    newer = vec("a")
    save_task_vectors(catalog.uri, {"a": newer})
    assert torch.equal(load_task_vectors(catalog, ["a"])["a"].vector, newer.vector)
    assert list(load_task_vectors(catalog, ["b"])) == ["b"]


def test_overwrite_leaves_no_temporary_files(tmp_path):
    catalog = Catalog(tmp_path / "cat")
    for _ in range(2):
        save_task_vectors(catalog, {"a": vec("a")})
    assert sorted(p.name for p in (tmp_path / "cat" / "task_vectors").iterdir()) == ["a.json"]


def test_missing_and_damaged(tmp_path):
    catalog = Catalog(tmp_path / "cat")
    with pytest.raises(CatalogError, match=r"no task vector for \['x'\].*icmf taskvec"):
        load_task_vectors(catalog, ["x"])
    save_task_vectors(catalog, {"a": vec("a")})
    path = tmp_path / "cat" / "task_vectors" / "a.json"
    path.write_text("{not json")
    with pytest.raises(TaskError, match="invalid JSON"):
        load_task_vectors(catalog)
    record = vec("a").to_record()
    record["vector"] = record["vector"][:2]
    path.write_text(json.dumps(record))
    with pytest.raises(TaskError, match="dim is 6"):
        load_task_vectors(catalog)


def test_save_refuses_mixed_dimensions_of_one_model(tmp_path):
    with pytest.raises(TaskError, match="disagree in dimension"):
        save_task_vectors(Catalog(tmp_path / "cat"), {"a": vec("a", 4), "b": vec("b", 5)})
    assert vector_tasks(Catalog(tmp_path / "cat")) == []
