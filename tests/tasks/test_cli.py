"""``icmf task add|ls|show`` and ``icmf eval``: spellings, JSON output, one-line errors."""

from __future__ import annotations

import json
import shutil

import yaml

from engine.cli.main import main
from tests.helpers import bert_spec_dict, sentiment_rows, write_jsonl


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_task_add_ls_show(tmp_path, capsys):
    cat = str(tmp_path / "cat")
    spec = tmp_path / "bert.yaml"
    spec.write_text(yaml.safe_dump(bert_spec_dict()))
    rows = [{"sentence": r["text"], "y": r["label"]} for r in sentiment_rows(30)]
    examples = write_jsonl(tmp_path / "sst.jsonl", rows)
    code, out, err = run(
        capsys, "task", "add", "sst", "--catalog", cat, "--model", str(spec), "--examples", str(examples),
        "--field", "text=sentence", "--field", "label=y", "--split", "eval=10,support=4,seed=1",
    )  # fmt: skip
    assert code == 0, err
    assert "added task sst (seq_cls)" in out and "eval 10, support 4, train" in out
    code, out, _ = run(capsys, "task", "ls", "--catalog", cat, "--json")
    (listed,) = json.loads(out)
    assert listed["name"] == "sst" and listed["fields"] == {"text": "sentence", "label": "y"}
    assert (
        listed["split"]["eval"] == 10 and listed["split"]["seed"] == 1 and listed["model"]["num_labels"] == 3
    )
    assert listed["examples"] == str(examples) and listed["created"]
    stored = json.loads((tmp_path / "cat" / "tasks" / "sst.json").read_text())
    assert stored["name"] == "sst"
    code, out, _ = run(capsys, "task", "ls", "--catalog", cat)
    assert code == 0 and "sst" in out and "seq_cls" in out
    code, out, _ = run(capsys, "task", "show", "sst", "--catalog", cat)
    assert json.loads(out)["model"]["kind"] == "seq_cls"

    code, _, err = run(
        capsys,
        "task",
        "add",
        "sst",
        "--catalog",
        cat,
        "--model",
        str(spec),
        "--examples",
        str(examples),
        "--field",
        "text=sentence",
        "--field",
        "label=y",
    )
    assert code == 1 and "already exists" in err
    code, _, err = run(
        capsys, "task", "add", "sst", "--catalog", cat, "--model", str(spec), "--examples", str(examples),
        "--field", "text=sentence", "--field", "label=y", "--split", "eval=0.5,support=2", "--overwrite",
    )  # fmt: skip
    assert code == 0, err
    code, out, _ = run(capsys, "task", "ls", "--catalog", cat, "--json")
    assert json.loads(out)[0]["split"]["eval"] == 0.5


def test_task_add_reports_every_fault(tmp_path, capsys):
    cat = str(tmp_path / "cat")
    spec = tmp_path / "bad.json"
    spec.write_text(json.dumps({"kind": "seq_cls", "tokenizer": {"kind": "whitespace"}, "max_len": 3}))
    code, _, err = run(
        capsys, "task", "add", "t", "--catalog", cat, "--model", str(spec), "--examples", "x.jsonl"
    )
    assert code == 1 and err.startswith("icmf: error: ") and "bad.json: 4 fault(s)" in err
    for fault in (
        "max_len: unknown field",
        "path/config",
        "tokenizer.vocab: required",
        "num_labels: required",
    ):
        assert fault in err
    spec.write_text(json.dumps(bert_spec_dict()))
    examples = write_jsonl(tmp_path / "e.jsonl", [{"text": "good", "label": 0}] * 3)
    code, _, err = run(
        capsys,
        "task",
        "add",
        "../t",
        "--catalog",
        cat,
        "--model",
        str(spec),
        "--examples",
        str(examples),
        "--split",
        "evl=3,support=x",
    )
    assert code == 1
    assert "name: '../t' is invalid" in err and "split.evl: unknown field" in err and "split.support" in err
    code, _, err = run(
        capsys, "task", "add", "t", "--catalog", cat, "--model", str(spec), "--examples", str(examples)
    )
    assert (
        code == 1 and "cannot hold eval=1 + support=16" in err and "duplicate" not in err.split("cannot")[0]
    )
    code, _, err = run(
        capsys,
        "task",
        "add",
        "t",
        "--catalog",
        cat,
        "--model",
        str(spec),
        "--examples",
        str(tmp_path / "no.csv"),
    )
    assert code == 1 and "no.csv: no such file" in err
    code, out, _ = run(capsys, "task", "ls", "--catalog", cat, "--json")
    assert json.loads(out) == []  # nothing was written
    code, _, err = run(capsys, "task", "show", "nope", "--catalog", cat)
    assert code == 1 and "no task 'nope'" in err


def test_eval_command(demo_catalog, tmp_path, capsys):
    demo = demo_catalog
    fused = shutil.copytree(demo.dirs["copy"], tmp_path / "fused")
    common = (
        "eval",
        "--catalog",
        str(demo.root / "catalog"),
        "--tasks",
        "copy,reverse",
        "--adapter",
        str(fused),
        "--max-eval",
        "6",
    )
    code, out, err = run(capsys, *common, "--own", f"{demo.ids['copy']},{demo.ids['reverse']}", "--json")
    assert code == 0, err
    result = json.loads(out)
    copy, _ = result["tasks"]
    assert copy["own"] == {"id": demo.ids["copy"], "source": "explicit", "path": None}
    assert abs(copy["gap"] - 1.0) < 1e-3 and copy["examples"] == 6
    assert result["worst_task"] in ("copy", "reverse") and result["mean_gap"] is not None
    code, out, _ = run(capsys, *common)
    assert code == 0 and "mean G" in out and "catalog-first" in out and "reverse" in out
    code, _, err = run(capsys, *common[:4], "copy,nope", *common[5:])
    assert code == 1 and "no task 'nope'" in err
    code, _, err = run(capsys, *common[:6], str(tmp_path / "missing"))
    assert code == 1 and "not a directory" in err
