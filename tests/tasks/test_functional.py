"""LoraHost and the few-shot objective: factors substituted per call equal PEFT's applied adapter,
gradients reach the factors, the base is never modified; predefined splits."""

from __future__ import annotations

import json

import pytest
import torch

from engine.adapters import load_adapter
from engine.adapters.codec import to_canonical, to_flat
from engine.adapters.layout import Layout
from engine.fusion import FusionContext, fuse_adapters
from engine.fvae.artifact import Familiarity, TaskVectorSource
from engine.tasks import TaskDefinition, load_task, load_task_examples, save_task, task_model
from engine.tasks.apply import adapted
from engine.tasks.errors import ExamplesError, TaskError
from engine.tasks.fewshot import FewShotObjective
from engine.tasks.functional import LoraHost, adapter_factors
from tests.helpers import save_lora, sentiment_rows, write_jsonl


@pytest.fixture(scope="module")
def demo_host(demo_catalog):
    catalog = demo_catalog.catalog
    definition = load_task(catalog, "copy")
    return LoraHost(task_model(definition.model), catalog.layout())


def eval_rows(demo_catalog, task):
    return load_task_examples(load_task(demo_catalog.catalog, task), demo_catalog.catalog).eval.to_list()


def test_substituted_factors_match_peft_and_leave_the_base_alone(demo_catalog, demo_host):
    model = demo_host.task_model
    rows = eval_rows(demo_catalog, "copy")
    adapter = load_adapter(demo_catalog.dirs["copy"])
    before = {
        k: v.clone() for k, v in demo_host.model.get_base_model().state_dict().items() if "lora" not in k
    }
    got = demo_host.metrics(adapter_factors(adapter, demo_host.layout), rows)
    # The flat canonical form (scaling folded, rank padded, gauge) gives the same numbers.
    flat = to_flat(to_canonical(adapter, demo_host.layout, gauge=True))
    assert demo_host.metrics(flat, rows)["loss"] == pytest.approx(got["loss"], rel=1e-5)
    base = model.build_base()
    with adapted(base, demo_catalog.dirs["copy"]) as peft_model:
        want = model.metrics(peft_model, rows)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert got["exact_match"] == want["exact_match"]
    assert demo_host.metrics(None, rows)["loss"] == pytest.approx(model.metrics(base, rows)["loss"], rel=1e-5)
    after = demo_host.model.get_base_model().state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_gradients_reach_the_flat_vector(demo_catalog, demo_host):
    adapter = load_adapter(demo_catalog.dirs["copy"])
    flat = to_flat(to_canonical(adapter, demo_host.layout)).requires_grad_(True)
    demo_host.loss(flat, eval_rows(demo_catalog, "copy")[:8]).backward()
    assert flat.grad is not None and flat.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in demo_host.model.parameters())


def test_factors_of_any_rank_work(demo_catalog, demo_host):
    """A cat fusion has rank 2r > r_max: the host still scores it exactly."""
    adapters = [load_adapter(demo_catalog.dirs[t]) for t in ("copy", "reverse")]
    fused = fuse_adapters(adapters, "cat", [0.5, 0.5]).adapter
    assert max(m.rank for m in fused.modules.values()) > demo_host.layout.r_max
    rows = eval_rows(demo_catalog, "reverse")
    model = demo_host.task_model
    with adapted(
        model.build_base(), fused_dir := _save(fused, demo_catalog.root / "cat-fused")
    ) as peft_model:
        want = model.metrics(peft_model, rows)["loss"]
    assert fused_dir.is_dir()
    assert demo_host.metrics(adapter_factors(fused, demo_host.layout), rows)["loss"] == pytest.approx(
        want, rel=1e-5
    )


def _save(adapter, path):
    from engine.adapters import save_adapter

    return save_adapter(adapter, path, overwrite=True)


