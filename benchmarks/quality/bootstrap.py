"""Paired bootstrap over held-out examples: intervals for each row's G and for differences of rows.

The noise this measures is the eval sample's: which examples a task's eval split happens to hold.
One replicate draws, for every task, ``n`` of its ``n`` eval examples with replacement, and applies
the *same* draw to the base, the own adapter and every fused adapter of every task set (paired):
rows are compared on identical examples, so the interval of a difference is much narrower than
the two rows' own intervals would suggest. Each replicate recomputes every task's metric from the
resampled per-example sums (``TaskModel.finalize``), then G, the row's statistic per task set, and
its mean over the task sets, exactly as the unresampled table does.

A method is called better than another only when the interval of their difference excludes 0.

Seeds of the F-VAE are not resampled here (their spread is :mod:`benchmarks.quality.seeds`): an
``icm`` row's per-example sums are the mean over its F-VAE seeds, which gives each replicate the
seed-mean of G exactly, because G is linear in the fused metric and the metrics are ratios of sums
whose denominators (examples, tokens) do not depend on the model.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.tasks.metrics import GAP_EPS

# A difference of mean G no larger than this in every replicate is float rounding, not a difference.
ROUNDING = 1e-6

LEVEL = 0.95
REPLICATES = 2000

TaskSums = dict[str, np.ndarray]  # sum key -> [n] per-example shares (TaskModel.example_sums)
Finalize = Callable[[Mapping[str, float]], Mapping[str, float]]


@dataclass
class SetSamples:
    """One task set's per-example sums: ``rows[label][task]`` for every fused row scored."""

    tasks: list[str]
    rows: dict[str, dict[str, TaskSums]] = field(default_factory=dict)


def mean_sums(runs: Sequence[Mapping[str, TaskSums]]) -> dict[str, TaskSums]:
    """Per task and key, the mean of several runs' per-example sums (one run per F-VAE seed)."""
    first = runs[0]
    return {
        task: {key: np.mean([run[task][key] for run in runs], axis=0) for key in first[task]}
        for task in first
    }


def _metric_per_replicate(sums: TaskSums, counts: np.ndarray, finalize: Finalize, metric: str) -> np.ndarray:
    """``[R]``: the metric over each replicate's examples (``counts [R, n]`` multiplicities)."""
    totals = {key: counts @ values for key, values in sums.items()}
    return np.array(
        [finalize({k: float(v[r]) for k, v in totals.items()})[metric] for r in range(len(counts))]
    )


def _gap(base: np.ndarray, own: np.ndarray, fused: np.ndarray, sign: float) -> np.ndarray:
    """G per replicate; NaN where the own adapter does not beat the base (as ``gap_closure``'s None)."""
    closable = sign * (base - own)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(closable > GAP_EPS, sign * (base - fused) / closable, np.nan)


def _interval(values: np.ndarray, estimate: float, level: float) -> dict[str, Any]:
    kept = values[np.isfinite(values)]
    if len(kept) == 0:
        return {"estimate": estimate, "low": None, "high": None, "replicates": 0}
    low, high = np.percentile(kept, [50 * (1 - level), 50 * (1 + level)])
    return {"estimate": estimate, "low": float(low), "high": float(high), "replicates": len(kept)}


