"""A small catalog for task vectors: two demo tasks (tiny Llama) with two random adapters each,
and one BERT classification task, plus an adapter of another base model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests.helpers import DEMO_BASE_ID, bert_spec_dict, make_adapter, save_lora, sentiment_rows, write_jsonl

SPLIT = {"eval": 4, "support": 8, "seed": 0}


@pytest.fixture(scope="session")
def tv_catalog(tmp_path_factory):
    from engine.catalog import Catalog
    from engine.demo.tasks import demo_model_spec, write_demo_examples
    from engine.tasks import ModelSpec, TaskDefinition, save_task, task_model

    root = tmp_path_factory.mktemp("taskvec")
    catalog = Catalog(root / "catalog")
    spec = demo_model_spec()
    base = task_model(spec).build_base()
    ids: dict[str, list[str]] = {}
    files = {}
    for i, task in enumerate(("copy", "reverse")):
        for j in range(2):
            path = save_lora(base, root / f"{task}{j}", seed=10 * i + j, target_modules=["q_proj", "v_proj"])
            ids.setdefault(task, []).append(
                catalog.ingest([path], task=task, base_model=DEMO_BASE_ID).added[0]
            )
        files[task] = write_demo_examples(root / f"{task}.jsonl", task, 20, seed=100 + i)
        save_task(catalog, TaskDefinition(name=task, model=spec, examples=str(files[task]), split=SPLIT))
    # an adapter whose modules and shapes do not fit the demo model (a tests/conftest tiny Llama)
    stray = make_adapter(root / "stray", seed=3)
    ids["odd"] = catalog.ingest([stray], task="odd", base_model="tests/tiny-llama").added
    # a classification task: pooled encoder states, a different model (and hidden size)
    bert = ModelSpec.model_validate(
        {**bert_spec_dict(), "config": {**bert_spec_dict()["config"], "hidden_size": 16}}
    )
    files["sst"] = write_jsonl(root / "sst.jsonl", sentiment_rows(20))
    bert_base = task_model(bert).build_base()
    path = save_lora(
        bert_base, root / "sst0", seed=5, target_modules=["query", "value"], modules_to_save=["classifier"]
    )
    ids["sst"] = catalog.ingest([path], task="sst", base_model="tests/tiny-bert16").added
    save_task(catalog, TaskDefinition(name="sst", model=bert, examples=str(files["sst"]), split=SPLIT))
    return SimpleNamespace(root=root, catalog=catalog, ids=ids, files=files, spec=spec, bert=bert)