def test_heads_are_substituted(bert_spec, tmp_path):
    model = task_model(bert_spec)
    base = model.build_base()
    adapter_dir = save_lora(
        base, tmp_path / "a", seed=3, target_modules=["query", "value"], modules_to_save=["classifier"]
    )
    adapter = load_adapter(adapter_dir)
    assert adapter.extras, "the classifier head travels with the adapter"
    layout = Layout.from_adapters([adapter], "tests/tiny-bert", r_max=4)
    host = LoraHost(model, layout)
    rows = sentiment_rows(12)
    with adapted(model.build_base(), adapter_dir) as peft_model:
        want = model.metrics(peft_model, rows)
    got = host.metrics(adapter_factors(adapter, layout), rows, head=adapter.extras)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5) and got["accuracy"] == want["accuracy"]
    with pytest.raises(TaskError, match="no matching parameter"):
        host.metrics(None, rows, head={"nonexistent.weight": torch.zeros(1)})


def test_a_layout_of_another_model_is_refused(bert_spec, demo_catalog):
    with pytest.raises(TaskError, match=r"no nn\.Linear"):
        LoraHost(task_model(bert_spec), demo_catalog.catalog.layout())


def test_objective_from_catalog_split_and_sampling(demo_catalog):
    catalog = demo_catalog.catalog
    objective = FewShotObjective.from_catalog(catalog, ["copy", "reverse"], catalog.layout(), k=6)
    assert {t: s.count for t, s in objective.shots.items()} == {"copy": 6, "reverse": 6}
    adapter = load_adapter(demo_catalog.dirs["copy"])
    flat = to_flat(to_canonical(adapter, catalog.layout()))
    assert objective.adapter_loss(adapter) == pytest.approx(float(objective.loss(flat)), rel=1e-5)
    # Each task's own adapter is better on its own task than the bare base.
    assert float(objective.task_loss(flat, "copy")) < float(objective.task_loss(None, "copy"))
    first, second = objective.split(0.5, seed=1)
    assert first.shots["copy"].count + second.shots["copy"].count == 6
    rows = lambda o: {tuple(r.tolist()) for r in o.shots["copy"].batch["input_ids"]}  # noqa: E731
    assert not rows(first) & rows(second)
    generator = torch.Generator().manual_seed(0)
    sampled = objective.loss(flat, ["copy"], sample=2, generator=generator)
    assert torch.isfinite(sampled)
    with pytest.raises(TaskError, match="no few-shot examples"):
        objective.loss(flat, ["sort"])


def test_objective_from_catalog_reads_the_chosen_split(demo_catalog):
    # Meta-training scores the train split so that fusion-time few shots (support) stay unseen.
    catalog = demo_catalog.catalog
    layout = catalog.layout()
    support = FewShotObjective.from_catalog(catalog, ["copy"], layout)
    train = FewShotObjective.from_catalog(catalog, ["copy"], layout, split="train")
    definition = load_task(catalog, "copy")
    splits = load_task_examples(definition, catalog)
    assert train.shots["copy"].count == splits.train.num_rows > 0
    rows = lambda o: {tuple(r.tolist()) for r in o.shots["copy"].batch["input_ids"]}  # noqa: E731
    assert not rows(train) & rows(support)


def test_predefined_split_column(demo_spec, tmp_path, demo_catalog):
    rows = [
        {"prompt": "<copy> 1 <sep>", "completion": "1", "split": s} for s in ["train", "support", "eval"] * 3
    ]
    path = write_jsonl(tmp_path / "all.jsonl", rows)
    definition = TaskDefinition(name="pre", model=demo_spec, examples=str(path), split={"column": "split"})
    splits = load_task_examples(definition)
    assert (splits.train.num_rows, splits.support.num_rows, splits.eval.num_rows) == (3, 3, 3)
    assert splits.eval.column_names == ["prompt", "completion"]
    assert list(splits.indices["support"]) == [1, 4, 7]
    bad = write_jsonl(tmp_path / "bad.jsonl", [dict(rows[0], split="test"), rows[1]])
    with pytest.raises(ExamplesError, match=r"row 0: split 'test'.*|no example has split 'eval'"):
        load_task_examples(definition.model_copy(update={"examples": str(bad)}))
    # Stored and read back from a catalog like any definition.
    save_task(demo_catalog.catalog, definition, overwrite=True)
    assert (
        json.loads(json.dumps(load_task(demo_catalog.catalog, "pre").split.model_dump()))["column"] == "split"
    )


