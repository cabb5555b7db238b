"""Computing task vectors: the Ray actor pool equals the in-process computation; choices and errors."""

from __future__ import annotations

import warnings

import pytest
import torch

from engine.errors import CatalogError
from engine.task_vectors import compute_task_vectors, example_id, load_task_vectors, save_task_vectors
from engine.task_vectors.compute import plan_task_vectors
from engine.tasks import task_model
from engine.tasks.apply import adapted
from engine.tasks.errors import TaskError
from tests.helpers import write_jsonl

warnings.filterwarnings("ignore", category=UserWarning, module="peft")
K = 4


def by_hand(tv_catalog, task: str, adapter: str | None, examples) -> torch.Tensor:
    """The definition, written out: mean over examples of the last-layer state, adapter applied."""
    tm = task_model(tv_catalog.spec)
    with adapted(tm.build_base(), catalog=tv_catalog.catalog if adapter else None, adapter_id=adapter) as m:
        return tm.hidden_states(m, examples).mean(0)


@pytest.mark.ray
def test_ray_pool_equals_in_process_and_stores(ray_session, tv_catalog):
    tasks = ["copy", "reverse", "sst"]
    adapters = {"copy": "all"}  # every adapter of copy (two units), the first of the others
    on_ray = compute_task_vectors(tv_catalog.catalog, tasks, k=K, adapters=adapters, concurrency=2)
    local = compute_task_vectors(tv_catalog.catalog, tasks, k=K, adapters=adapters, use_ray=False)
    assert list(on_ray) == tasks
    for task in tasks:
        torch.testing.assert_close(on_ray[task].vector, local[task].vector, atol=1e-5, rtol=0)
        assert on_ray[task].example_ids == local[task].example_ids and len(on_ray[task].example_ids) == K
        assert on_ray[task].adapters == tv_catalog.ids[task][: 2 if task == "copy" else 1]
    assert (
        on_ray["copy"].dim == 64 and on_ray["sst"].dim == 16 and on_ray["copy"].model != on_ray["sst"].model
    )
    save_task_vectors(tv_catalog.catalog, on_ray)
    stored = load_task_vectors(tv_catalog.catalog.uri, tasks)
    assert all(torch.equal(stored[t].vector, on_ray[t].vector) for t in tasks)

    # every adapter of a task: the mean over its adapters' vectors
    plan = plan_task_vectors(tv_catalog.catalog, ["copy"], k=K)[0]
    expected = torch.stack(
        [by_hand(tv_catalog, "copy", a, plan.examples) for a in tv_catalog.ids["copy"]]
    ).mean(0)
    torch.testing.assert_close(on_ray["copy"].vector, expected, atol=1e-5, rtol=0)


def test_definition_adapter_and_base_alone(tv_catalog):
    plan = plan_task_vectors(tv_catalog.catalog, ["copy"], k=K, seed=3)[0]
    assert plan.source == "task:copy" and len(plan.examples) == K
    with_adapter = compute_task_vectors(tv_catalog.catalog, ["copy"], k=K, seed=3, use_ray=False)["copy"]
    base = compute_task_vectors(tv_catalog.catalog, ["copy"], k=K, seed=3, with_adapter=False, use_ray=False)[
        "copy"
    ]
    assert with_adapter.example_ids == [example_id(e) for e in plan.examples] == base.example_ids
    torch.testing.assert_close(
        with_adapter.vector, by_hand(tv_catalog, "copy", tv_catalog.ids["copy"][0], plan.examples)
    )
    torch.testing.assert_close(base.vector, by_hand(tv_catalog, "copy", None, plan.examples))
    assert not base.with_adapter and base.adapters == []
    assert (with_adapter.vector - base.vector).abs().max() > 1e-3
    second = tv_catalog.ids["copy"][1]
    explicit = compute_task_vectors(
        tv_catalog.catalog, ["copy"], k=K, seed=3, adapters=second, use_ray=False
    )["copy"]
    assert explicit.adapters == [second] and not torch.allclose(explicit.vector, with_adapter.vector)


