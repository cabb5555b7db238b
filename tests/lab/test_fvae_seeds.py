"""The icm rows over several F-VAE meta-training seeds: per-set seed means, the interval over
seeds, the table and the chart, on a fake harness whose scores are known in advance."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

import benchmarks.fusion_quality as fusion_quality
from benchmarks.quality.methods import MethodRow
from benchmarks.quality.seeds import seed_interval, seed_summary

pytestmark = pytest.mark.lab

T_975_DF2 = 4.302652729911275  # Student t, 97.5 % quantile, 2 degrees of freedom


def test_seed_interval_is_the_student_t_interval_of_the_mean():
    stat = seed_interval([1.0, 2.0, 3.0])
    assert stat["mean"] == 2.0 and stat["std"] == pytest.approx(1.0) and stat["n"] == 3
    half = T_975_DF2 / math.sqrt(3)
    assert (stat["low"], stat["high"]) == (pytest.approx(2.0 - half), pytest.approx(2.0 + half))
    single = seed_interval([0.7])
    assert single["mean"] == 0.7 and single["std"] is None and single["low"] is None
    with pytest.raises(ValueError, match="at least one seed"):
        seed_interval([])


def _fake_harness():
    """Task sets score ``G = 0.1 * fvae seed + 0.01 * set index`` for icm and 0.5 for the baseline."""

    def score(fused, subset):
        gap = fused["gap"] + 0.01 * SETS.index(subset)
        return {
            "mean_gap": gap,
            "worst_gap": gap - 0.2,
            "pooled_gap": gap,
            "mean_loss": 1.0 - gap,
            "tasks": {t: {"gap": gap, "loss": 1.0 - gap, "gap_accuracy": None} for t in subset},
        }

    def reference_rows(subset):
        return {
            label: {"mean_gap": g, "worst_gap": g, "pooled_gap": g, "mean_loss": 1.0}
            for label, g in (("base", 0.0), ("own", 1.0))
        }

    def score_examples(fused, subset):  # one example per task, whose "sum" is the row's G
        return score(fused, subset), {t: {"g": np.array([score(fused, subset)["mean_gap"]])} for t in subset}

    return SimpleNamespace(
        name="fake",
        own=dict.fromkeys("abc", None),
        score=score,
        score_examples=score_examples,
        reference_rows=reference_rows,
        objective=None,
    )


SETS = [["a", "b"], ["a", "c"]]


def test_icm_rows_are_reported_over_fvae_seeds(monkeypatch, tmp_path):
    runs = []

    def run_row(row, inputs, subset, seed, objective, fusion_args):
        runs.append((row.label, fusion_args.get("fvae")))
        gap = 0.5 if row.method != "icm" else 0.1 * fusion_args["fvae"]
        return {"gap": gap}, {}

    monkeypatch.setattr(fusion_quality, "run_row", run_row)
    rows, icm_rows = [MethodRow("linear", "linear")], [MethodRow("icm", "icm")]
    fusion_by_seed = {s: {"fvae": s} for s in (0, 1, 2)}
    samples = []
    entries = fusion_quality.evaluate_with_fvae_seeds(
        _fake_harness(), rows, icm_rows, SETS, 0, lambda *_: None, fusion_by_seed, samples=samples
    )
    # Per-example sums for the bootstrap: one record per set; icm's are the mean over the seeds.
    assert [s.tasks for s in samples] == SETS
    assert samples[1].rows["icm"]["c"]["g"] == pytest.approx([0.11])  # (0.01 + 0.11 + 0.21) / 3
    assert samples[1].rows["linear"]["c"]["g"] == pytest.approx([0.51])
    # The baseline runs once per set, icm once per set and seed.
    assert sorted(runs, key=str) == sorted(
        [("linear", 0)] * 2 + [("icm", s) for s in (0, 1, 2) for _ in SETS], key=str
    )
    first = entries[0]["methods"]["icm"]
    assert first["mean_gap"] == pytest.approx(0.1) and set(first["per_seed"]) == {"0", "1", "2"}
    assert first["per_seed"]["2"]["mean_gap"] == pytest.approx(0.2)
    # Each task's numbers are seed means as well (a value some seed lacks is left out).
    assert first["tasks"]["b"] == pytest.approx({"gap": 0.1, "loss": 0.9})
    assert fusion_quality.per_task_gaps(entries, ["c"])["icm"]["c"] == pytest.approx(0.11)
    summary = fusion_quality.summarize(entries)
    assert summary["icm"]["mean_gap"] == pytest.approx(0.105)  # mean over sets and seeds
    assert summary["linear"]["mean_gap"] == pytest.approx(0.505)
    seeded = seed_summary(entries, ["icm", "linear"])
    assert set(seeded) == {"icm"} and seeded["icm"]["seeds"] == [0, 1, 2]
    gap = seeded["icm"]["mean_gap"]
    assert gap["values"] == pytest.approx([0.005, 0.105, 0.205])
    assert gap["std"] == pytest.approx(0.1)
    assert gap["high"] - gap["mean"] == pytest.approx(T_975_DF2 * 0.1 / math.sqrt(3))
    assert seeded["icm"]["worst_gap"]["mean"] == pytest.approx(-0.095)

    # The table and the chart show them.
    results = {
        "sets_per_k": 2,
        "suites": {"fake": {"primary_gap": "gap", "by_k": {"2": {"summary": summary, "fvae_seeds": seeded}}}},
    }
    text = fusion_quality.table(results)
    assert "icm rows over F-VAE meta-training seeds [0, 1, 2]" in text
    assert f"| icm | {gap['mean']:.2f} ± 0.10 [{gap['low']:.2f}, {gap['high']:.2f}] |" in text
    fusion_quality.plot(results, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").stat().st_size > 0


def test_one_fvae_seed_keeps_the_single_run_layout(monkeypatch):
    monkeypatch.setattr(fusion_quality, "run_row", lambda row, *a: ({"gap": 0.3}, {}))
    entries = fusion_quality.evaluate_with_fvae_seeds(
        _fake_harness(),
        [MethodRow("linear", "linear")],
        [MethodRow("icm", "icm")],
        SETS,
        0,
        lambda *_: None,
        {0: {"fvae": 0}},
    )
    assert "per_seed" not in entries[0]["methods"]["icm"]
    assert list(entries[0]["methods"]) == ["base", "own", "linear", "icm"]
