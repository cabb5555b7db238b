"""The fusion_quality benchmark on the tiny lab: every baseline row scores, the own adapter's
numbers match the lab's record, reference rows are exact, and the results are written."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.fusion_quality import main, task_sets
from benchmarks.quality.harness import SuiteHarness, own_adapter_id

pytestmark = pytest.mark.lab


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
    assert same["pooled_gap"] == pytest.approx(1.0, abs=1e-4)


def test_pooled_gap_weights_tasks_by_the_gap_they_can_close():
    from types import SimpleNamespace

    metrics = lambda a, b: {"a": {"accuracy": a}, "b": {"accuracy": b}}  # noqa: E731
    harness = SimpleNamespace(base_metrics=metrics(0.5, 0.70), own_metrics=metrics(0.6, 0.72))
    fused = {"a": {"fused": {"accuracy": 0.6}}, "b": {"fused": {"accuracy": 0.70}}}
    # Per-task G is 1 and 0 (mean 0.5); the pooled one counts task a's larger closable gap.
    pooled = SuiteHarness._pooled(harness, fused, "accuracy", lower_is_better=False)
    assert pooled == pytest.approx(0.10 / 0.12)
    assert SuiteHarness._pooled(harness, fused, "accuracy", lower_is_better=True) is None


@pytest.mark.slow
@pytest.mark.timeout(1500)  # every baseline on both tiny suites; ~10 min on a loaded 2-core machine
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
            "--bootstrap",
            "200",
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
        if suite == "generative":  # the encoder's LP-FT heads are over-confident: G is on accuracy there
            assert summary["base"]["mean_loss"] > summary["own"]["mean_loss"]
        # cat and task_arithmetic (no truncation, same weights) are the same exact sum.
        assert summary["cat"]["mean_loss"] == pytest.approx(summary["task_arithmetic"]["mean_loss"], rel=1e-4)
        # Paired-bootstrap intervals around every fused row's estimate, which is the table's value.
        boot = stored["suites"][suite]["by_k"]["2"]["bootstrap"]
        assert set(boot["rows"]) == set(summary) - {"base", "own"}
        primary = "mean_gap_accuracy" if suite == "encoder" else "mean_gap"
        for label, stats in boot["rows"].items():
            stat = stats["mean_gap"]
            assert stat["estimate"] == pytest.approx(summary[label][primary])
            assert stat["low"] is None or stat["low"] <= stat["estimate"] + 1e-9 <= stat["high"] + 2e-9
        assert {"best", "worst", "best_vs_worst", "tied_with_best"} <= set(boot)
    assert stored["suites"]["encoder"]["primary_gap"] == "gap_accuracy"
    assert results["seed"] == 0


@pytest.mark.slow
@pytest.mark.ray
def test_icm_rows_with_in_context_task_vectors(tiny_lab, tmp_path, monkeypatch, ray_session):
    # The paper's recipe end to end: task vectors from k support examples (Ray Data), an F-VAE
    # meta-trained on them (Ray Train), and the unseen tasks conditioned on vectors from their
    # own examples at fusion time.
    import benchmarks.fusion_quality as fusion_quality
    import benchmarks.quality.icm as icm_module

    lab_dir, _ = tiny_lab
    monkeypatch.setattr(icm_module, "CACHE", tmp_path / "fvae")
    monkeypatch.setattr(icm_module, "TASK_VECTOR_K", 4)
    training = dict(icm_module.SUITE_TRAINING["generative"])
    training["train"] = {**training["train"], "steps": 4, "max_tasks": 2, "shots_per_task": 2}
    monkeypatch.setitem(icm_module.SUITE_TRAINING, "generative", training)
    monkeypatch.setitem(fusion_quality.REFINE_STEPS, "generative", 2)
    args = ["--lab", str(lab_dir), "--suites", "generative", "--k", "2", "--sets", "1"]
    args += ["--no-ceiling", "--methods", "task_arithmetic", "--task-vectors", "context"]
    main([*args, "--fewshot-k", "2", "--bootstrap", "100", "--name", "fq", "--out-dir", str(tmp_path)])
    suite = json.loads((tmp_path / "fq.json").read_text())["suites"]["generative"]
    # The few-shot scenario (every kept task when fewer than 4) gets the intervals too.
    fewshot = suite["fewshot"]
    assert fewshot["k"] == 2 and set(fewshot["bootstrap"]["rows"]) == {"icm+refine+span"}
    assert fewshot["bootstrap"]["rows"]["icm+refine+span"]["mean_gap"]["estimate"] == pytest.approx(
        fewshot["summary"]["icm+refine+span"]["mean_gap"]
    )
    assert suite["fvae"]["config"]["task_vectors"] == {"source": "context"}
    artifact = json.loads((tmp_path / "fvae").glob("*/fvae/artifact.json").__next__().read_text())
    assert artifact["task_vector_source"]["kind"] == "context"
    assert set(artifact["tasks"]).isdisjoint(suite["unseen"])
    summary = suite["by_k"]["2"]["summary"]
    assert {"icm", "icm+refine+span"} <= set(summary)
    assert all(math.isfinite(summary[row]["mean_loss"]) for row in ("icm", "icm+refine+span"))
    # Two meta-training seeds: a second F-VAE (the first is cached), icm rows with their spread;
    # and the new-run scenario, with its own two F-VAEs (each task's own run kept out).
    seeds = ["--fewshot-k", "0", "--icm-methods", "icm", "--fvae-seeds", "0,1", "--heldout-own"]
    main([*args, *seeds, "--bootstrap", "100", "--name", "fq2", "--out-dir", str(tmp_path)])
    seeded = json.loads((tmp_path / "fq2.json").read_text())["suites"]["generative"]
    assert set(seeded["fvae_seeds"]) == {"0", "1"} and len(list((tmp_path / "fvae").glob("*/fvae"))) == 4
    interval = seeded["by_k"]["2"]["fvae_seeds"]["icm"]["mean_gap"]
    assert interval["n"] == 2 and interval["low"] <= interval["mean"] <= interval["high"]
    assert seeded["by_k"]["2"]["summary"]["icm"]["mean_gap"] == pytest.approx(interval["mean"])
    heldout = seeded["heldout_own"]
    assert heldout["kept_out"] and set(heldout["fvae_seeds"]) == {"0", "1"}
    assert all(
        set(heldout["kept_out"]) <= set(f["config"]["exclude_adapters"])
        for f in heldout["fvae_seeds"].values()
    )
    assert heldout["fvae_seed_summary"]["icm"]["mean_gap"]["n"] == 2
    assert set(heldout["bootstrap"]["rows"]) >= {"icm", "task_arithmetic"}
    assert set(heldout["familiarity"]) == {"0", "1"}  # the gate's reading of each seed's inputs


def test_a_k_above_the_suites_tasks_is_refused_before_any_training(tiny_lab, tmp_path, monkeypatch):
    import benchmarks.fusion_quality as fusion_quality

    def never(*args, **kwargs):
        raise AssertionError("an F-VAE was trained for a run that cannot measure anything")

    monkeypatch.setattr(fusion_quality, "trained_fvae", never)
    lab_dir, _ = tiny_lab
    args = ["--lab", str(lab_dir), "--suites", "generative", "--k", "99", "--fewshot-k", "0"]
    with pytest.raises(
        SystemExit, match=r"generative: K = 99 needs at least 99 tasks, but the suite kept \d+"
    ):
        main([*args, "--out-dir", str(tmp_path)])
    assert not (tmp_path / "fusion_quality.json").exists()


def test_combine_merges_one_suite_measured_at_separate_k(tmp_path):
    """Runs of one suite at K = 4 and at K = 2, 8 (run in parallel) become one table; a K measured
    twice is refused."""
    from benchmarks.fusion_quality import combine, table

    def run(ks, gap):
        entry = {"tasks": ["a", "b"], "unseen": ["a"], "methods": {"icm": {"tasks": {"a": {"gap": gap}}}}}
        by_k = {
            str(k): {
                "sets": [entry],
                "summary": {"icm": {"mean_gap": gap, "worst_gap": gap, "mean_loss": 1.0}},
            }
            for k in ks
        }
        suite = {"primary_gap": "gap", "unseen": ["a"], "by_k": by_k}
        return {"sets_per_k": 1, "seconds": 10.0, "suites": {"s": suite}}

    for name, ks, gap in (("k4", [4], 0.4), ("k28", [2, 8], 0.2)):
        result = run(ks, gap)
        if name == "k4":  # a costly row measured at one K only still gets its bars and table cells
            result["suites"]["s"]["by_k"]["4"]["summary"]["icm+refine"] = {
                "mean_gap": 0.6,
                "worst_gap": 0.5,
                "mean_loss": 1.0,
            }
        (tmp_path / f"{name}.json").write_text(json.dumps(result))
    merged = combine(["k4", "k28"], "all", tmp_path)
    assert "| icm+refine | n/a | 0.60 / 0.50 (1.000) | n/a |" in table(merged)
    suite = merged["suites"]["s"]
    assert list(suite["by_k"]) == ["2", "4", "8"] and suite["by_k"]["4"]["summary"]["icm"]["mean_gap"] == 0.4
    assert suite["unseen_task_gaps"]["icm"]["a"] == pytest.approx((0.2 + 0.4 + 0.2) / 3)
    assert merged["seconds"] == 20.0 and (tmp_path / "all.json").is_file()
    # A scenario measured by one of the runs (here the second) is kept, once.
    second = run([2, 8], 0.2)
    second["suites"]["s"]["fewshot"] = fewshot = {"k": 8, "sets": [{"tasks": ["a", "b"]}], "summary": {}}
    (tmp_path / "k28.json").write_text(json.dumps(second))
    assert combine(["k4", "k28"], "all", tmp_path)["suites"]["s"]["fewshot"] == fewshot
    third = run([6], 0.1)
    third["suites"]["s"]["fewshot"] = fewshot
    (tmp_path / "k6.json").write_text(json.dumps(third))
    with pytest.raises(SystemExit, match="fewshot scenario is in two runs"):
        combine(["k28", "k6"], "again", tmp_path)
    with pytest.raises(SystemExit, match="K = 4 is in two runs"):
        combine(["k4", "k4"], "again", tmp_path)
