"""Shared fixtures: one local Ray cluster per session, adapters, the task tests' specs and the
demo catalog; the ``lab`` marker. Helpers that are not fixtures are in ``tests/helpers.py``."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import pytest

from tests.helpers import (
    DEMO_BASE_ID,
    LAB_PACKAGES,
    bert_spec_dict,
    custom_spec_dict,
    make_adapter,
    save_lora,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub

MISSING_LAB_PACKAGES = [name for name in LAB_PACKAGES if importlib.util.find_spec(name) is None]


def pytest_collection_modifyitems(config, items):
    """Tests marked ``lab`` read data and weights shipped by the lab's extra: skip them without it."""
    if not MISSING_LAB_PACKAGES:
        return
    skip = pytest.mark.skip(
        reason=f"the lab's extra is not installed ({', '.join(MISSING_LAB_PACKAGES)}): pip install -e '.[lab]'"
    )
    for item in items:
        if item.get_closest_marker("lab") is not None:
            item.add_marker(skip)


@pytest.fixture
def adapter_factory(tmp_path):
    counter = iter(range(10_000))

    def factory(**kwargs) -> Path:
        return make_adapter(tmp_path / f"adapter{next(counter)}", **kwargs)

    return factory


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster for the whole test session."""
    import ray
    import ray.data

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


# ------------------------------------------------------------------ task model specs (three kinds)
@pytest.fixture(scope="session")
def demo_spec():
    from engine.demo.tasks import demo_model_spec

    return demo_model_spec()


@pytest.fixture(scope="session")
def bert_spec():
    from engine.tasks import ModelSpec

    return ModelSpec.model_validate(bert_spec_dict())


@pytest.fixture(scope="session")
def custom_spec():
    from engine.tasks import ModelSpec

    return ModelSpec.model_validate(custom_spec_dict())


@pytest.fixture(scope="session")
def bert_task(bert_spec):
    from engine.tasks import task_model

    return task_model(bert_spec)


# ------------------------------------------------------------------------------ a demo catalog
DEMO_SPLIT = {"eval": 24, "support": 8, "seed": 0}


def _train_briefly(task: str, seed: int, steps: int = 12):
    from engine.demo.tiny import train_lora

    return lambda model: train_lora(model, task, seed=seed, steps=steps, batch_size=16, lr=1e-2)


@pytest.fixture(scope="session")
def demo_catalog(tmp_path_factory, demo_spec):
    """A catalog with tasks ``copy`` and ``reverse`` (the demo's model), a briefly trained adapter per
    task (ingested first) and a random one for ``copy``; returns a namespace of paths and ids."""
    from types import SimpleNamespace

    from engine.catalog import Catalog
    from engine.demo.tasks import write_demo_examples
    from engine.tasks import TaskDefinition, save_task, task_model

    root = tmp_path_factory.mktemp("demo")
    catalog = Catalog(root / "catalog")
    base = task_model(demo_spec).build_base()
    dirs, ids = {}, {}
    for i, task in enumerate(("copy", "reverse")):
        dirs[task] = save_lora(
            base,
            root / f"{task}-trained",
            seed=i,
            train=_train_briefly(task, seed=i),
            target_modules=["q_proj", "v_proj"],
        )
        report = catalog.ingest([dirs[task]], task=task, base_model=DEMO_BASE_ID)
        ids[task] = report.added[0]
        examples = write_demo_examples(root / f"{task}.jsonl", task, 40, seed=100 + i)
        save_task(
            catalog, TaskDefinition(name=task, model=demo_spec, examples=str(examples), split=DEMO_SPLIT)
        )
    random_dir = save_lora(base, root / "copy-random", seed=9, target_modules=["q_proj", "v_proj"])
    ids["copy-random"] = catalog.ingest([random_dir], task="copy", base_model=DEMO_BASE_ID).added[0]
    return SimpleNamespace(root=root, catalog=catalog, dirs=dirs, ids=ids)
