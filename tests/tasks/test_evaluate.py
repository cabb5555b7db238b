"""evaluate_fusion: numbers checked against direct computations; own-adapter resolution; provenance."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import PeftModel

from engine.tasks import (
    PROVENANCE_FILE,
    TaskError,
    evaluate_fusion,
    load_task,
    load_task_examples,
    read_provenance,
    resolve_own,
    task_model,
)
from engine.tasks.metrics import gap_closure, summarize_gaps
from tests.helpers import rewrite_weights


def zero_adapter(source, target):
    """A copy of ``source`` with every lora_B zero: it changes nothing."""
    shutil.copytree(source, target)
    rewrite_weights(target, lambda t: {k: v * 0 if "lora_B" in k else v for k, v in t.items()})
    return target


def write_provenance(adapter_dir, inputs, method="test"):
    (adapter_dir / PROVENANCE_FILE).write_text(json.dumps({"method": method, "inputs": inputs}))


def direct_loss(demo, task, adapter_dir=None) -> float:
    """Completion-token loss on the task's eval split via transformers' own ``labels`` loss."""
    definition = load_task(demo.catalog, task)
    model = task_model(definition.model)
    net = model.build_base()
    if adapter_dir is not None:
        net = PeftModel.from_pretrained(net, str(adapter_dir))
    batch = model.encode(load_task_examples(definition, demo.catalog).eval.to_list())
    with torch.no_grad():
        return float(net(input_ids=batch["input_ids"], labels=batch["labels"]).loss)


def test_fused_equal_to_own_closes_the_gap(demo_catalog, tmp_path):
    demo = demo_catalog
    fused = shutil.copytree(demo.dirs["copy"], tmp_path / "fused")
    write_provenance(
        fused,
        [
            {"id": demo.ids["copy"], "task": "copy", "weight": 0.5},
            {"id": demo.ids["reverse"], "task": "reverse", "weight": 0.5},
        ],
    )
    result = evaluate_fusion(demo.catalog, ["copy", "reverse"], fused, batch_size=10)
    copy, reverse = result.tasks
    assert result.method == "test" and copy.examples == reverse.examples == 24
    assert (copy.own.id, copy.own.source) == (demo.ids["copy"], "provenance")
    assert (reverse.own.id, reverse.own.source) == (demo.ids["reverse"], "provenance")
    # Against direct computations with stock transformers / PEFT.
    for r in (copy, reverse):
        assert r.base["loss"] == pytest.approx(direct_loss(demo, r.task), rel=1e-5)
        assert r.own_metrics["loss"] == pytest.approx(direct_loss(demo, r.task, demo.dirs[r.task]), rel=1e-4)
        assert r.own_metrics["loss"] < r.base["loss"] - 0.05  # the trained adapters help
        assert r.fused["perplexity"] == pytest.approx(torch.tensor(r.fused["loss"]).exp().item(), rel=1e-6)
        assert set(r.fused) == {"loss", "perplexity", "exact_match", "examples", "tokens"}
    assert reverse.fused["loss"] == pytest.approx(direct_loss(demo, "reverse", fused), rel=1e-5)
    assert copy.gap == pytest.approx(1.0, abs=1e-3)
    expected = (reverse.base["loss"] - reverse.fused["loss"]) / (
        reverse.base["loss"] - reverse.own_metrics["loss"]
    )
    assert reverse.gap == pytest.approx(expected, rel=1e-9)
    assert result.mean_gap == pytest.approx((copy.gap + reverse.gap) / 2)
    worst = min((copy, reverse), key=lambda r: r.gap)
    assert result.worst_gap == worst.gap and result.worst_task == worst.task
    assert json.loads(json.dumps(result.to_dict()))["tasks"][0]["own"]["source"] == "provenance"


def test_zero_adapter_closes_nothing(demo_catalog, tmp_path):
    demo = demo_catalog
    fused = zero_adapter(demo.dirs["copy"], tmp_path / "zero")
    result = evaluate_fusion(demo.catalog, ["copy", "reverse"], fused, max_eval=8)
    for r in result.tasks:
        assert r.examples == 8 and r.own.source == "catalog-first"  # no provenance
        assert r.fused["loss"] == pytest.approx(r.base["loss"], abs=1e-7)
        assert r.gap == pytest.approx(0.0, abs=1e-5)


def test_own_adapter_without_improvement_gives_no_gap(demo_catalog, tmp_path):
    demo = demo_catalog
    own = zero_adapter(demo.dirs["reverse"], tmp_path / "own-zero")
    fused = shutil.copytree(demo.dirs["copy"], tmp_path / "fused")
    write_provenance(fused, [{"id": str(own), "task": "reverse"}])  # an adapter directory, not an id
    result = evaluate_fusion(
        demo.catalog, ["copy", "reverse"], fused, own=[f"copy={demo.ids['copy']}"], max_eval=8
    )
    copy, reverse = result.tasks
    assert copy.own.source == "explicit" and reverse.own.path == str(own)
    assert reverse.gap is None and "gap closure is undefined" in reverse.note
    assert result.mean_gap == pytest.approx(copy.gap) and result.worst_task == "copy"


def test_resolve_own_precedence_and_errors(demo_catalog, tmp_path):
    demo = demo_catalog
    provenance = read_provenance(
        _with_provenance(tmp_path, [{"id": demo.ids["copy-random"], "task": "copy"}])
    )
    chosen = resolve_own(demo.catalog, ["copy", "reverse"], provenance)
    assert chosen["copy"].id == demo.ids["copy-random"] and chosen["copy"].source == "provenance"
    assert chosen["reverse"].id == demo.ids["reverse"] and chosen["reverse"].source == "catalog-first"
    chosen = resolve_own(demo.catalog, ["copy"], provenance, own=[demo.ids["copy"]])  # task looked up
    assert chosen["copy"].id == demo.ids["copy"] and chosen["copy"].source == "explicit"
    with pytest.raises(TaskError, match="not among the evaluated tasks"):
        resolve_own(demo.catalog, ["copy"], None, own=[demo.ids["reverse"]])
    with pytest.raises(TaskError, match="two adapters for task 'copy'"):
        resolve_own(demo.catalog, ["copy"], None, own=[demo.ids["copy"], f"copy={demo.ids['copy-random']}"])
    with pytest.raises(TaskError, match="has no adapter in catalog"):
        resolve_own(demo.catalog, ["sort"], None)
    with pytest.raises(ValueError, match="no adapter 'copy-000000000000'"):
        resolve_own(demo.catalog, ["copy"], None, own=["copy=copy-000000000000"])
    stray = read_provenance(_with_provenance(tmp_path / "b", [{"id": "gone-1", "task": "copy"}]))
    with pytest.raises(TaskError, match="neither in catalog"):
        resolve_own(demo.catalog, ["copy"], stray)


def _with_provenance(path, inputs):
    path.mkdir(parents=True, exist_ok=True)
    write_provenance(path, inputs)
    return path


def test_bad_provenance_names_the_file(tmp_path):
    assert read_provenance(tmp_path) is None
    (tmp_path / PROVENANCE_FILE).write_text('{"inputs": [{"id": 3}]}')
    with pytest.raises(TaskError, match=r"icmf_provenance.json: inputs\[0\] needs string 'id' and 'task'"):
        read_provenance(tmp_path)
    (tmp_path / PROVENANCE_FILE).write_text("{")
    with pytest.raises(TaskError, match="invalid JSON"):
        read_provenance(tmp_path)


def test_gap_math():
    assert gap_closure(2.0, 1.0, 1.5) == 0.5
    assert gap_closure(2.0, 1.0, 2.5) == -0.5
    assert gap_closure(2.0, 2.0, 1.0) is None and gap_closure(2.0, 2.5, 1.0) is None
    assert gap_closure(2.0, 2.0 - 1e-9, 1.0) is None
    assert summarize_gaps({"a": 1.0, "b": None, "c": -0.5}) == (0.25, -0.5, "c")
    assert summarize_gaps({"a": None}) == (None, None, None)


def test_fused_classifier_is_scored_with_the_tasks_own_head(tmp_path, bert_spec, bert_task):
    """A fused LoRA carries no head; each classification task is scored with its own head."""
    from engine.catalog import Catalog
    from engine.fusion import fuse_from_catalog
    from engine.tasks import TaskDefinition, evaluate_fusion, save_task
    from tests.helpers import rewrite_weights, save_lora, sentiment_rows, write_jsonl

    catalog = Catalog(tmp_path / "cat")
    base = bert_task.build_base()
    own = save_lora(
        base, tmp_path / "own", seed=3, target_modules=["query", "value"], modules_to_save=["classifier"]
    )
    # PEFT starts the saved head as a copy of the base's; make it the task's own, clearly different.
    rewrite_weights(own, lambda t: {k: (v * 25 if "classifier" in k else v) for k, v in t.items()})
    catalog.ingest([own], task="senti", base_model="tests/bert")
    examples = write_jsonl(tmp_path / "senti.jsonl", sentiment_rows(40))
    save_task(
        catalog,
        TaskDefinition(name="senti", model=bert_spec, examples=str(examples), split={"eval": 16, "seed": 0}),
    )
    result = fuse_from_catalog(catalog, "cat", tasks=["senti"], weights=[1.0])
    assert not result.adapter.extras  # fusion drops per-task heads
    fused_dir = result.save(tmp_path / "fused")
    (task_eval,) = evaluate_fusion(catalog, ["senti"], fused_dir).tasks
    assert task_eval.fused["loss"] == pytest.approx(task_eval.own_metrics["loss"], rel=1e-5)
    assert abs(task_eval.fused["loss"] - task_eval.base["loss"]) > 0.05
