"""Hyperparameters picked on the tasks' support examples by ``icmf fuse`` and by a served spec,
through the one :func:`engine.fusion.fusion_context`; RegMean's Gram matrices computed with Ray
Data, stored in the catalog and reused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from engine.adapters.io import PROVENANCE_FILE, WEIGHTS_NAME, save_adapter
from engine.catalog import Catalog
from engine.cli.main import main
from engine.fusion import FusionContext, fuse_from_catalog, fusion_context
from engine.task_vectors import grams as grams_store
from engine.tasks import load_task, save_task, task_model
from engine.tasks.examples import load_task_examples
from engine.tasks.functional import LoraHost
from engine.tasks.grams import input_grams
from serve.deployment import fuse_spec
from serve.spec import FusionSpec
from tests.helpers import DEMO_BASE_ID

TASKS = ["copy", "reverse"]


@pytest.fixture(scope="module")
def catalog(demo_catalog, tmp_path_factory):
    """A catalog of its own (these tests write Gram matrices and redefine a task): the lab
    catalog's two trained adapters and task definitions."""
    catalog = Catalog(tmp_path_factory.mktemp("support") / "catalog")
    for task in TASKS:
        catalog.ingest([demo_catalog.dirs[task]], task=task, base_model=DEMO_BASE_ID)
        save_task(catalog, load_task(demo_catalog.catalog, task))
    return catalog


def _provenance(path) -> dict:
    return json.loads((path / PROVENANCE_FILE).read_text())


def _sha256(path) -> str:
    return hashlib.sha256((path / WEIGHTS_NAME).read_bytes()).hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize(("method", "params"), [("iso_c", {}), ("knots", {"density": 0.4})])
def test_cli_and_server_pick_hyperparameters_on_support(catalog, tmp_path, capsys, method, params):
    """Unset ``alpha`` is picked on the support examples; a given knob stays as given."""
    argv = ["fuse", "--catalog", catalog.uri, "--tasks", ",".join(TASKS), "--method", method]
    argv += [f"--param={key}={value}" for key, value in params.items()]
    assert main([*argv, "--out", str(tmp_path / "cli")]) == 0, capsys.readouterr().err
    assert "picked on the support examples: alpha=" in capsys.readouterr().out
    details = _provenance(tmp_path / "cli")["details"]
    assert details["source"] == {"alpha": "support", **dict.fromkeys(params, "given")}
    losses = [c["loss"] for c in details["candidates"]]
    assert len(set(losses)) > 1  # the candidates differ on the support examples
    assert details["support_loss"] == min(losses)
    best = next(c for c in details["candidates"] if c["loss"] == min(losses))
    assert best["alpha"] == details["hyperparameters"]["alpha"]
    assert {c.get("density") for c in details["candidates"]} == {params.get("density")}
    # The server fuses through the same function: the same pick, the same adapter bit for bit.
    spec = FusionSpec.model_validate({"method": method, "tasks": TASKS, "params": params})
    save_adapter(fuse_spec(catalog, spec.canonical()), tmp_path / "served")
    assert _sha256(tmp_path / "served") == _sha256(tmp_path / "cli")
    # Turned off: the defaults, and no support loss at all.
    assert main([*argv, "--no-support-selection", "--out", str(tmp_path / "off")]) == 0
    off = _provenance(tmp_path / "off")["details"]
    assert off["source"]["alpha"] == "default" and "candidates" not in off
    spec_off = FusionSpec.model_validate(
        {"method": method, "tasks": TASKS, "params": params, "support_selection": False}
    )
    assert spec_off.model_id() != spec.model_id()
    save_adapter(fuse_spec(catalog, spec_off.canonical()), tmp_path / "served-off")
    assert _sha256(tmp_path / "served-off") == _sha256(tmp_path / "off")


def test_the_support_loss_is_built_only_when_a_knob_is_left_to_pick(catalog, tmp_path):
    given = fusion_context("iso_c", {"alpha": 0.5}, catalog=catalog, tasks=TASKS)
    assert given.objective is None and given.loss_fn is None
    assert fusion_context("ties", {}, catalog=catalog, tasks=TASKS).loss_fn is None
    # Tasks without definitions: the method takes its defaults (nothing to pick on).
    bare = Catalog(tmp_path / "bare")
    for task in TASKS:
        exported = catalog.export(catalog.entries(task=task)[0]["id"], tmp_path / task)
        bare.ingest([exported], task=task, base_model=DEMO_BASE_ID)
    result = fuse_from_catalog(
        bare, "iso_c", tasks=TASKS, context=fusion_context("iso_c", {}, catalog=bare, tasks=TASKS)
    )
    assert result.provenance["details"]["source"] == {"alpha": "default"}


