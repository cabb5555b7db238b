"""Examples from JSON Lines, CSV and Parquet; deterministic, disjoint splits."""

from __future__ import annotations

import pandas as pd
import pytest

from engine.tasks import ExamplesError, SplitSpec, load_examples, split_examples
from engine.tasks.examples import first_occurrences, split_indices
from tests.helpers import write_jsonl

ROWS = [
    {"question": f"<copy> {i % 10} <sep>", "answer": f"00{i % 7}", "label": i % 3, "extra": "x"}
    for i in range(40)
]
COLUMNS = {"prompt": "question", "completion": "answer"}


def write_all_formats(tmp_path, rows) -> dict[str, str]:
    frame = pd.DataFrame(rows)
    paths = {
        "json": str(write_jsonl(tmp_path / "ex.jsonl", rows)),
        "csv": str(tmp_path / "ex.csv"),
        "parquet": str(tmp_path / "ex.parquet"),
    }
    frame.to_csv(paths["csv"], index=False)
    frame.to_parquet(paths["parquet"], index=False)
    return paths


def test_three_formats_load_the_same_examples(tmp_path):
    paths = write_all_formats(tmp_path, ROWS)
    loaded = {fmt: load_examples(path, {**COLUMNS}) for fmt, path in paths.items()}
    expected = [{"prompt": r["question"], "completion": r["answer"]} for r in ROWS]
    for fmt, ds in loaded.items():
        assert ds.column_names == ["prompt", "completion"], fmt
        assert ds.to_list() == expected, fmt  # CSV keeps "003" a string
    labels = {
        fmt: load_examples(p, {"text": "question", "label": "label"})["label"] for fmt, p in paths.items()
    }
    assert labels["csv"] == labels["json"] == labels["parquet"] == [r["label"] for r in ROWS]


def test_custom_inputs_from_csv_strings_and_json_lists(tmp_path):
    write_jsonl(tmp_path / "x.jsonl", [{"input": [1, 2.5], "label": 1}])
    (tmp_path / "x.csv").write_text('input,label\n"1 2.5",1\n')
    for name in ("x.jsonl", "x.csv"):
        ds = load_examples(str(tmp_path / name), {"input": "input", "label": "label"})
        assert ds.to_list() == [{"input": [1.0, 2.5], "label": 1}]


def test_missing_columns_and_bad_rows_are_all_reported(tmp_path):
    path = str(write_jsonl(tmp_path / "ex.jsonl", ROWS))
    with pytest.raises(
        ExamplesError, match=r"missing field\(s\) completion \(column 'completion'\).*--field"
    ):
        load_examples(path, {"prompt": "question", "completion": "completion"})
    bad = [{"text": "a", "label": 0}, {"text": None, "label": "x"}, {"text": "b", "label": 5}]
    path = str(write_jsonl(tmp_path / "bad.jsonl", bad))
    with pytest.raises(ExamplesError) as info:
        load_examples(path, {"text": "text", "label": "label"}, num_labels=3)
    faults = info.value.faults
    assert len(faults) == 3
    assert "row 1, field text" in faults[0] and "row 1, field label" in faults[1] and "row 2" in faults[2]
    assert "outside [0, 3)" in faults[2]
    with pytest.raises(ExamplesError, match="no such file"):
        load_examples(str(tmp_path / "nope.jsonl"), {"text": "text"})
    with pytest.raises(ExamplesError, match="unknown format"):
        load_examples(str(tmp_path / "ex.txt"), {"text": "text"})


def test_split_is_deterministic_disjoint_and_eval_is_stable(tmp_path):
    ds = load_examples(str(write_jsonl(tmp_path / "ex.jsonl", ROWS)), COLUMNS)
    splits = split_examples(ds, SplitSpec(eval=10, support=4, seed=3, dedupe=False))
    ids = {name: set(idx.tolist()) for name, idx in splits.indices.items()}
    assert [len(ids[k]) for k in ("eval", "support", "train")] == [10, 4, 26]
    assert (
        not ids["eval"] & ids["support"]
        and not ids["eval"] & ids["train"]
        and not ids["support"] & ids["train"]
    )
    assert ids["eval"] | ids["support"] | ids["train"] == set(range(40))
    assert splits.eval.to_list() == ds.select(splits.indices["eval"]).to_list()
    again = split_examples(ds, SplitSpec(eval=10, support=4, seed=3, dedupe=False))
    assert again.eval.to_list() == splits.eval.to_list() and again.train.to_list() == splits.train.to_list()
    more_support = split_examples(ds, SplitSpec(eval=10, support=12, train=5, seed=3, dedupe=False))
    assert set(more_support.indices["eval"].tolist()) == ids["eval"]  # eval never moves
    assert len(more_support.train) == 5
    other_seed = split_examples(ds, SplitSpec(eval=10, support=4, seed=4, dedupe=False))
    assert set(other_seed.indices["eval"].tolist()) != ids["eval"]


def test_duplicates_never_cross_from_train_into_eval(tmp_path):
    # 40 rows but only 7 distinct (prompt, completion) pairs when keyed on answer alone.
    rows = [{"prompt": "p", "completion": r["answer"]} for r in ROWS]
    ds = load_examples(
        str(write_jsonl(tmp_path / "dup.jsonl", rows)), {"prompt": "prompt", "completion": "completion"}
    )
    splits = split_examples(ds, SplitSpec(eval=2, support=2, seed=0))
    assert splits.duplicates == 33 and len(splits.train) == 3
    eval_rows = {tuple(r.values()) for r in splits.eval.to_list()}
    other_rows = {tuple(r.values()) for r in splits.train.to_list() + splits.support.to_list()}
    assert not eval_rows & other_rows
    with pytest.raises(ExamplesError, match="cannot hold eval=2 \\+ support=16"):
        split_examples(ds, SplitSpec(eval=2), source="dup.jsonl")


def test_pure_split_helpers():
    train, support, held_out = split_indices(10, 3, 2, 4, seed=0)
    assert len(set(train) | set(support) | set(held_out)) == 9
    assert first_occurrences(["a", "b", "a", "c", "b"]).tolist() == [0, 1, 3]
