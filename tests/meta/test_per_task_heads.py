"""Tasks with one body and one head per task (a custom nn.Module whose factory takes the task):
task add -> meta-train -> fuse with icm (with refinement) -> evaluate, each task with its own head."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from engine.catalog import Catalog
from engine.cli.main import main
from engine.fvae.artifact import FVAEArtifact
from engine.tasks import load_task
from engine.tasks.errors import TaskError
from engine.tasks.fewshot import FewShotObjective
from tests.meta.heads import BASE_ID, heads_adapter, heads_rows, write_task_files

TASKS = ("sign", "argmax")  # 2 and 4 classes: a task scored with another's head would fail


@pytest.fixture(scope="module")
def heads_catalog(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    uri = str(root / "catalog")
    for i, task in enumerate(TASKS):
        spec, examples = write_task_files(root, task, n=64, seed=10 + i)
        argv = ["task", "add", task, "--catalog", uri, "--model", str(spec), "--examples", str(examples)]
        assert main([*argv, "--split", "eval=16,support=8,seed=0"]) == 0
        rows = heads_rows(task, 48, seed=100 + i)
        dirs = [heads_adapter(root, task, seed=s, steps=30, rows=rows) for s in range(3)]
        Catalog(uri).ingest(dirs, task=task, base_model=BASE_ID)
    return root, uri


def test_specs_differ_only_in_the_head_and_share_one_objective(heads_catalog):
    _, uri = heads_catalog
    catalog = Catalog(uri)
    specs = {t: load_task(catalog, t).model for t in TASKS}
    assert specs["sign"] != specs["argmax"]  # factory_kwargs differ: the task's head
    objective = FewShotObjective.from_catalog(catalog, list(TASKS), catalog.layout())
    hosts = {t: objective.shots[t].host or objective.host for t in TASKS}
    assert hosts["sign"] is not hosts["argmax"]
    assert hosts["argmax"].task_model.spec.factory_kwargs == {"task": "argmax"}
    factors = torch.zeros(catalog.layout().size)
    assert math.isfinite(float(objective.loss(factors)))  # each task through its own head


def test_a_task_whose_adapted_modules_differ_is_refused(heads_catalog, tmp_path):
    _, uri = heads_catalog
    catalog = Catalog(uri)
    spec, examples = write_task_files(tmp_path, "parity", spec_seed=7)  # another body
    assert (
        main(["task", "add", "parity", "--catalog", uri, "--model", str(spec), "--examples", str(examples)])
        == 0
    )
    try:
        with pytest.raises(TaskError, match=r"2 different base models .*\['parity'\]"):
            FewShotObjective.from_catalog(catalog, ["sign", "parity"], catalog.layout())
    finally:
        catalog.fs.delete_file(f"{catalog.root}/tasks/parity.json")


@pytest.mark.ray
@pytest.mark.slow
def test_train_fuse_icm_and_evaluate_with_per_task_heads(ray_session, heads_catalog, capsys):
    root, uri = heads_catalog
    config = {
        "catalog": uri,
        "out": str(root / "fvae"),
        "fvae": {"arch": "mlp", "hidden": 32, "latent_dim": 8},
        "task_vectors": {"dim": 8},
        "train": {
            "steps": 6,
            "checkpoint_every": 6,
            "report_every": 3,
            "workers": 1,
            "max_tasks": 2,
            "shots_per_task": 8,
            "fusion_loss": "data",
        },
    }
    (root / "train.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(root / "train.yaml")]) == 0
    meta = FVAEArtifact.load(str(root / "fvae")).meta
    assert meta.fusion_loss == "data" and meta.tasks == sorted(TASKS) and meta.steps == 6
    fused = root / "fused"
    argv = [
        "fuse",
        "--catalog",
        uri,
        "--tasks",
        ",".join(TASKS),
        "--method",
        "icm",
        "--model",
        str(root / "fvae"),
    ]
    assert main([*argv, "--param", "refine_steps=3", "--out", str(fused)]) == 0
    capsys.readouterr()
    assert (
        main(["eval", "--catalog", uri, "--tasks", ",".join(TASKS), "--adapter", str(fused), "--json"]) == 0
    )
    report = json.loads(capsys.readouterr().out)
    results = {r["task"]: r for r in report["tasks"]}
    assert set(results) == set(TASKS)
    for task, result in results.items():
        assert result["kind"] == "custom" and result["examples"] == 16
        assert math.isfinite(result["fused"]["loss"]) and 0 <= result["fused"]["accuracy"] <= 1
        # the own adapters were trained: they beat the base with the task's head
        assert result["own_metrics"]["loss"] < result["base"]["loss"], task
