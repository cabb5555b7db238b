"""The paired bootstrap over eval examples: point estimates equal the unresampled G, a row compared
with itself is never separated, the pairing shares one draw across rows, and a real difference is
separated while noise is not."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.quality.bootstrap import SetSamples, mean_sums, paired_bootstrap
from engine.tasks.metrics import finalize_classification, gap_closure

pytestmark = pytest.mark.lab

N = 400


def _sums(correct: np.ndarray) -> dict[str, np.ndarray]:
    """Per-example classification sums: nll 0.1 when right, 2.0 when wrong."""
    correct = correct.astype(float)
    return {"nll": np.where(correct > 0, 0.1, 2.0), "correct": correct, "examples": np.ones(len(correct))}


def _lab(rng: np.random.Generator):
    """Two tasks: base right on 50 %, own on 90 %; a 'good' row on 85 %, a 'bad' one on 60 %,
    the 'bad' row right only where 'good' is (so their difference is the same on every example)."""
    base, own, good, bad = {}, {}, {}, {}
    for task in ("a", "b"):
        u = rng.random(N)
        base[task] = _sums(u < 0.5)
        own[task] = _sums(u < 0.9)
        good[task] = _sums(u < 0.85)
        bad[task] = _sums(u < 0.6)
    return base, own, good, bad


def _accuracy(sums):
    return finalize_classification({k: float(v.sum()) for k, v in sums.items()})["accuracy"]


def test_estimates_are_the_unresampled_gap_closures_and_rows_are_ranked():
    base, own, good, bad = _lab(np.random.default_rng(0))
    samples = [SetSamples(["a", "b"], {"good": good, "bad": bad, "good-again": dict(good)})]
    boot = paired_bootstrap(
        samples, base, own, finalize_classification, "accuracy", lower_is_better=False, replicates=300
    )
    for label, fused in (("good", good), ("bad", bad)):
        gaps = [gap_closure(-_accuracy(base[t]), -_accuracy(own[t]), -_accuracy(fused[t])) for t in "ab"]
        assert boot["rows"][label]["mean_gap"]["estimate"] == pytest.approx(sum(gaps) / 2)
        stat = boot["rows"][label]["mean_gap"]
        assert stat["low"] <= stat["estimate"] <= stat["high"] and stat["replicates"] == 300
    assert boot["best"] in ("good", "good-again") and boot["worst"] == "bad"
    assert boot["best_vs_worst"]["separated"] and boot["best_vs_worst"]["low"] > 0
    # A row against an identical row: the same draw for both, so the difference is exactly 0.
    same = next(d for d in boot["differences"] if {d["a"], d["b"]} == {"good", "good-again"})
    assert same["low"] == same["high"] == 0.0 and not same["separated"]
    # Equal up to float rounding (the same fusion summed in another order): not separated either.
    rounded = {t: {**good[t], "nll": good[t]["nll"] * (1 + 1e-9)} for t in good}
    rounding = paired_bootstrap(
        [SetSamples(["a", "b"], {"good": good, "rounded": rounded})],
        base,
        own,
        finalize_classification,
        "loss",
        lower_is_better=True,
        replicates=50,
    )["differences"][0]
    assert 0 < rounding["low"] <= rounding["high"] < 1e-6 and not rounding["separated"]
    assert boot["tied_with_best"] == [next(x for x in ("good", "good-again") if x != boot["best"])]
    # A reference row (e.g. the jointly trained ceiling) keeps its interval but is never the best.
    reference = paired_bootstrap(
        samples, base, own, finalize_classification, "accuracy", False, replicates=50, unranked=("good",)
    )
    assert reference["best"] == "good-again" and "good" in reference["rows"]


def test_noise_is_not_called_a_difference():
    rng = np.random.default_rng(1)
    base, own, good, _ = _lab(rng)
    # Two rows of the same quality that disagree example by example (independent errors).
    other = {t: _sums(rng.random(N) < _accuracy(good[t])) for t in "ab"}
    samples = [SetSamples(["a", "b"], {"one": good, "other": other})]
    boot = paired_bootstrap(
        samples, base, own, finalize_classification, "accuracy", lower_is_better=False, replicates=300
    )
    diff = boot["differences"][0]
    assert diff["low"] < 0 < diff["high"] and not diff["separated"]


def test_the_statistic_is_the_mean_over_task_sets_and_the_draw_is_seeded():
    base, own, good, bad = _lab(np.random.default_rng(2))
    samples = [SetSamples(["a"], {"r": {"a": good["a"]}}), SetSamples(["b"], {"r": {"b": bad["b"]}})]
    run = lambda seed: paired_bootstrap(  # noqa: E731
        samples,
        base,
        own,
        finalize_classification,
        "accuracy",
        lower_is_better=False,
        replicates=100,
        seed=seed,
    )
    first = run(0)
    gap = lambda t, fused: gap_closure(-_accuracy(base[t]), -_accuracy(own[t]), -_accuracy(fused))  # noqa: E731
    expected = (gap("a", good["a"]) + gap("b", bad["b"])) / 2
    assert first["rows"]["r"]["mean_gap"]["estimate"] == pytest.approx(expected)
    assert first == run(0) and first["rows"]["r"] != run(1)["rows"]["r"]


def test_mean_sums_average_runs_per_task_and_key():
    runs = [{"a": {"nll": np.array([1.0, 3.0])}}, {"a": {"nll": np.array([3.0, 5.0])}}]
    assert mean_sums(runs)["a"]["nll"].tolist() == [2.0, 4.0]


def test_a_task_without_a_gap_to_close_is_left_out_of_the_mean_as_in_the_table():
    base, own, good, _ = _lab(np.random.default_rng(3))
    own["b"] = base["b"]  # task b's own adapter does not beat the base: its G is undefined
    samples = [SetSamples(["a", "b"], {"good": good})]
    boot = paired_bootstrap(
        samples, base, own, finalize_classification, "accuracy", lower_is_better=False, replicates=50
    )
    only_a = gap_closure(-_accuracy(base["a"]), -_accuracy(own["a"]), -_accuracy(good["a"]))
    assert boot["rows"]["good"]["mean_gap"]["estimate"] == pytest.approx(only_a)
    assert boot["rows"]["good"]["mean_gap"]["replicates"] == 50


def test_the_chart_whisker_is_the_seed_interval_for_icm_rows_else_the_bootstrap():
    from benchmarks.fusion_quality import _whisker

    by_k = {
        "fvae_seeds": {"icm": {"mean_gap": {"low": 0.1, "high": 0.3}}},
        "bootstrap": {
            "rows": {
                "icm": {"mean_gap": {"low": 0.15, "high": 0.25}},
                "ties": {"mean_gap": {"low": 0.4, "high": 0.6}},
            }
        },
    }
    assert _whisker(by_k, "icm", "mean_gap") == (0.1, 0.3)
    assert _whisker(by_k, "ties", "mean_gap") == (0.4, 0.6)
    assert _whisker(by_k, "svd", "mean_gap") is None
