"""fusion_quality: every fusion method's gap closure on the lab's real suites (DESIGN.md §4).

For each suite and K in {2, 4, 6}, seeded task sets of K kept tasks; each task contributes its own
adapter (run 0's final checkpoint); every method fuses them and the fused adapter is scored on
every task's held-out eval split: mean and worst-task gap closure ``G`` and mean loss, next to
the ``base`` (G = 0) and ``own`` (G = 1) rows. Few-shot methods (``lorahub``,
``task_arithmetic-tuned``) see only the tasks' support split.

    .venv/bin/python -m benchmarks.fusion_quality [--lab DIR] [--suites encoder,generative]
        [--k 2,4,6] [--sets 3] [--seed 0] [--max-eval N] [--methods a,b] [--name fusion_quality]

Writes ``results/<name>.json`` (every task's numbers, seeds, chosen parameters, timings) and
``results/<name>.png`` (a bar chart per suite).
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path
from typing import Any

from benchmarks._common import RESULTS, environment, write_json
from benchmarks.lab import load_lab
from benchmarks.quality.harness import SuiteHarness
from benchmarks.quality.methods import BASELINES, MethodRow, run_row

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


def evaluate_suite(
    harness: SuiteHarness, rows: list[MethodRow], ks: list[int], sets: int, seed: int, log
) -> dict[str, Any]:
    results: dict[str, Any] = {
        "tasks": harness.tasks,
        "own_adapters": harness.own_ids,
        "base": harness.base_metrics,
        "own": harness.own_metrics,
        "by_k": {},
    }
    for k in ks:
        if k > len(harness.tasks):
            continue
        entries = []
        for subset in task_sets(harness.tasks, k, sets, seed):
            adapters = [harness.own[t] for t in subset]
            entry = {"tasks": subset, "methods": harness.reference_rows(subset)}
            for row in rows:
                start = time.perf_counter()
                fused, details = run_row(row, adapters, subset, seed, lambda s=subset: harness.objective(s))
                fuse_s = time.perf_counter() - start
                scored = harness.score(fused, subset)
                scored.update(details=details, fuse_seconds=fuse_s)
                entry["methods"][row.label] = scored
                log(
                    f"{harness.name} K={k} {subset}: {row.label:24s} G={_fmt(scored['mean_gap'])} "
                    f"worst={_fmt(scored['worst_gap'])} ({fuse_s:.1f}s)"
                )
            entries.append(entry)
        results["by_k"][str(k)] = {"sets": entries, "summary": summarize(entries)}
    return results


def summarize(entries: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per method: mean over task sets of mean G, worst G and mean loss."""
    labels = entries[0]["methods"].keys()
    summary = {}
    for label in labels:
        values = [e["methods"][label] for e in entries]
        summary[label] = {
            key: sum(v[key] for v in values) / len(values) for key in ("mean_gap", "worst_gap", "mean_loss")
        }
    return summary


def _fmt(value: float | None) -> str:
    return "  n/a" if value is None else f"{value:+.3f}"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suites = results["suites"]
    fig, axes = plt.subplots(len(suites), 1, figsize=(13, 4.2 * len(suites)), squeeze=False)
    for ax, (suite, data) in zip(axes[:, 0], suites.items(), strict=True):
        ks = list(data["by_k"])
        labels = [m for m in data["by_k"][ks[0]]["summary"] if m not in ("base", "own")]
        width = 0.8 / len(labels)
        for i, label in enumerate(labels):
            xs = [j + i * width for j in range(len(ks))]
            means = [data["by_k"][k]["summary"][label]["mean_gap"] for k in ks]
            worst = [data["by_k"][k]["summary"][label]["worst_gap"] for k in ks]
            bars = ax.bar(xs, means, width, label=label)
            ax.scatter(xs, worst, marker="_", color=bars[0].get_facecolor(), s=80, zorder=3)
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(ks))], [f"K = {k}" for k in ks])
        ax.set_ylabel("gap closure G (bar: mean, tick: worst task)")
        ax.set_title(f"{suite}: fused adapters vs each task's own adapter (G = 1) and the base (G = 0)")
        ax.set_ylim(max(-1.0, ax.get_ylim()[0]), 1.1)
        ax.legend(ncol=4, fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results: dict[str, Any]) -> str:
    lines = []
    for suite, data in results["suites"].items():
        ks = list(data["by_k"])
        lines.append(f"\n{suite}: mean G / worst G (mean loss)")
        lines.append("| method | " + " | ".join(f"K = {k}" for k in ks) + " |")
        lines.append("|---" * (len(ks) + 1) + "|")
        for label in data["by_k"][ks[0]]["summary"]:
            cells = []
            for k in ks:
                s = data["by_k"][k]["summary"][label]
                cells.append(f"{s['mean_gap']:.2f} / {s['worst_gap']:.2f} ({s['mean_loss']:.3f})")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lab", default=str(DEFAULT_LAB))
    parser.add_argument("--suites", default="encoder,generative")
    parser.add_argument("--k", default="2,4,6")
    parser.add_argument("--sets", type=int, default=3, help="task sets per K")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-eval", type=int, default=None, help="held-out examples per task")
    parser.add_argument("--methods", default=None, help="comma-separated row labels (default: all)")
    parser.add_argument("--name", default="fusion_quality")
    args = parser.parse_args(argv)

    lab = load_lab(args.lab)
    rows = list(BASELINES)
    if args.methods:
        wanted = args.methods.split(",")
        rows = [r for r in rows if r.label in wanted]
    ks = [int(k) for k in args.k.split(",")]
    started = time.perf_counter()
    results: dict[str, Any] = {
        "benchmark": "fusion_quality",
        "lab": {"path": lab["root"], "size": lab.get("size"), "seed": lab.get("seed")},
        "seed": args.seed,
        "sets_per_k": args.sets,
        "max_eval": args.max_eval,
        "rows": [r.__dict__ for r in rows],
        "environment": environment(),
        "suites": {},
    }
    for suite in args.suites.split(","):
        harness = SuiteHarness.build(lab, suite, max_eval=args.max_eval)
        results["suites"][suite] = evaluate_suite(harness, rows, ks, args.sets, args.seed, print)
    results["seconds"] = time.perf_counter() - started
    write_json(args.name, results)
    plot(results, RESULTS / f"{args.name}.png")
    print(table(results))
    return results


if __name__ == "__main__":
    main()