def tiny_artifact(layout):
    from engine.fvae.artifact import FVAEArtifact
    from engine.fvae.config import FVAEConfig
    from engine.fvae.model import FVAE
    from engine.fvae.normalize import SlotNormalizer

    torch.manual_seed(0)
    model = FVAE(
        FVAEConfig(
            input_dim=layout.size, cond_dim=8, arch="conv", depth=4, channels=4, max_channels=8, latent_dim=16
        )
    )
    normalizer = SlotNormalizer(torch.zeros(layout.size), torch.full((layout.size,), 0.05))
    vectors = {t: torch.randn(8) for t in ("copy", "reverse")}
    return FVAEArtifact(model.eval(), normalizer, layout, vectors)


def test_icm_latent_refinement_lowers_the_support_loss(demo_catalog):
    catalog = demo_catalog.catalog
    layout = catalog.layout()
    artifact = tiny_artifact(layout)
    objective = FewShotObjective.from_catalog(catalog, ["copy", "reverse"], layout)
    adapters = [load_adapter(demo_catalog.dirs[t]) for t in ("copy", "reverse")]
    # The untrained decoder's absolute output (anchor off) is what the latent residual can move
    # most; anchored, the inputs' exact deltas dominate this toy decoder's displacement.
    common = dict(tasks=["copy", "reverse"], seed=0)
    plain = fuse_adapters(
        adapters, "icm", params={"anchor": False}, context=FusionContext(fvae=artifact), **common
    )
    refined = fuse_adapters(
        adapters,
        "icm",
        params={"refine_steps": 15, "refine_lr": 0.2, "refine_full_shots": 8, "anchor": False},
        context=FusionContext(fvae=artifact, objective=objective),
        **common,
    )
    record = refined.provenance["details"]["refine"]
    # The step is chosen by 4-fold cross-validation: its held-out gain beat its standard error,
    # and the kept step, refitted on all shots, lowers the whole support loss.
    assert record["selection"] == "cross-validation" and record["kept_step"] > 0
    assert record["cv_gain"][record["kept_step"]] > record["cv_se"][record["kept_step"]]
    assert objective.adapter_loss(refined.adapter) < objective.adapter_loss(plain.adapter)
    assert objective.adapter_loss(refined.adapter) == pytest.approx(record["support_loss_kept"], rel=1e-4)
    without_holdout = fuse_adapters(
        adapters,
        "icm",
        params={"refine_steps": 15, "refine_lr": 0.2, "refine_folds": 0, "anchor": False},
        context=FusionContext(fvae=artifact, objective=objective),
        **common,
    )
    record = without_holdout.provenance["details"]["refine"]
    assert record["support_loss_kept"] < record["support_loss_start"]
    assert objective.adapter_loss(without_holdout.adapter) == pytest.approx(
        record["support_loss_kept"], rel=1e-4
    )
    with pytest.raises(ValueError, match="needs few-shot examples"):
        fuse_adapters(
            adapters, "icm", params={"refine_steps": 2}, context=FusionContext(fvae=artifact), **common
        )


