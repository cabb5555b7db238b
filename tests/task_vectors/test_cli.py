"""``icmf taskvec``: stores vectors, JSON output, argument faults listed at once, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from engine.cli.main import main
from engine.task_vectors import compute_task_vectors, load_task_vectors


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_taskvec_stores_and_prints(tv_catalog, capsys):
    cat = tv_catalog.catalog.uri
    code, out, err = run(capsys, "taskvec", "--catalog", cat, "--task", "copy,reverse", "--k", "4", "--local")
    assert code == 0, err
    assert "copy" in out and "reverse" in out and "64" in out and "2 task vector(s)" in err
    stored = load_task_vectors(cat, ["copy", "reverse"])
    expected = compute_task_vectors(cat, ["copy"], k=4, use_ray=False)["copy"]
    torch.testing.assert_close(stored["copy"].vector, expected.vector)

    rows = tv_catalog.files["reverse"]
    code, out, err = run(capsys, "taskvec", "--catalog", cat, "--task", "reverse", "--examples", str(rows),
                         "--k", "5", "--no-adapter", "--local", "--no-save", "--json")  # fmt: skip
    assert code == 0, err
    (record,) = json.loads(out)["vectors"]
    assert record["k"] == 5 and record["with_adapter"] is False and record["adapters"] == []
    assert record["examples_source"] == str(rows) and len(record["vector"]) == record["dim"] == 64
    assert load_task_vectors(cat, ["reverse"])["reverse"].k == 4  # --no-save left the stored one


def test_taskvec_all_tasks_with_a_definition(tv_catalog, tmp_path, capsys):
    import shutil

    shutil.copytree(tv_catalog.root / "catalog", tmp_path / "cat")
    cat = str(tmp_path / "cat")
    code, out, err = run(capsys, "taskvec", "--catalog", cat, "--all", "--k", "3", "--local", "--json")
    assert code == 0, err
    assert sorted(v["task"] for v in json.loads(out)["vectors"]) == ["copy", "reverse", "sst"]
    assert sorted(load_task_vectors(cat)) == ["copy", "reverse", "sst"]


@pytest.mark.parametrize(
    "argv, messages",
    [
        ([], ["name the tasks"]),
        (["--all", "--task", "copy", "--k", "0"], ["not both", "--k must be >= 1"]),
        (["--task", "copy,reverse", "--examples", "x.jsonl", "--adapter", "copy-1"],
         ["exactly one --task", "--adapter ID is for exactly one --task"]),
        (["--task", "copy", "--no-adapter", "--adapter", "all"], ["contradict"]),
    ],
)  # fmt: skip
def test_taskvec_argument_faults_listed_together(tv_catalog, capsys, argv, messages):
    code, _, err = run(capsys, "taskvec", "--catalog", tv_catalog.catalog.uri, *argv)
    assert code == 1 and err.startswith("icmf: error:") and err.count("\n") == 1
    assert all(m in err for m in messages), err


def test_taskvec_library_errors_are_one_line(tv_catalog, capsys):
    code, _, err = run(
        capsys, "taskvec", "--catalog", tv_catalog.catalog.uri, "--task", "copy", "--k", "99", "--local"
    )
    assert code == 1 and "fewer than k=99" in err and err.count("\n") == 1
