"""fusion_quality: every fusion method's gap closure on the lab's real suites (docs/design.md §4).

For each suite (the lab's ``encoder`` and ``generative``, and ``features``: a custom-model
classification suite with per-task heads and 16 support shots, :mod:`benchmarks.lab.features`,
built on first use) and K in {2, 4, 6}, seeded task sets of K kept tasks; each task contributes its own
adapter (run 0's final checkpoint); every method fuses them and the fused adapter is scored on
every task's held-out eval split: mean and worst-task gap closure ``G`` and mean loss, next to
the ``base`` (G = 0) and ``own`` (G = 1) rows. Few-shot methods (``lorahub``,
``task_arithmetic-tuned``) see only the tasks' support split.

    .venv/bin/python -m benchmarks.fusion_quality [--lab DIR] [--suites encoder,generative,features]
        [--k 2,4,6] [--sets 3] [--seed 0] [--max-eval N] [--methods a,b] [--fvae-seeds 0,1,2]
        [--name fusion_quality]

Writes ``results/<name>.json`` (every task's numbers, seeds, chosen parameters, timings) and
``results/<name>.png`` (a bar chart per suite). With ``--fvae-seeds``, every ``icm`` row is fused
with one F-VAE per meta-training seed and reported as the mean over them with its spread and 95 %
interval (:mod:`benchmarks.quality.seeds`).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks._common import RESULTS, environment, write_json
from benchmarks.lab import load_lab
from benchmarks.lab.features import build_features_suite
from benchmarks.quality.bootstrap import REPLICATES, SetSamples, mean_sums, paired_bootstrap
from benchmarks.quality.harness import SuiteHarness
from benchmarks.quality.icm import context_task_vectors, trained_fvae, unseen_tasks
from benchmarks.quality.methods import BASELINES, ICM_ROWS, MethodRow, run_row
from benchmarks.quality.seeds import combine_seed_runs, seed_summary

DEFAULT_LAB = RESULTS / "lab" / "standard-seed0"


def task_sets(tasks: list[str], k: int, count: int, seed: int) -> list[list[str]]:
    """``count`` distinct sorted subsets of ``k`` tasks, seeded (fewer if fewer exist)."""
    rng = random.Random(f"{seed}-{k}")
    seen: list[list[str]] = []
    for _ in range(count * 20):
        subset = sorted(rng.sample(tasks, k))
        if subset not in seen:
            seen.append(subset)
        if len(seen) == count:
            break
    return seen


def evaluate_sets(
    harness: SuiteHarness,
    rows: list[MethodRow],
    subsets: list[list[str]],
    seed: int,
    log,
    fusion_args: dict[str, Any] | None = None,
    support_k: int | None = None,
    unseen: list[str] = (),
    adapters: dict[str, Any] | None = None,
    samples: list[SetSamples] | None = None,
) -> list[dict[str, Any]]:
    """Fuse and score every task set with every row; ``adapters`` overrides the own adapters as inputs.

    ``samples``, when given, receives one :class:`SetSamples` per task set (each row's per-example
    sums, for :func:`benchmarks.quality.bootstrap.paired_bootstrap`).
    """
    entries = []
    for subset in subsets:
        set_samples = SetSamples(list(subset))
        inputs = [(adapters or harness.own)[t] for t in subset]
        entry = {
            "tasks": subset,
            "unseen": [t for t in subset if t in unseen],
            "methods": harness.reference_rows(subset),
        }
        for row in rows:
            start = time.perf_counter()
            fused, details = run_row(
                row, inputs, subset, seed, lambda s=subset: harness.objective(s, support_k), fusion_args
            )
            fuse_s = time.perf_counter() - start
            scored, set_samples.rows[row.label] = harness.score_examples(fused, subset)
            scored.update(details=details, fuse_seconds=fuse_s)
            entry["methods"][row.label] = scored
            log(
                f"{harness.name} K={len(subset)} {subset}: {row.label:24s} G={_fmt(scored['mean_gap'])} "
                f"worst={_fmt(scored['worst_gap'])} G_acc={_fmt(scored.get('mean_gap_accuracy'))} ({fuse_s:.1f}s)"
            )
        entries.append(entry)
        if samples is not None:
            samples.append(set_samples)
    return entries


def evaluate_with_fvae_seeds(
    harness: SuiteHarness,
    rows: list[MethodRow],
    icm_rows: list[MethodRow],
    subsets: list[list[str]],
    seed: int,
    log,
    fusion_by_seed: dict[int, dict[str, Any]],
    support_k: int | None = None,
    unseen: list[str] = (),
    samples: list[SetSamples] | None = None,
) -> list[dict[str, Any]]:
    """:func:`evaluate_sets` with the ``icm`` rows fused once per meta-training seed's F-VAE
    (``fusion_by_seed``: fusion_context arguments per seed) and combined per task set
    (:func:`benchmarks.quality.seeds.combine_seed_runs`); the other rows run once. An ``icm`` row's
    per-example sums in ``samples`` are the mean over the seeds."""
    first = next(iter(fusion_by_seed.values()), {})
    if len(fusion_by_seed) <= 1:
        return evaluate_sets(
            harness, rows + icm_rows, subsets, seed, log, first, support_k, unseen, samples=samples
        )
    own_samples: list[SetSamples] = []
    entries = evaluate_sets(harness, rows, subsets, seed, log, first, support_k, unseen, samples=own_samples)
    per_seed, per_seed_samples = {}, {}
    for fvae_seed, fusion_args in fusion_by_seed.items():
        log(f"{harness.name}: icm rows with the F-VAE of meta-training seed {fvae_seed}")
        per_seed_samples[fvae_seed] = []
        per_seed[fvae_seed] = evaluate_sets(
            harness,
            icm_rows,
            subsets,
            seed,
            log,
            fusion_args,
            support_k,
            unseen,
            samples=per_seed_samples[fvae_seed],
        )
    for i, entry in enumerate(entries):
        for row in icm_rows:
            entry["methods"][row.label] = combine_seed_runs(
                {s: runs[i]["methods"][row.label] for s, runs in per_seed.items()}
            )
            own_samples[i].rows[row.label] = mean_sums(
                [runs[i].rows[row.label] for runs in per_seed_samples.values()]
            )
    if samples is not None:
        samples.extend(own_samples)
    return entries


def summarize(entries: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per method: mean over task sets of each gap / loss statistic."""
    labels = entries[0]["methods"].keys()
    keys = [k for k in entries[0]["methods"]["base"] if k.startswith(("mean_", "worst_", "pooled_"))]
    summary = {}
    for label in labels:
        values = [e["methods"][label] for e in entries]
        summary[label] = {
            key: sum(v[key] for v in values) / len(values)
            for key in keys
            if all(v.get(key) is not None for v in values)
        }
    return summary