def test_icm_refinement_starts_from_and_keeps_the_partial_gate(demo_catalog, monkeypatch):
    import engine.fusion.icm.method as icm_module

    catalog = demo_catalog.catalog
    layout = catalog.layout()
    artifact = tiny_artifact(layout)
    artifact.meta.familiarity = Familiarity(reference=0.3)
    # copy is familiar, reverse cannot be represented: reverse enters by arithmetic
    monkeypatch.setattr(icm_module, "familiarity", lambda errors, reference: torch.tensor([1.0, 0.0]))
    objective = FewShotObjective.from_catalog(catalog, ["copy", "reverse"], layout)
    adapters = [load_adapter(demo_catalog.dirs[t]) for t in ("copy", "reverse")]
    common = dict(
        tasks=["copy", "reverse"], seed=0, context=FusionContext(fvae=artifact, objective=objective)
    )
    plain = fuse_adapters(adapters, "icm", **common)
    refined = fuse_adapters(
        adapters, "icm", params={"refine_steps": 10, "refine_lr": 0.2, "refine_folds": 0}, **common
    )
    for fused in (plain, refined):
        assert fused.provenance["details"]["familiarity"]["arithmetic_inputs"] == [1]
    record = refined.provenance["details"]["refine"]
    # step 0 of the refinement is the unrefined partial fusion; the best step is no worse
    assert record["support_loss_start"] == pytest.approx(objective.adapter_loss(plain.adapter), rel=1e-4)
    assert objective.adapter_loss(refined.adapter) == pytest.approx(record["support_loss_kept"], rel=1e-4)
    assert record["support_loss_kept"] <= record["support_loss_start"]


def test_cli_few_shot_methods_use_the_tasks_support_examples(demo_catalog, tmp_path):
    from engine.cli.main import main

    catalog = demo_catalog.catalog
    common = ["fuse", "--catalog", catalog.uri, "--tasks", "copy,reverse", "--shots", "4", "--seed", "1"]
    assert main([*common, "--method", "lorahub", "--param", "budget=6", "--out", str(tmp_path / "hub")]) == 0
    details = json.loads((tmp_path / "hub" / "icmf_provenance.json").read_text())["details"]
    assert len(details["weights"]) == 2
    artifact_dir = tiny_artifact(catalog.layout()).save(str(tmp_path / "fvae"))
    args = [
        "--method",
        "icm",
        "--model",
        artifact_dir,
        "--param",
        "refine_steps=3",
        "--param",
        "refine_span=true",
    ]
    assert main([*common, *args, "--out", str(tmp_path / "icm")]) == 0
    record = json.loads((tmp_path / "icm" / "icmf_provenance.json").read_text())["details"]["refine"]
    # 4 shots: 4-fold (leave-one-out) selection; the kept step's span weights are recorded.
    assert record["selection"] == "cross-validation" and record["folds"] == 4
    assert len(record["cv_gain"]) == record["steps"] + 1 and len(record["span_weights"]) == 2
    load_adapter(tmp_path / "icm")  # a stock, loadable adapter


def test_icm_conditions_unseen_tasks_on_given_in_context_vectors(demo_catalog):
    catalog = demo_catalog.catalog
    artifact = tiny_artifact(catalog.layout())
    artifact.meta.task_vector_source = TaskVectorSource(kind="context", dim=8)
    artifact.trained_vectors = {"copy": torch.randn(8)}  # 'reverse' was never seen
    adapters = [load_adapter(demo_catalog.dirs[t]) for t in ("copy", "reverse")]
    common = dict(tasks=["copy", "reverse"], seed=0)
    with pytest.raises(ValueError, match=r"no task vector.*icmf taskvec"):
        fuse_adapters(adapters, "icm", context=FusionContext(fvae=artifact), **common)
    with pytest.raises(ValueError, match="has 3 values"):
        fuse_adapters(
            adapters,
            "icm",
            context=FusionContext(fvae=artifact, task_vectors={"reverse": torch.ones(3)}),
            **common,
        )
    one = fuse_adapters(
        adapters,
        "icm",
        context=FusionContext(fvae=artifact, task_vectors={"reverse": torch.ones(8)}),
        **common,
    )
    two = fuse_adapters(
        adapters,
        "icm",
        context=FusionContext(fvae=artifact, task_vectors={"reverse": -torch.ones(8)}),
        **common,
    )
    name = next(iter(one.adapter.modules))
    assert not torch.allclose(one.adapter.modules[name].B, two.adapter.modules[name].B)  # the vector matters