def paired_bootstrap(
    samples: Sequence[SetSamples],
    base: Mapping[str, TaskSums],
    own: Mapping[str, TaskSums],
    finalize: Finalize,
    metric: str,
    lower_is_better: bool,
    replicates: int = REPLICATES,
    level: float = LEVEL,
    seed: int = 0,
    unranked: Sequence[str] = (),
) -> dict[str, Any]:
    """Percentile intervals of every row's mean and pooled G, and of the differences of rows' mean G.

    Args:
        samples: the task sets of one K, each with its rows' per-example sums (rows absent from a
            set are left out of the comparison).
        base, own: per task, the base's and the own adapter's per-example sums on the same eval
            examples.
        finalize: the task model's ``finalize`` (sums -> metrics).
        metric: the metric G is computed on (``loss`` or ``accuracy``).
        lower_is_better: True for a loss, False for an accuracy.
        replicates, level, seed: the bootstrap's size, interval level and RNG seed.
        unranked: rows that get intervals and differences but are not candidates for best or worst
            (a reference such as a jointly trained LoRA, which is not a fusion).

    Returns:
        ``rows``: per row label, ``mean_gap`` and ``pooled_gap`` as ``{estimate, low, high,
        replicates}``; ``differences``: one per pair of rows, ``a - b`` of mean G with its interval
        and ``separated`` (the interval excludes 0 by more than :data:`ROUNDING`); ``best`` /
        ``worst``: the rows with the highest / lowest mean G, ``best_vs_worst`` their difference,
        ``tied_with_best`` the rows whose difference to the best includes 0.
    """
    if not samples:
        raise ValueError("no task sets to resample")
    # The fused rows (base and own are not resampled: their G is 0 and 1 by definition).
    labels = [label for label in samples[0].rows if all(label in s.rows for s in samples)]
    tasks = sorted({t for s in samples for t in s.tasks})
    rng = np.random.default_rng(seed)
    sign = 1.0 if lower_is_better else -1.0
    # Row 0 of every count matrix is the sample itself (all ones): the point estimate.
    counts = {}
    for task in tasks:
        n = len(next(iter(base[task].values())))
        counts[task] = np.vstack([np.ones((1, n)), rng.multinomial(n, np.full(n, 1.0 / n), size=replicates)])
    base_m = {t: _metric_per_replicate(base[t], counts[t], finalize, metric) for t in tasks}
    own_m = {t: _metric_per_replicate(own[t], counts[t], finalize, metric) for t in tasks}
    stats: dict[str, dict[str, np.ndarray]] = {}
    for label in labels:
        mean_gaps, pooled_gaps = [], []
        for s in samples:
            fused = {t: _metric_per_replicate(s.rows[label][t], counts[t], finalize, metric) for t in s.tasks}
            gaps = np.stack([_gap(base_m[t], own_m[t], fused[t], sign) for t in s.tasks])
            with warnings.catch_warnings():  # a replicate where no task has a gap to close: NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                mean_gaps.append(np.nanmean(gaps, axis=0))  # over the tasks with a G, as the table
            gained = sum(sign * (base_m[t] - fused[t]) for t in s.tasks)
            closable = sum(sign * (base_m[t] - own_m[t]) for t in s.tasks)
            with np.errstate(divide="ignore", invalid="ignore"):
                pooled_gaps.append(np.where(closable > 0, gained / closable, np.nan))
        stats[label] = {"mean_gap": np.mean(mean_gaps, axis=0), "pooled_gap": np.mean(pooled_gaps, axis=0)}
    rows = {
        label: {key: _interval(values[1:], float(values[0]), level) for key, values in by_key.items()}
        for label, by_key in stats.items()
    }
    differences = []
    for a, b in itertools.combinations(labels, 2):
        diff = stats[a]["mean_gap"] - stats[b]["mean_gap"]
        interval = _interval(diff[1:], float(diff[0]), level)
        # Rows that are one fusion up to float rounding (two rows whose rules coincide on these
        # inputs, summed in another order) differ by a few ulps in every replicate: no difference.
        separated = interval["low"] is not None and (
            interval["low"] > ROUNDING or interval["high"] < -ROUNDING
        )
        differences.append({"a": a, "b": b, **interval, "separated": separated})
    out: dict[str, Any] = {
        "unit": "eval examples within each task, one draw shared by every row and task set (paired)",
        "metric": metric,
        "replicates": replicates,
        "level": level,
        "seed": seed,
        "rows": rows,
        "differences": differences,
    }
    candidates = [label for label in labels if label not in unranked]
    if len(candidates) >= 2:
        ranked = sorted(candidates, key=lambda label: rows[label]["mean_gap"]["estimate"], reverse=True)
        best, worst = ranked[0], ranked[-1]
        out.update(best=best, worst=worst, best_vs_worst=_difference(differences, best, worst))
        out["tied_with_best"] = [
            label for label in ranked[1:] if not _difference(differences, best, label)["separated"]
        ]
    return out


def _difference(differences: Sequence[Mapping[str, Any]], a: str, b: str) -> dict[str, Any]:
    """``a - b`` from the pairwise list (stored in either order)."""
    for d in differences:
        if (d["a"], d["b"]) == (a, b):
            return dict(d)
        if (d["a"], d["b"]) == (b, a):
            flip = lambda v: None if v is None else -v  # noqa: E731
            return {
                **d,
                "a": a,
                "b": b,
                "estimate": -d["estimate"],
                "low": flip(d["high"]),
                "high": flip(d["low"]),
            }
    raise KeyError(f"no difference {a} - {b}")
