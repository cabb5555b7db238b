"""The ``icm`` rows over several meta-training seeds: the F-VAE's training is a random variable.

Each ``icm`` row is fused and scored once per F-VAE (one per meta-training seed) on the same task
sets. A task set's row then holds the seed-mean of every statistic (so the tables and charts built
on the per-set results show the mean over seeds) and each seed's own result under ``per_seed``.
Over seeds, each statistic of the row's summary (mean over task sets) is reported as its mean,
sample standard deviation and a two-sided Student-t interval for the mean.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

LEVEL = 0.95
STAT_PREFIXES = ("mean_", "worst_", "pooled_")


def seed_interval(values: Sequence[float], level: float = LEVEL) -> dict[str, Any]:
    """Mean, sample std and the Student-t ``level`` interval of the mean of ``values`` (one per seed).

    With one value the spread and interval are undefined (``None``).
    """
    from scipy import stats

    n = len(values)
    if n == 0:
        raise ValueError("no values: give at least one seed's result")
    mean = sum(values) / n
    if n == 1:
        return {"mean": mean, "std": None, "low": None, "high": None, "n": 1, "values": list(values)}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + level / 2, df=n - 1)) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "low": mean - half, "high": mean + half, "n": n, "values": list(values)}


def _stats(scored: Mapping[str, Any]) -> dict[str, float]:
    return {k: v for k, v in scored.items() if k.startswith(STAT_PREFIXES) and isinstance(v, int | float)}


def _mean_numbers(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Per key every record holds as a number (not None): its mean over the records."""
    keys = set.intersection(*({k for k, v in r.items() if isinstance(v, int | float)} for r in records))
    return {k: sum(r[k] for r in records) / len(records) for k in sorted(keys)}


def combine_seed_runs(per_seed: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """One task set's row over seeds: each statistic's seed-mean (where every seed has it), plus
    ``per_seed`` (each seed's full result, keyed by the seed as a string: JSON keys)."""
    runs = list(per_seed.values())
    combined: dict[str, Any] = _mean_numbers([_stats(r) for r in runs])
    combined["fuse_seconds"] = sum(r.get("fuse_seconds", 0.0) for r in runs) / len(runs)
    # Each task's numbers too (the per-task tables, e.g. the unseen tasks' G, read them).
    tasks = set.intersection(*(set(r.get("tasks", {})) for r in runs))
    if tasks:
        combined["tasks"] = {t: _mean_numbers([r["tasks"][t] for r in runs]) for t in sorted(tasks)}
    combined["per_seed"] = {str(seed): dict(result) for seed, result in per_seed.items()}
    return combined


def seed_summary(entries: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per row label: each statistic's interval over seeds of its mean over the task sets.

    ``entries``: task sets whose ``methods[label]`` came from :func:`combine_seed_runs`.
    """
    out: dict[str, dict[str, Any]] = {}
    for label in labels:
        rows = [entry["methods"][label] for entry in entries if label in entry["methods"]]
        if not rows or "per_seed" not in rows[0]:
            continue
        seeds = list(rows[0]["per_seed"])
        keys = set.intersection(*(set(_stats(row["per_seed"][s])) for row in rows for s in seeds))
        out[label] = {"seeds": [int(s) for s in seeds]}
        for key in sorted(keys):
            per_seed_means = [sum(row["per_seed"][s][key] for row in rows) / len(rows) for s in seeds]
            out[label][key] = seed_interval(per_seed_means)
    return out