# ---------------------------------------------------------------------------------- Gram matrices
def _direct_grams(catalog: Catalog, task: str) -> dict[str, torch.Tensor]:
    """Every support example in one batch through one in-process host: the reference."""
    definition = load_task(catalog, task)
    model = task_model(definition.model)
    host = LoraHost(model, catalog.layout())
    support = load_task_examples(definition, catalog).support.to_list()
    return input_grams(host, model.encode(support))


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.ray
@pytest.mark.slow
def test_grams_from_ray_data_are_stored_reused_and_used_by_regmean(
    ray_session, catalog, tmp_path, capsys, monkeypatch
):
    layout = catalog.layout()
    stored = grams_store.task_grams(catalog, TASKS, layout, batch_size=3)  # batches of mixed length
    for task in TASKS:
        direct = _direct_grams(catalog, task)
        assert set(stored[task]) == set(direct) == {m.name for m in layout.modules}
        for name, gram in direct.items():
            assert stored[task][name].dtype == torch.float64
            assert _relative(stored[task][name], gram) <= 1e-5, (task, name)
    folder = Path(catalog.path("tasks", "copy.grams", stored["copy"].key))  # next to copy.json
    assert sorted(p.name for p in folder.iterdir()) == [*sorted(stored["copy"]._files.values()), "grams.json"]

    # Stored: the next fusion reads them and computes nothing.
    def no_recompute(*args, **kwargs):
        raise AssertionError("Gram matrices were recomputed")

    monkeypatch.setattr(grams_store, "run_grams_on_ray", no_recompute)
    monkeypatch.setattr(grams_store, "run_grams_in_process", no_recompute)
    argv = ["fuse", "--catalog", catalog.uri, "--tasks", ",".join(TASKS), "--method", "regmean"]
    assert main([*argv, "--param", "shrink=0.9", "--out", str(tmp_path / "cli")]) == 0, (
        capsys.readouterr().err
    )
    provenance = _provenance(tmp_path / "cli")
    assert provenance["details"]["grams"] == {t: stored[t].key for t in TASKS}
    # ... and they are the ones regmean fuses with: the same adapter as from the direct matrices.
    direct = {t: _direct_grams(catalog, t) for t in TASKS}
    expected = fuse_from_catalog(
        catalog, "regmean", tasks=TASKS, params={"shrink": 0.9}, context=FusionContext(grams=direct)
    )
    cli = fuse_from_catalog(
        catalog,
        "regmean",
        tasks=TASKS,
        params={"shrink": 0.9},
        context=fusion_context("regmean", {"shrink": 0.9}, catalog=catalog, tasks=TASKS),
    )
    for name, module in expected.adapter.modules.items():
        assert _relative(cli.adapter.modules[name].delta(), module.delta()) <= 1e-5

    # New support examples: a new key, computed again (and the old key's files deleted).
    monkeypatch.undo()
    definition = load_task(catalog, "copy")
    reshuffled = definition.model_copy(update={"split": definition.split.model_copy(update={"seed": 7})})
    save_task(catalog, reshuffled, overwrite=True)
    fresh = grams_store.task_grams(catalog, ["copy"], layout)
    assert fresh["copy"].key != stored["copy"].key
    assert grams_store.stored_grams(catalog, "copy", stored["copy"].key) is None
    for name, gram in _direct_grams(catalog, "copy").items():
        assert _relative(fresh["copy"][name], gram) <= 1e-5


def test_grams_keys_follow_model_examples_and_modules(catalog):
    definition = load_task(catalog, "copy")
    support = load_task_examples(definition, catalog).support.to_list()
    layout = catalog.layout()
    key = grams_store.gram_key(definition.model, support, layout)
    assert key == grams_store.gram_key(definition.model, [dict(e) for e in support], layout)
    assert key != grams_store.gram_key(definition.model, support[1:], layout)
    other_model = definition.model.model_copy(update={"seed": definition.model.seed + 1})
    assert key != grams_store.gram_key(other_model, support, layout)
