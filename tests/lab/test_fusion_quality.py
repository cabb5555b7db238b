"""The fusion_quality benchmark on the tiny lab: every baseline row scores, the own adapter's
numbers match the lab's record, reference rows are exact, and the results are written."""

from __future__ import annotations

import json

import pytest

from benchmarks.fusion_quality import main, task_sets
from benchmarks.quality.harness import SuiteHarness, own_adapter_id


def test_task_sets_are_distinct_sorted_and_seeded():
    tasks = list("abcdef")
    sets = task_sets(tasks, 3, 4, seed=0)
    assert len(sets) == 4 and len({tuple(s) for s in sets}) == 4
    assert all(s == sorted(s) and len(s) == 3 for s in sets)
    assert sets == task_sets(tasks, 3, 4, seed=0) != task_sets(tasks, 3, 4, seed=1)


def test_harness_own_adapter_matches_the_lab_record(tiny_lab):
    _, lab = tiny_lab
    harness = SuiteHarness.build(lab, "generative")
    suite = lab["suites"]["generative"]
    for task in harness.tasks:
        recorded = suite["adapters"][own_adapter_id(suite, task)]["eval"]
        assert harness.own_metrics[task]["loss"] == pytest.approx(recorded["loss"], rel=1e-4)
    same = harness.score(harness.own[harness.tasks[0]], harness.tasks[:1])
    assert same["mean_gap"] == pytest.approx(1.0, abs=1e-4)


@pytest.mark.slow
def test_baselines_run_and_write_results(tiny_lab, tmp_path):
    lab_dir, _ = tiny_lab
    results = main(
        [
            "--lab",
            str(lab_dir),
            "--suites",
            "generative,encoder",
            "--k",
            "2",
            "--sets",
            "1",
            "--no-icm",
            "--fewshot-k",
            "0",
            "--name",
            "fq",
            "--out-dir",
            str(tmp_path),
        ]
    )
    stored = json.loads((tmp_path / "fq.json").read_text())
    assert (tmp_path / "fq.png").stat().st_size > 0
    for suite in ("generative", "encoder"):
        summary = stored["suites"][suite]["by_k"]["2"]["summary"]
        assert {"base", "own", "ties", "lorahub", "task_arithmetic-fitted"} <= set(summary)
        assert summary["base"]["mean_loss"] > summary["own"]["mean_loss"]
        # cat and task_arithmetic (no truncation, same weights) are the same exact sum.
        assert summary["cat"]["mean_loss"] == pytest.approx(summary["task_arithmetic"]["mean_loss"], rel=1e-4)
    assert stored["suites"]["encoder"]["primary_gap"] == "gap_accuracy"
    assert results["seed"] == 0
