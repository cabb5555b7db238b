"""The tiny lab end to end: example files, adapters in PEFT and in the catalogs, cache, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.lab.config import ATTENTION_AND_MLP, SIZES
from benchmarks.lab.examples import read_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.lab]

TINY = SIZES["tiny"]


def _examples(manifest, suite):
    return {
        t: {s: read_jsonl(p) for s, p in task["examples"].items()}
        for t, task in manifest["suites"][suite]["tasks"].items()
    }


def test_manifest_layout(tiny_lab):
    _, lab = tiny_lab
    assert lab["format"] == "icmf-lab/1" and lab["size"] == "tiny" and lab["seed"] == 0
    enc, gen = lab["suites"]["encoder"], lab["suites"]["generative"]
    assert set(enc["tasks"]) == set(TINY.encoder.tasks) and set(gen["tasks"]) == set(TINY.generative.tasks)
    assert Path(enc["base_model"]["path"], "model.safetensors").is_file()
    assert Path(gen["base_model"]["path"], "model.safetensors").is_file()
    assert Path(gen["tokenizer"]["path"]).is_file()
    assert Path(lab["chart"]).read_bytes().startswith(b"\x89PNG")
    for suite in (enc, gen):
        assert set(suite["catalogs"]) == {"main", "longtail", "fewshot-k8"}
        assert {row["task"] for row in suite["report"]} == set(suite["tasks"])


def test_encoder_examples_valid_and_disjoint(tiny_lab):
    _, lab = tiny_lab
    for name, splits in _examples(lab, "encoder").items():
        task = lab["suites"]["encoder"]["tasks"][name]
        for split, rows in splits.items():
            assert len(rows) == task["sizes"][split] > 0
            for row in rows:
                assert set(row) == {"text", "label"} and isinstance(row["text"], str) and row["text"]
                assert isinstance(row["label"], int) and 0 <= row["label"] < task["num_classes"]
        texts = {s: {r["text"] for r in rows} for s, rows in splits.items()}
        assert not texts["train"] & texts["eval"] and not texts["train"] & texts["support"]
        assert not texts["support"] & texts["eval"]


def test_generative_examples_valid_and_disjoint(tiny_lab):
    _, lab = tiny_lab
    from benchmarks.lab.generative_tasks import TASKS

    prompts_by_task = {}
    for name, splits in _examples(lab, "generative").items():
        for rows in splits.values():
            for row in rows:
                assert set(row) == {"prompt", "completion"}
                word = row["prompt"].removeprefix(f"{name}:").removesuffix("=")
                assert row["completion"] == TASKS[name](word)
        words = {s: {r["prompt"].split(":")[1] for r in rows} for s, rows in splits.items()}
        assert (
            not words["train"] & (words["eval"] | words["support"]) and not words["support"] & words["eval"]
        )
        prompts_by_task[name] = [r["prompt"].split(":")[1] for r in splits["eval"]]
    # Same eval inputs for every task: the tasks conflict on identical inputs.
    assert len({tuple(v) for v in prompts_by_task.values()}) == 1


def test_catalogs_hold_every_variant_with_the_right_tasks(tiny_lab):
    from engine.catalog import Catalog

    _, lab = tiny_lab
    for suite, size in (("encoder", TINY.encoder), ("generative", TINY.generative)):
        data = lab["suites"][suite]
        plan = size.adapters
        for variant, info in data["catalogs"].items():
            catalog = Catalog(info["uri"])
            expected = {t: len(ids) for t, ids in info["adapters"].items()}
            assert catalog.tasks() == expected
            if variant == "main":
                assert set(expected.values()) == {plan.runs * len(plan.checkpoints)}
            elif variant == "longtail":
                assert expected == info["counts"] and max(expected.values()) == plan.longtail[0]
                main = data["catalogs"]["main"]["adapters"]
                assert all(set(ids) <= set(main[t]) for t, ids in info["adapters"].items())
            else:
                assert set(expected.values()) == {plan.fewshot_seeds}
            for entry in catalog.entries():
                assert entry["id"] in info["adapters"][entry["task"]]
                assert f"variant={variant}" in entry["tags"]
                meta = data["adapters"][entry["id"]]
                assert meta["task"] == entry["task"]
                assert variant == "longtail" or meta["variant"] == variant
                assert entry["base_model"] == data["base_model"]["id"]
            if suite == "encoder":
                assert all(e["extras"] == ["classifier.bias", "classifier.weight"] for e in catalog.entries())


def test_encoder_adapter_loads_in_peft_and_matches_its_recorded_score(tiny_lab):
    from peft import PeftModel

    from benchmarks.lab import encoder as E

    _, lab = tiny_lab
    enc = lab["suites"]["encoder"]
    meta = next(m for m in enc["adapters"].values() if m["variant"] == "main" and m["step"] == 4)
    config = json.loads(Path(meta["path"], "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "lab/minilm-l6"
    assert config["target_modules"] == sorted(ATTENTION_AND_MLP) == sorted(enc["lora"]["target_modules"])
    model = PeftModel.from_pretrained(E.load_base(enc["base_model"]["num_labels"]), meta["path"]).eval()
    # Every attention and MLP linear of the adapted (top) layer, and nothing else (not the pooler).
    adapted = sorted(
        n.removesuffix(".lora_A.default") for n, _ in model.named_modules() if n.endswith("lora_A.default")
    )
    layer = "base_model.model.bert.encoder.layer.5"
    assert adapted == [
        f"{layer}.{m}"
        for m in (
            "attention.output.dense",
            "attention.self.key",
            "attention.self.query",
            "attention.self.value",
            "intermediate.dense",
            "output.dense",
        )
    ]
    rows = read_jsonl(enc["tasks"][meta["task"]]["examples"]["eval"])
    tokenizer = E.load_tokenizer()
    batch = tokenizer(
        [r["text"] for r in rows],
        padding=True,
        truncation=True,
        max_length=enc["tokenizer"]["max_length"],
        return_tensors="pt",
    )
    with torch.no_grad():
        logits = model(**batch).logits
    labels = torch.tensor([r["label"] for r in rows])
    # The full stock forward reproduces the score the lab computed through its cached lower layers.
    accuracy = float((logits.argmax(-1) == labels).float().mean())
    assert accuracy == pytest.approx(meta["eval"]["accuracy"], abs=1e-6)
    loss = float(torch.nn.functional.cross_entropy(logits, labels))
    assert loss == pytest.approx(meta["eval"]["loss"], rel=1e-4)
    # The base-head file is the 'frozen base + linear head' baseline, loadable into the head.
    from safetensors.torch import load_file

    head = load_file(enc["tasks"][meta["task"]]["base_head"]["path"])
    assert head["classifier.weight"].shape == (enc["base_model"]["num_labels"], 384)


def test_generative_adapter_loads_in_peft_and_matches_its_recorded_score(tiny_lab):
    from peft import PeftModel

    from benchmarks.lab import generative as G
    from engine.tasks.chartok import CharTokenizer

    _, lab = tiny_lab
    gen = lab["suites"]["generative"]
    meta = next(m for m in gen["adapters"].values() if m["variant"] == "main" and m["step"] == 4)
    model = PeftModel.from_pretrained(G.load_base(gen["base_model"]["path"]), meta["path"]).eval()
    tokenizer = CharTokenizer.load(gen["tokenizer"]["path"])
    rows = read_jsonl(gen["tasks"][meta["task"]]["examples"]["eval"])
    scores = G.evaluate(model, tokenizer, rows)
    assert scores["loss"] == pytest.approx(meta["eval"]["loss"], rel=1e-4)
    assert scores["exact_match"] == meta["eval"]["exact_match"]


def test_rerun_is_a_no_op(tiny_lab):
    from benchmarks.lab.build import build_lab
    from engine.catalog import Catalog

    out, lab = tiny_lab
    # Everything but the two summaries (lab.json, report.png), which every build rewrites.
    files = {
        p: p.stat().st_mtime_ns
        for p in out.rglob("*")
        if p.is_file() and p.name not in ("lab.json", "report.png")
    }
    again = build_lab(out, size="tiny", seed=0, quiet=True)
    assert len(again["build"]["cached_jobs"]) == again["build"]["jobs"] == 5
    for suite, data in lab["suites"].items():
        for variant, info in data["catalogs"].items():
            assert Catalog(info["uri"]).version() == info["version"]
            assert again["suites"][suite]["catalogs"][variant]["adapters"] == info["adapters"]
    assert {p: p.stat().st_mtime_ns for p in files} == files  # nothing rewritten


def test_same_seed_rebuild_is_identical(tiny_lab, tmp_path):
    """A second build from scratch gives byte-identical example files and the same adapters
    (catalog ids are sha256 of the adapter files)."""
    from benchmarks.lab.build import build_lab

    out, lab = tiny_lab
    other = build_lab(tmp_path / "again", size="tiny", seed=0, quiet=True)
    for suite in ("encoder", "generative"):
        for path in sorted((out / suite / "examples").rglob("*.jsonl")):
            twin = tmp_path / "again" / path.relative_to(out)
            assert twin.read_bytes() == path.read_bytes()
        assert set(other["suites"][suite]["adapters"]) == set(lab["suites"][suite]["adapters"])


def test_a_lab_directory_refuses_another_seed(tiny_lab):
    from benchmarks.lab.build import build_lab

    out, _ = tiny_lab
    with pytest.raises(ValueError, match="seed=0"):
        build_lab(out, size="tiny", seed=1, quiet=True)


def test_report_command_prints_the_table(tiny_lab, capsys):
    from benchmarks.lab.__main__ import main

    out, _ = tiny_lab
    assert main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "encoder suite" in text and "vader-sign" in text and "generative suite" in text


def test_worker_pool_build_matches_the_in_process_build(tiny_lab, tmp_path):
    """Two spawned workers (other string-hash seeds, the pretraining dependency, the progress
    queue) produce the very adapters the in-process build made."""
    from benchmarks.lab.build import build_lab

    _, lab = tiny_lab
    pooled = build_lab(tmp_path / "pooled", size="tiny", seed=0, workers=2, quiet=True)
    assert pooled["build"]["workers"] == 2 and not pooled["build"]["cached_jobs"]
    for suite in ("encoder", "generative"):
        assert (
            pooled["suites"][suite]["catalogs"]["main"]["adapters"]
            == lab["suites"][suite]["catalogs"]["main"]["adapters"]
        )
        assert set(pooled["suites"][suite]["adapters"]) == set(lab["suites"][suite]["adapters"])
