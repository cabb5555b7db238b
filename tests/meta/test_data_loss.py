"""The few-shot data fusion loss of meta-training, and choosing it (``train.fusion_loss``)."""

from __future__ import annotations

import pytest
import torch

from engine.adapters import load_adapter
from engine.adapters.codec import to_canonical, to_flat
from engine.catalog import Catalog
from engine.catalog.synth import parse_layout, synthesize
from engine.meta.config import MetaConfigError, load_config
from engine.meta.train import data_fusion_loss, resolve_fusion_loss


def cfg(catalog_uri, tmp_path, **train):
    return load_config(
        {
            "catalog": catalog_uri,
            "out": str(tmp_path / "out"),
            "train": {"steps": 5, "checkpoint_every": 5, **train},
        }
    )


@pytest.mark.parametrize("inner_steps", [0, 1])
def test_data_loss_scores_the_fused_adapter_and_is_differentiable(demo_catalog, tmp_path, inner_steps):
    catalog = demo_catalog.catalog
    layout = catalog.layout()
    config = cfg(catalog.uri, tmp_path, shots_per_task=4, inner_steps=inner_steps, inner_lr=0.01)
    loss = data_fusion_loss(config, layout, ["copy", "reverse"], seed=0)
    own = to_flat(to_canonical(load_adapter(demo_catalog.dirs["copy"]), layout)).requires_grad_(True)
    value = loss(own, ("copy", "reverse"))
    value.backward()
    assert torch.isfinite(value) and own.grad.abs().sum() > 0
    # The copy adapter is better than nothing on copy.
    zero = torch.zeros(layout.size)
    assert float(loss(own.detach(), ("copy",))) < float(loss(zero, ("copy",)))


def test_fusion_loss_choice(demo_catalog, tmp_path):
    catalog = demo_catalog.catalog
    assert resolve_fusion_loss(cfg(catalog.uri, tmp_path), catalog, ["copy", "reverse"]) == "data"
    assert resolve_fusion_loss(cfg(catalog.uri, tmp_path, fusion_loss="proxy"), catalog, ["copy"]) == "proxy"
    synthetic = Catalog(tmp_path / "synthetic")
    synthesize(synthetic, 8, parse_layout("tiny"), num_tasks=2, seed=0)
    tasks = sorted(synthetic.tasks())
    assert resolve_fusion_loss(cfg(synthetic.uri, tmp_path), synthetic, tasks) == "proxy"  # auto falls back
    with pytest.raises(MetaConfigError, match="no definition"):
        resolve_fusion_loss(cfg(synthetic.uri, tmp_path, fusion_loss="data"), synthetic, tasks)


def test_task_selection_faults_are_listed_together(tmp_path):
    with pytest.raises(MetaConfigError) as info:
        load_config(
            {
                "catalog": "c",
                "out": "o",
                "tasks": ["a", "b"],
                "exclude_tasks": ["b"],
                "train": {"steps": 5, "checkpoint_every": 10},
            }
        )
    assert "exclude_tasks both name ['b']" in str(info.value)
    assert "checkpoint_every must be <= train.steps" in str(info.value)
    with pytest.raises(MetaConfigError, match=r"train\.inner_steps"):
        load_config({"catalog": "c", "out": "o", "train": {"inner_steps": -1}})
    config = load_config({"catalog": "c", "out": "o", "exclude_tasks": ["b"]})
    assert config.task_filter(["a", "b", "c"]) == ["a", "c"]


def test_in_context_task_vectors_are_used_when_every_task_has_one(demo_catalog, tmp_path):
    from engine.meta.train import context_vectors
    from engine.task_vectors import compute_task_vectors, save_task_vectors

    catalog = demo_catalog.catalog
    assert (
        context_vectors(cfg(catalog.uri, tmp_path), catalog, ["copy", "reverse"]) is None
    )  # none stored yet
    with pytest.raises(MetaConfigError, match="no stored vector"):
        strict = load_config({"catalog": catalog.uri, "out": "o", "task_vectors": {"source": "context"}})
        context_vectors(strict, catalog, ["copy", "reverse"])
    stored = compute_task_vectors(catalog, ["copy", "reverse"], k=4, use_ray=False)
    save_task_vectors(catalog, stored)
    try:
        vectors, info = context_vectors(cfg(catalog.uri, tmp_path), catalog, ["copy", "reverse"])
        assert info["kind"] == "context" and info["dim"] == stored["copy"].dim
        assert torch.equal(vectors["copy"], stored["copy"].vector.float())
        projection = load_config(
            {"catalog": catalog.uri, "out": "o", "task_vectors": {"source": "adapter_projection"}}
        )
        assert context_vectors(projection, catalog, ["copy"]) is None
    finally:
        for task in ("copy", "reverse"):  # the session's catalog is shared with other tests
            catalog.fs.delete_file(f"{catalog.root}/task_vectors/{task}.json")


def test_run_storage_keeps_an_object_store_query_after_the_path():
    from engine.meta.train import _storage_path

    out = "s3://bucket/fvae?region=us-east-1&endpoint_override=127.0.0.1:9000&scheme=http"
    assert (
        _storage_path(out)
        == "s3://bucket/fvae/runs?region=us-east-1&endpoint_override=127.0.0.1:9000&scheme=http"
    )
    assert _storage_path("s3://bucket/fvae/?region=x") == "s3://bucket/fvae/runs?region=x"


def test_data_loss_scores_each_task_with_the_fused_adapters_own_head(bert_spec, tmp_path):
    # A LoRA and its classifier head are trained together: an episode that fuses adapter b must
    # score it with b's head, not with the head of the task's first catalog adapter.
    from engine.tasks import TaskDefinition, save_task, task_model
    from tests.helpers import rewrite_weights, save_lora, sentiment_rows, write_jsonl

    catalog = Catalog(tmp_path / "cat")
    base = task_model(bert_spec).build_base()
    ids = []
    for seed, scale in ((3, 1.0), (4, 25.0)):
        path = save_lora(
            base,
            tmp_path / f"a{seed}",
            seed=seed,
            target_modules=["query", "value"],
            modules_to_save=["classifier"],
        )
        rewrite_weights(
            path, lambda t, s=scale: {k: (v * s if "classifier" in k else v) for k, v in t.items()}
        )
        ids += catalog.ingest([path], task="senti", base_model="tests/bert").added
    examples = write_jsonl(tmp_path / "senti.jsonl", sentiment_rows(40))
    save_task(
        catalog, TaskDefinition(name="senti", model=bert_spec, examples=str(examples), split={"eval": 8})
    )
    layout = catalog.layout()
    loss = data_fusion_loss(cfg(catalog.uri, tmp_path, shots_per_task=100), layout, ["senti"], seed=0)
    flat = to_flat(to_canonical(catalog.load_adapter(ids[1]), layout))
    first_head, own_head = (float(loss(flat, ("senti",), (i,))) for i in ids)
    assert first_head != pytest.approx(own_head, rel=1e-3)
    assert float(loss(flat, ("senti",))) == pytest.approx(first_head, rel=1e-5)  # no ids: the task's head
    fixed = data_fusion_loss(
        cfg(catalog.uri, tmp_path, shots_per_task=100, heads="task"), layout, ["senti"], 0
    )
    assert float(fixed(flat, ("senti",), (ids[1],))) == pytest.approx(first_head, rel=1e-5)