def per_task_gaps(
    entries: list[dict[str, Any]], tasks: list[str], key: str = "gap"
) -> dict[str, dict[str, float]]:
    """Per method: each task's mean G over the sets that contain it (only ``tasks``)."""
    out: dict[str, dict[str, list[float]]] = {}
    for entry in entries:
        for label, result in entry["methods"].items():
            for task, values in result.get("tasks", {}).items():
                if task in tasks and values.get(key) is not None:
                    out.setdefault(label, {}).setdefault(task, []).append(values[key])
    return {label: {t: sum(v) / len(v) for t, v in by_task.items()} for label, by_task in out.items()}


def _fmt(value: float | None) -> str:
    return "  n/a" if value is None else f"{value:+.3f}"


def _keys(data: dict[str, Any]) -> tuple[str, str]:
    gap = data.get("primary_gap", "gap")
    suffix = gap.removeprefix("gap")
    return f"mean_gap{suffix}", f"worst_gap{suffix}"


def _row_labels(data: dict[str, Any]) -> list[str]:
    """Every row of any K, in first-seen order (a row measured at some K only, e.g. a costly one,
    still gets its cells and bars)."""
    return list(dict.fromkeys(m for by_k in data["by_k"].values() for m in by_k["summary"]))


def _whisker(by_k: dict[str, Any], label: str, mean_key: str) -> tuple[float, float] | None:
    """A row's 95 % interval for the chart: over F-VAE seeds where it has several, else the paired
    bootstrap's (whose statistic is the mean G on the suite's primary metric)."""
    seeds = by_k.get("fvae_seeds", {}).get(label, {}).get(mean_key)
    if seeds and seeds["low"] is not None:
        return seeds["low"], seeds["high"]
    boot = by_k.get("bootstrap", {}).get("rows", {}).get(label, {}).get("mean_gap")
    if boot and boot["low"] is not None:
        return boot["low"], boot["high"]
    return None


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suites = results["suites"]
    fig, axes = plt.subplots(len(suites), 1, figsize=(14, 4.5 * len(suites)), squeeze=False)
    for ax, (suite, data) in zip(axes[:, 0], suites.items(), strict=True):
        mean_key, worst_key = _keys(data)
        ks = list(data["by_k"])
        labels = [m for m in _row_labels(data) if m not in ("base", "own")]
        width = 0.8 / len(labels)
        cmap = plt.get_cmap("tab20")
        for i, label in enumerate(labels):
            xs = [j + i * width for j in range(len(ks))]
            means = [data["by_k"][k]["summary"].get(label, {}).get(mean_key, float("nan")) for k in ks]
            worst = [data["by_k"][k]["summary"].get(label, {}).get(worst_key, float("nan")) for k in ks]
            color = cmap(i % 20)
            ax.bar(xs, means, width, label=label, color=color, edgecolor="black" if "icm" in label else None)
            # 95 % interval over F-VAE seeds (icm rows), else the paired bootstrap over eval examples
            spread = [_whisker(data["by_k"][k], label, mean_key) for k in ks]
            if any(s is not None for s in spread):
                low = [m - s[0] if s else 0.0 for m, s in zip(means, spread, strict=True)]
                high = [s[1] - m if s else 0.0 for m, s in zip(means, spread, strict=True)]
                ax.errorbar(xs, means, yerr=[low, high], fmt="none", ecolor="black", capsize=2, lw=0.8)
            ax.scatter(xs, worst, marker="_", color="black", s=60, zorder=3)
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(ks))], [f"K = {k}" for k in ks])
        metric = "accuracy" if "accuracy" in mean_key else "loss"
        ax.set_ylabel(
            f"gap closure G on {metric}\n(bar: mean, tick: worst task, whisker: 95 %\n"
            "over F-VAE seeds (icm), else bootstrap)"
        )
        ax.set_title(f"{suite}: fused vs each task's own adapter (G = 1) and the base (G = 0)")
        ax.set_ylim(max(-1.0, ax.get_ylim()[0]), 1.3)
        ax.legend(ncol=5, fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _summary_table(summary: dict[str, Any], mean_key: str, worst_key: str, title: str) -> list[str]:
    lines = [f"\n{title}", "| method | mean G | worst G | mean loss |", "|---|---|---|---|"]
    for label, values in summary.items():
        if mean_key in values:
            lines.append(
                f"| {label} | {values[mean_key]:.2f} | {values[worst_key]:.2f} | {values['mean_loss']:.3f} |"
            )
    return lines


def _interval(stat: dict[str, Any] | None) -> str:
    if not stat:
        return "n/a"
    if stat["std"] is None:
        return f"{stat['mean']:.2f} (1 seed)"
    return f"{stat['mean']:.2f} ± {stat['std']:.2f} [{stat['low']:.2f}, {stat['high']:.2f}]"


def _seed_table(by_key: dict[str, dict[str, Any]], mean_key: str, title: str) -> list[str]:
    """icm rows over meta-training seeds: mean G ± std [95 % t-interval], one column per key."""
    keys = list(by_key)
    labels = list(dict.fromkeys(label for seeded in by_key.values() for label in seeded))
    lines = [f"\n{title}", "| icm row | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for label in labels:
        cells = [_interval(by_key[k].get(label, {}).get(mean_key)) for k in keys]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _bounds(stat: dict[str, Any]) -> str:
    if stat["low"] is None:
        return f"{stat['estimate']:.2f}"
    return f"{stat['estimate']:.2f} [{stat['low']:.2f}, {stat['high']:.2f}]"


def _bootstrap_table(boot: dict[str, Any], title: str) -> list[str]:
    """Rows' G with paired-bootstrap intervals, and which differences the intervals support."""
    lines = [
        f"\n{title}: G on {boot['metric']} with {boot['level']:.0%} paired-bootstrap intervals over eval "
        f"examples ({boot['replicates']} replicates)",
        "| method | mean G | pooled G |",
        "|---|---|---|",
    ]
    for label, stats in boot["rows"].items():
        lines.append(f"| {label} | {_bounds(stats['mean_gap'])} | {_bounds(stats['pooled_gap'])} |")
    if "best" in boot:
        diff = boot["best_vs_worst"]
        verdict = "separated" if diff["separated"] else "NOT separated"
        lines.append(
            f"  best {boot['best']} - worst {boot['worst']}: {_bounds(diff)} ({verdict}); "
            f"tied with the best (interval of the difference holds 0): {', '.join(boot['tied_with_best']) or 'none'}"
        )
    return lines


def table(results: dict[str, Any]) -> str:
    lines = []
    for suite, data in results["suites"].items():
        mean_key, worst_key = _keys(data)
        ks = list(data["by_k"])
        metric = "accuracy" if "accuracy" in mean_key else "loss"
        lines.append(
            f"\n{suite}: G on {metric}, mean / worst over {results['sets_per_k']} task sets (mean loss)"
        )
        lines.append("| method | " + " | ".join(f"K = {k}" for k in ks) + " |")
        lines.append("|---" * (len(ks) + 1) + "|")
        for label in _row_labels(data):
            cells = []
            for k in ks:
                v = data["by_k"][k]["summary"].get(label, {})
                cells.append(
                    f"{v[mean_key]:.2f} / {v[worst_key]:.2f} ({v['mean_loss']:.3f})"
                    if mean_key in v
                    else "n/a"
                )
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        for k in ks:
            for key, title in (
                ("bootstrap", f"{suite} K={k}"),
                ("bootstrap_seen_sets", f"{suite} K={k}, sets with seen tasks only"),
                (
                    "bootstrap_unseen_sets",
                    f"{suite} K={k}, sets containing unseen tasks {data.get('unseen')}",
                ),
            ):
                if data["by_k"][k].get(key):
                    lines += _bootstrap_table(data["by_k"][k][key], title)
        seeded = {f"K = {k}": data["by_k"][k]["fvae_seeds"] for k in ks if data["by_k"][k].get("fvae_seeds")}
        if seeded:
            seeds = next(iter(next(iter(seeded.values())).values()))["seeds"]
            lines += _seed_table(
                seeded,
                mean_key,
                f"{suite}: icm rows over F-VAE meta-training seeds {seeds}, mean G ± std [95 %]",
            )
        for k in ks:
            for part in ("seen", "unseen"):
                summary = data["by_k"][k].get(f"summary_{part}_sets")
                if summary and data.get("unseen"):
                    lines += _summary_table(
                        summary,
                        mean_key,
                        worst_key,
                        f"{suite} K={k}, sets with {part} tasks only"
                        if part == "seen"
                        else f"{suite} K={k}, sets containing unseen tasks {data['unseen']}",
                    )
        if "unseen_task_gaps" in data:
            lines.append(f"\n{suite}: per unseen task, mean G over the sets holding it")
            for label, gaps in data["unseen_task_gaps"].items():
                lines.append(f"  {label:24s} " + "  ".join(f"{t} {g:+.2f}" for t, g in gaps.items()))
        if "fewshot" in data:
            set_size = len(data["fewshot"]["sets"][0]["tasks"])
            title = f"{suite}: few-shot k = {data['fewshot']['k']}, K = {set_size}"
            lines += _summary_table(data["fewshot"]["summary"], mean_key, worst_key, title)
            if data["fewshot"].get("bootstrap"):
                lines += _bootstrap_table(data["fewshot"]["bootstrap"], title)
            if data["fewshot"].get("fvae_seeds"):
                lines += _seed_table(
                    {f"K = {set_size}": data["fewshot"]["fvae_seeds"]},
                    mean_key,
                    f"{suite}: few-shot k = {data['fewshot']['k']}, icm rows over F-VAE seeds",
                )
        if "longtail" in data:
            lt = data["longtail"]
            lines += _summary_table(
                lt["summary"],
                mean_key,
                worst_key,
                f"{suite}: long-tailed catalog, K = 4 (adapters per task {lt['adapters_per_task']})",
            )
            lines.append(f"  tail tasks {lt['tail_tasks']}:")
            for label, gaps in lt["tail_task_gaps"].items():
                lines.append(f"  {label:24s} " + "  ".join(f"{t} {g:+.2f}" for t, g in gaps.items()))
    return "\n".join(lines)


# Few-shot examples every few-shot row (lorahub, tuned/fitted weights, icm refinement) sees per
# task, and icm's refinement steps: the encoder's MiniLM backward pass is ~10x the char Llama's.
SUPPORT_K = {"encoder": None, "generative": None, "features": None}
REFINE_STEPS = {"encoder": 20, "generative": 100, "features": 100}
CEILING = "joint-lora (ceiling)"
FEWSHOT_ROWS = ("lorahub", "task_arithmetic-tuned", "task_arithmetic-fitted", "icm+refine+span")
FEWSHOT_SET_SIZE = 4


def suite_icm_rows(name: str) -> list[MethodRow]:
    rows = []
    for row in ICM_ROWS:
        params = dict(row.params)
        if "refine_steps" in params:
            params["refine_steps"] = REFINE_STEPS[name]
        rows.append(replace(row, params=params))
    return rows


def suite_rows(rows: list[MethodRow], name: str) -> list[MethodRow]:
    """The fitted-weights ablation takes as many steps as icm's refinement on this suite."""
    return [
        replace(r, params={**r.params, "steps": REFINE_STEPS[name]})
        if r.label == "task_arithmetic-fitted"
        else r
        for r in rows
    ]


def run_suite(lab: dict[str, Any], name: str, args, rows: list[MethodRow], log) -> dict[str, Any]:
    suite = lab["suites"][name]
    rows = suite_rows(rows, name)
    harness = SuiteHarness.build(lab, name, max_eval=args.max_eval)
    ks = [k for k in args.ks if k <= len(harness.tasks)]
    if not ks:  # before any F-VAE is trained: nothing could be measured
        raise SystemExit(
            f"{name}: K = {', '.join(map(str, args.ks))} needs at least {min(args.ks)} tasks, but the "
            f"suite kept {len(harness.tasks)} ({', '.join(harness.tasks)}): pass a smaller --k"
        )
    if len(ks) < len(args.ks):
        log(f"{name}: skipping K > {len(harness.tasks)} (the suite kept {len(harness.tasks)} tasks)")
    support_k = SUPPORT_K.get(name)
    out: dict[str, Any] = {
        "tasks": harness.tasks,
        "own_adapters": harness.own_ids,
        "base": harness.base_metrics,
        "own": harness.own_metrics,
        "support_k": support_k,
        "primary_gap": "gap_accuracy" if "accuracy" in next(iter(harness.own_metrics.values())) else "gap",
        "by_k": {},
    }
    fusion_args: dict[str, Any] = {}  # keyword arguments of engine.fusion.fusion_context
    fusion_by_seed: dict[int, dict[str, Any]] = {}  # the same, per meta-training seed's F-VAE
    unseen: list[str] = []
    icm_rows: list[MethodRow] = []
    if not args.no_icm:
        from engine.fvae.artifact import FVAEArtifact

        unseen = unseen_tasks(name, harness.tasks, args.seed)
        overrides: dict[str, Any] = {}
        if args.task_vectors == "context":
            fusion_args["task_vectors"] = context_task_vectors(suite, harness.tasks, args.seed, log)
            overrides["task_vectors"] = {"source": "context"}
        if args.meta_steps:
            overrides["train"] = {"steps": args.meta_steps}
        if args.fvae:
            overrides["fvae"] = args.fvae
        out["fvae_seeds"] = {}
        for fvae_seed in args.fvae_seeds or [args.seed]:  # same unseen tasks, another training run
            fvae_dir, config = trained_fvae(
                suite, name, exclude=unseen, seed=fvae_seed, overrides=overrides, log=log
            )
            artifact = FVAEArtifact.load(fvae_dir)
            fusion_by_seed[fvae_seed] = {**fusion_args, "fvae": artifact}
            out["fvae_seeds"][str(fvae_seed)] = {
                "path": str(fvae_dir),
                "config": config,
                # the F-VAE's training figures, as artifact.json holds them
                **artifact.meta.model_dump(mode="json", include={"metrics", "familiarity"}),
            }
        out["fvae"] = next(iter(out["fvae_seeds"].values()))
        icm_rows = [
            r for r in suite_icm_rows(name) if not args.icm_methods or r.label in args.icm_methods.split(",")
        ]
    out["unseen"] = unseen
    icm_labels = [r.label for r in icm_rows]
    metric = out["primary_gap"].removeprefix("gap").removeprefix("_") or "loss"

    def bootstrap(samples: list[SetSamples]) -> dict[str, Any]:
        # One seeded draw per call: the rows of these sets are compared on the same resamples.
        return paired_bootstrap(
            samples,
            harness.base_sums,
            harness.own_sums,
            harness.host.task_model.finalize,
            metric,
            lower_is_better=metric == "loss",
            replicates=args.bootstrap,
            seed=args.seed,
            unranked=(CEILING,),
        )

    everything = []
    for k in ks:
        subsets = task_sets(harness.tasks, k, args.sets, args.seed)
        samples: list[SetSamples] = []
        entries = evaluate_with_fvae_seeds(
            harness, rows, icm_rows, subsets, args.seed, log, fusion_by_seed, support_k, unseen, samples
        )
        if suite["kind"] == "causal-lm" and not args.no_ceiling:
            add_ceiling(harness, suite, entries, args.seed, log, samples)
        everything += entries
        by_k = {"sets": entries, "summary": summarize(entries)}
        if args.bootstrap:
            by_k["bootstrap"] = bootstrap(samples)
        if len(fusion_by_seed) > 1:
            by_k["fvae_seeds"] = seed_summary(entries, icm_labels)
        for label, chosen in (
            ("seen", [i for i, e in enumerate(entries) if not e["unseen"]]),
            ("unseen", [i for i, e in enumerate(entries) if e["unseen"]]),
        ):
            if chosen:
                by_k[f"summary_{label}_sets"] = summarize([entries[i] for i in chosen])
                if args.bootstrap and len(chosen) < len(entries):  # all sets: the bootstrap above
                    by_k[f"bootstrap_{label}_sets"] = bootstrap([samples[i] for i in chosen])
        out["by_k"][str(k)] = by_k
    if unseen:
        out["unseen_task_gaps"] = per_task_gaps(everything, unseen, out["primary_gap"])
    if icm_rows and args.fewshot_k:
        # K = 4, or every task of a suite that kept fewer
        subsets = task_sets(harness.tasks, min(FEWSHOT_SET_SIZE, len(harness.tasks)), args.sets, args.seed)
        samples = []
        entries = evaluate_with_fvae_seeds(
            harness,
            [r for r in rows if r.label in FEWSHOT_ROWS],
            [r for r in icm_rows if r.label in FEWSHOT_ROWS],
            subsets,
            args.seed,
            log,
            fusion_by_seed,
            args.fewshot_k,
            unseen,
            samples,
        )
        out["fewshot"] = {"k": args.fewshot_k, "sets": entries, "summary": summarize(entries)}
        if args.bootstrap:
            out["fewshot"]["bootstrap"] = bootstrap(samples)
        if len(fusion_by_seed) > 1:
            out["fewshot"]["fvae_seeds"] = seed_summary(entries, icm_labels)
    if icm_rows and args.heldout_own:
        out["heldout_own"] = run_heldout_own(
            harness,
            suite,
            name,
            args,
            rows,
            icm_rows,
            unseen,
            support_k,
            overrides,
            fusion_args,
            bootstrap,
            log,
        )
    if icm_rows and args.longtail_steps and name in args.longtail_suites.split(","):
        out["longtail"] = run_longtail(harness, suite, name, args, rows, icm_rows, unseen, support_k, log)
    return out


def add_ceiling(
    harness: SuiteHarness,
    suite: dict[str, Any],
    entries: list[dict],
    seed: int,
    log,
    samples: list[SetSamples] | None = None,
) -> None:
    """Score each set's joint full-data LoRA (the ceiling reference row); ``samples``, when given,
    are the sets' per-example records (aligned with ``entries``) and receive the row's too."""
    from benchmarks.quality.ceiling import joint_lora

    for i, entry in enumerate(entries):
        start = time.perf_counter()
        scored, sums = harness.score_examples(joint_lora(suite, entry["tasks"], seed), entry["tasks"])
        if samples is not None:
            samples[i].rows[CEILING] = sums
        scored["train_seconds"] = time.perf_counter() - start
        entry["methods"][CEILING] = scored
        log(
            f"{harness.name} K={len(entry['tasks'])} {entry['tasks']}: {CEILING:24s} G={_fmt(scored['mean_gap'])}"
        )


def run_heldout_own(
    harness, suite, name, args, rows, icm_rows, unseen, support_k, overrides, fusion_args, bootstrap, log
) -> dict[str, Any]:
    """icm on **a new training run of known tasks**: F-VAEs meta-trained like the main ones (one
    per ``--fvae-seeds`` seed) but with every checkpoint of the run each task's own adapter comes
    from (the adapter each fusion takes, and its siblings at other steps) kept out of
    meta-training (``exclude_adapters``), then the K = 4 sets (every task, with fewer) fused
    with them, next to task arithmetic. Reports each seen-task input's familiarity (the gate's
    reading of its reconstruction error, or of its condition), per seed."""
    from engine.fvae.artifact import FVAEArtifact

    adapters = suite["adapters"]
    kept_out = sorted(
        i
        for task, own in harness.own_ids.items()
        for i in suite["catalogs"]["main"]["adapters"][task]
        if adapters[i]["run"] == adapters[own]["run"]
    )
    fusion_by_seed: dict[int, dict[str, Any]] = {}
    fvaes: dict[str, Any] = {}
    for fvae_seed in args.fvae_seeds or [args.seed]:
        fvae_dir, config = trained_fvae(
            suite,
            name,
            exclude=unseen,
            seed=fvae_seed,
            overrides=overrides,
            log=log,
            exclude_adapters=kept_out,
        )
        artifact = FVAEArtifact.load(fvae_dir)
        fusion_by_seed[fvae_seed] = {**fusion_args, "fvae": artifact}
        fvaes[str(fvae_seed)] = {
            "path": str(fvae_dir),
            "config": config,
            **artifact.meta.model_dump(mode="json", include={"metrics", "familiarity"}),
        }
    chosen = [r for r in rows if r.label in ("task_arithmetic", "task_arithmetic-fitted")]
    held_rows = ("icm", "icm-ungated", "icm-no-prototypes", "icm-displacement-scaled")
    chosen_icm = [r for r in icm_rows if r.label in held_rows]
    # K = 4, or every task of a suite that kept fewer (as the few-shot scenario)
    subsets = task_sets(harness.tasks, min(FEWSHOT_SET_SIZE, len(harness.tasks)), args.sets, args.seed)
    samples: list[SetSamples] = []
    entries = evaluate_with_fvae_seeds(
        harness, chosen, chosen_icm, subsets, args.seed, log, fusion_by_seed, support_k, unseen, samples
    )
    per_input: dict[str, dict[str, float]] = {}  # seed -> task -> familiarity
    for entry in entries:
        icm_row = entry["methods"].get("icm", {})
        runs = icm_row.get("per_seed") or {str(next(iter(fusion_by_seed))): icm_row}
        for fvae_seed, run in runs.items():
            gate = run.get("details", {}).get("familiarity") or {}
            # Either basis: reconstruction errors, or (an F-VAE that explains nothing) the condition.
            if "inputs" not in gate:  # no reading: the gate is off, or the F-VAE has no reference error
                continue
            for task, value in zip(entry["tasks"], gate["inputs"], strict=True):
                per_input.setdefault(fvae_seed, {})[task] = value
    seen = [v for values in per_input.values() for t, v in values.items() if t not in unseen]
    out = {
        "kept_out": kept_out,
        "fvae_seeds": fvaes,
        "fvae": next(iter(fvaes.values())),
        "sets": entries,
        "summary": summarize(entries),
        "familiarity": per_input,
        "familiarity_seen_mean": sum(seen) / len(seen) if seen else None,
    }
    if args.bootstrap:
        out["bootstrap"] = bootstrap(samples)
    if len(fusion_by_seed) > 1:
        out["fvae_seed_summary"] = seed_summary(entries, [r.label for r in chosen_icm])
    return out


def run_longtail(harness, suite, name, args, rows, icm_rows, unseen, support_k, log) -> dict[str, Any]:
    """icm with an F-VAE meta-trained on the long-tailed catalog: tail tasks' gap closure."""
    from engine.fvae.artifact import FVAEArtifact

    overrides = {"train": {"steps": args.longtail_steps}}
    fvae_dir, config = trained_fvae(suite, name, "longtail", unseen, args.seed, overrides, log)
    fusion_args = {"fvae": FVAEArtifact.load(fvae_dir)}
    counts = {t: len(ids) for t, ids in suite["catalogs"]["longtail"]["adapters"].items()}
    chosen = [
        r for r in rows + icm_rows if r.label in ("lorahub", "task_arithmetic-fitted") or r.method == "icm"
    ]
    subsets = task_sets(harness.tasks, 4, args.sets, args.seed)
    entries = evaluate_sets(harness, chosen, subsets, args.seed, log, fusion_args, support_k, unseen)
    seen_counts = {t: c for t, c in counts.items() if t not in unseen}
    tail = sorted(seen_counts, key=lambda t: seen_counts[t])[: max(1, len(seen_counts) // 3)]
    return {
        "adapters_per_task": counts,
        "tail_tasks": tail,
        "fvae": {"path": str(fvae_dir), "config": config},
        "sets": entries,
        "summary": summarize(entries),
        "tail_task_gaps": per_task_gaps(
            entries, tail, "gap_accuracy" if "accuracy" in next(iter(harness.own_metrics.values())) else "gap"
        ),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lab", default=str(DEFAULT_LAB))
    parser.add_argument(
        "--suites",
        default="encoder,generative,features",
        help="lab suites, and 'features' (benchmarks.lab.features: built here, cached in results/tmp)",
    )
    parser.add_argument("--k", default="2,4,6")
    parser.add_argument("--sets", type=int, default=3, help="task sets per K")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-eval", type=int, default=None, help="held-out examples per task")
    parser.add_argument("--methods", default=None, help="comma-separated baseline row labels (default: all)")
    parser.add_argument("--no-icm", action="store_true", help="baselines only (no F-VAE training)")
    parser.add_argument("--icm-methods", default=None, help="comma-separated icm row labels (default: all)")
    parser.add_argument("--fewshot-k", type=int, default=8, help="few-shot scenario's k (0: skip)")
    parser.add_argument(
        "--heldout-own",
        action="store_true",
        help="also meta-train an F-VAE without the training run of every task's own adapter and fuse "
        "those (a new training run of known tasks)",
    )
    parser.add_argument(
        "--longtail-steps",
        type=int,
        default=0,
        help="meta-training steps on the long-tailed catalog (0: skip)",
    )
    parser.add_argument("--longtail-suites", default="generative", help="suites of the long-tail scenario")
    parser.add_argument(
        "--task-vectors",
        choices=("adapter", "context"),
        default="adapter",
        help="icm's task vectors: 'adapter' (a projection of each task's mean adapter) or 'context' "
        "(the paper's: mean last hidden state over k support examples, computed on Ray)",
    )
    parser.add_argument(
        "--meta-steps", type=int, default=0, help="meta-training steps of the main F-VAE (0: the suite's)"
    )
    parser.add_argument(
        "--fvae",
        metavar="FIELD=VALUE",
        action="append",
        default=[],
        help="an ablation: override one field of the suites' F-VAE recipe (repeatable; recorded in the JSON)",
    )
    parser.add_argument(
        "--fvae-seeds",
        type=lambda text: [int(s) for s in text.split(",")],
        default=None,
        help="meta-training seeds a,b,c: one F-VAE each, every icm row reported as the mean over them "
        "with its spread and 95%% interval (default: --seed only)",
    )
    parser.add_argument("--no-ceiling", action="store_true", help="skip the joint full-data LoRA row")
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=REPLICATES,
        help="paired bootstrap replicates over eval examples, per K (0: skip the intervals)",
    )
    parser.add_argument("--name", default="fusion_quality")
    parser.add_argument("--out-dir", default=str(RESULTS), help="where <name>.json and <name>.png go")
    parser.add_argument(
        "--combine",
        metavar="NAME,NAME",
        help="instead of running: merge the suites of earlier runs' <name>.json into <--name>.json/.png",
    )
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir)
    if args.combine:
        return combine(args.combine.split(","), args.name, out_dir)
    args.ks = [int(k) for k in args.k.split(",")]
    args.fvae = dict(_field_value(item) for item in args.fvae)

    suites = args.suites.split(",")
    lab = load_lab(args.lab) if set(suites) - {"features"} else {"root": None, "suites": {}}
    if "features" in suites:
        lab["suites"]["features"] = build_features_suite(
            RESULTS / "tmp" / f"features-seed{args.seed}", args.seed
        )
    rows = list(BASELINES)
    if args.methods:
        wanted = args.methods.split(",")
        rows = [r for r in rows if r.label in wanted]
    started = time.perf_counter()
    results: dict[str, Any] = {
        "benchmark": "fusion_quality",
        "lab": {"path": lab["root"], "size": lab.get("size"), "seed": lab.get("seed")},
        "seed": args.seed,
        "fvae_seeds": args.fvae_seeds or [args.seed],
        "sets_per_k": args.sets,
        "max_eval": args.max_eval,
        "rows": [r.__dict__ for r in rows] + ([] if args.no_icm else [r.__dict__ for r in ICM_ROWS]),
        "environment": environment(),
        "suites": {},
    }
    for suite in suites:
        results["suites"][suite] = run_suite(lab, suite, args, rows, print)
        write_json(args.name, results, out_dir)  # partial results survive an interrupted run
    results["seconds"] = time.perf_counter() - started
    write_json(args.name, results, out_dir)
    plot(results, out_dir / f"{args.name}.png")
    print(table(results))
    return results


def combine(names: list[str], name: str, out_dir: Path) -> dict[str, Any]:
    """One result from runs of separate suites or of one suite at separate K (e.g. run in
    parallel): suites merged, a suite's ``by_k`` merged across runs (its other fields and the rest
    of the result from the first run), each run's settings and timing recorded under ``runs``.

    Raises:
        SystemExit: if two runs measured the same suite at the same K.
    """
    import json

    runs = [json.loads((out_dir / f"{n}.json").read_text()) for n in names]
    results = dict(runs[0])
    suites: dict[str, Any] = {}
    for run_name, run in zip(names, runs, strict=True):
        for suite, data in run["suites"].items():
            if suite not in suites:
                suites[suite] = dict(data, by_k=dict(data["by_k"]))
                continue
            twice = sorted(set(suites[suite]["by_k"]) & set(data["by_k"]), key=int)
            if twice:
                raise SystemExit(f"{suite} K = {', '.join(twice)} is in two runs (the second: {run_name})")
            suites[suite]["by_k"].update(data["by_k"])
            for scenario in ("fewshot", "heldout_own", "longtail"):
                if scenario in data:
                    if scenario in suites[suite]:
                        raise SystemExit(
                            f"{suite}'s {scenario} scenario is in two runs (the second: {run_name})"
                        )
                    suites[suite][scenario] = data[scenario]
    for data in suites.values():
        data["by_k"] = dict(sorted(data["by_k"].items(), key=lambda item: int(item[0])))
        if data.get("unseen"):
            everything = [entry for by_k in data["by_k"].values() for entry in by_k["sets"]]
            data["unseen_task_gaps"] = per_task_gaps(everything, data["unseen"], data["primary_gap"])
    results["suites"] = suites
    results["runs"] = {
        n: {k: v for k, v in run.items() if k != "suites"} for n, run in zip(names, runs, strict=True)
    }
    results["seconds"] = sum(run.get("seconds", 0.0) for run in runs)
    write_json(name, results, out_dir)
    plot(results, out_dir / f"{name}.png")
    print(table(results))
    return results


def _field_value(item: str) -> tuple[str, Any]:
    """``FIELD=VALUE`` with VALUE read as JSON when it parses (numbers, booleans), else a string."""
    field, sep, value = item.partition("=")
    if not sep or not field:
        raise SystemExit(f"--fvae takes FIELD=VALUE, got {item!r}")
    try:
        return field, json.loads(value)
    except json.JSONDecodeError:
        return field, value


if __name__ == "__main__":
    main()