def test_examples_file_and_model_for_a_task_without_definition(tv_catalog, tmp_path):
    from engine.demo.tasks import demo_examples

    rows = demo_examples("copy", 6, seed=7)
    path = write_jsonl(tmp_path / "new.jsonl", rows)
    out = compute_task_vectors(tv_catalog.catalog, ["fresh"], k=6, examples=str(path), with_adapter=False,
                               model=tv_catalog.spec, use_ray=False)["fresh"]  # fmt: skip
    assert out.examples_source == str(path) and sorted(out.example_ids) == sorted(example_id(r) for r in rows)
    torch.testing.assert_close(out.vector, by_hand(tv_catalog, "fresh", None, rows))


def test_errors_name_the_cause(tv_catalog, tmp_path):
    cat = tv_catalog.catalog
    with pytest.raises(TaskError, match=r"no definition.*no examples file"):
        compute_task_vectors(cat, ["fresh"], k=K, model=tv_catalog.spec, use_ray=False)
    with pytest.raises(TaskError, match=r"no definition.*--model SPEC"):
        compute_task_vectors(cat, ["fresh"], k=K, examples=str(tv_catalog.files["copy"]), use_ray=False)
    with pytest.raises(TaskError, match=r"task 'copy' \(task:copy\) hold 8 example\(s\), fewer than k=9"):
        compute_task_vectors(cat, ["copy"], k=9, use_ray=False)
    with pytest.raises(TaskError, match="no adapter named for task 'copy'"):
        compute_task_vectors(cat, ["copy"], k=K, adapters={"copy": []}, use_ray=False)
    odd = tv_catalog.ids["odd"][0]
    with pytest.raises(TaskError, match=f"adapter '{odd}' is for task 'odd', not 'copy'"):
        compute_task_vectors(cat, ["copy"], k=K, adapters=odd, use_ray=False)
    with pytest.raises(CatalogError, match="no adapter 'nope-1'"):
        compute_task_vectors(cat, ["copy"], k=K, adapters="nope-1", use_ray=False)
    with pytest.raises(TaskError, match="with another model spec than the one given"):
        compute_task_vectors(cat, ["copy"], k=K, model=tv_catalog.bert, use_ray=False)
    with pytest.raises(TaskError, match="one examples file for 2 tasks"):
        compute_task_vectors(
            cat, ["copy", "reverse"], k=K, examples=str(tv_catalog.files["copy"]), use_ray=False
        )


def test_adapter_not_fitting_the_model(tv_catalog, tmp_path):
    import shutil

    from engine.catalog import Catalog
    from engine.tasks import TaskDefinition, save_task

    shutil.copytree(tv_catalog.root / "catalog", tmp_path / "cat")  # the session catalog stays as is
    cat = Catalog(tmp_path / "cat")
    save_task(cat, TaskDefinition(name="odd", model=tv_catalog.spec, examples=str(tv_catalog.files["copy"]),
                                  split={"eval": 4, "support": 8, "seed": 0}))  # fmt: skip
    with pytest.raises(TaskError, match=r"cannot be applied to this base model|does not fit this base model"):
        compute_task_vectors(cat, ["odd"], k=K, use_ray=False)


def test_memory_catalog_computes_in_process_but_not_on_ray(tv_catalog):
    from engine.catalog import Catalog

    cat = Catalog("memory://tv-compute")
    with pytest.raises(CatalogError, match=r"memory:// catalog is not visible to Ray workers"):
        compute_task_vectors(
            cat, ["fresh"], k=2, examples=str(tv_catalog.files["copy"]), model=tv_catalog.spec
        )
    out = compute_task_vectors(cat, ["fresh"], k=2, examples=str(tv_catalog.files["copy"]), model=tv_catalog.spec,
                               with_adapter=False, use_ray=False)  # fmt: skip
    assert out["fresh"].k == 2 and out["fresh"].dim == 64
