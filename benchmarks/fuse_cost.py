"""fuse_cost: what a fusion with ``icm`` costs against ``linear`` (issue 15 §4's cost goal: K = 8
with ``icm`` — read, encode, decode, write — at most 2x the time of ``linear``).

One process; each repeat runs both methods back to back (their order alternating, so load from
other processes falls on both alike) through the engine's own path: ``fusion_context`` then
``fuse_from_catalog`` (catalog read, the method, the finite check) then ``FusionResult.save`` (the
PEFT folder). The F-VAE is loaded once before the timings (a server or a long-lived job holds it);
``icm`` runs without its per-input cache, so every repeat encodes its K inputs. Time is split into
``read`` (catalog adapters), ``fuse`` (the method) and ``write`` (the PEFT folder), each as wall and
as CPU seconds of the process (on a shared machine the CPU seconds move less with other load).

    .venv/bin/python -m benchmarks.fuse_cost --catalog DIR --fvae DIR [--k 8] [--repeats 5] [--name NAME]
        [--condition trained|adapter]

``--condition adapter`` conditions every input on its own adapter's projection, the path of
adapters whose tasks the F-VAE never saw (the default, ``trained``, uses meta-training's vectors).

Writes results/<name>.json and .png (median seconds per phase and method; the ratios icm / linear).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks._common import RESULTS, environment, write_json

METHODS = ("linear", "icm")


def _pick_ids(catalog, k: int) -> list[str]:
    """K adapters, taking the tasks round-robin (the first-ingested adapter of each first)."""
    by_task: dict[str, list[str]] = {}
    for entry in catalog.entries():
        by_task.setdefault(entry["task"], []).append(entry["id"])
    queues = [list(ids) for _, ids in sorted(by_task.items())]
    picked: list[str] = []
    while len(picked) < k and any(queues):
        for queue in queues:
            if queue and len(picked) < k:
                picked.append(queue.pop(0))
    if len(picked) < k:
        raise SystemExit(f"{catalog.uri} holds {len(picked)} adapters; --k {k} needs more")
    return picked


def _one_fusion(
    catalog, method: str, ids: list[str], fvae, out: Path, icm_params: dict | None = None
) -> dict[str, float]:
    """One fusion's seconds per phase (``read``, ``fuse``, ``write``, ``total``), wall and CPU."""
    from engine.fusion import fuse_adapters, fusion_context

    marks = [(time.perf_counter(), time.process_time())]
    entries = {e["id"]: e for e in catalog.entries()}
    adapters = [catalog.load_adapter(i) for i in ids]
    marks.append((time.perf_counter(), time.process_time()))
    tasks = [entries[i]["task"] for i in ids]
    params = (icm_params or {}) if method == "icm" else {}
    context = fusion_context(
        method, params, catalog=catalog, adapter_ids=ids, fvae=fvae if method == "icm" else None
    )
    result = fuse_adapters(adapters, method, None, params, 0, tasks, context)
    marks.append((time.perf_counter(), time.process_time()))
    result.save(str(out))
    marks.append((time.perf_counter(), time.process_time()))
    timing = {}
    for clock, kind in ((0, "wall"), (1, "cpu")):
        for phase, (start, end) in zip(("read", "fuse", "write"), itertools.pairwise(marks), strict=True):
            timing[f"{phase}_{kind}"] = end[clock] - start[clock]
        timing[f"total_{kind}"] = marks[-1][clock] - marks[0][clock]
    return timing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--catalog", required=True, help="catalog directory or URI")
    parser.add_argument("--fvae", required=True, help="F-VAE artifact trained on that catalog")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--name", default="fuse_cost")
    parser.add_argument(
        "--condition",
        choices=("trained", "adapter"),
        default="trained",
        help="icm's condition param: 'adapter' derives every input's task vector from the adapter "
        "(the seeded projection), as for adapters of tasks the F-VAE never saw",
    )
    args = parser.parse_args(argv)

    import os

    from engine.catalog import Catalog
    from engine.fvae.artifact import FVAEArtifact

    load_before = os.getloadavg()
    catalog = Catalog(args.catalog)
    fvae = FVAEArtifact.load(args.fvae)
    ids = _pick_ids(catalog, args.k)
    icm_params = {"condition": args.condition}
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
    with tempfile.TemporaryDirectory() as tmp:
        for method in METHODS:  # imports, first reads, the methods' lazy set-up
            _one_fusion(catalog, method, ids, fvae, Path(tmp) / f"warm-{method}", icm_params)
        for repeat in range(args.repeats):
            order = METHODS if repeat % 2 == 0 else METHODS[::-1]
            for method in order:
                timing = _one_fusion(catalog, method, ids, fvae, Path(tmp) / f"{method}-{repeat}", icm_params)
                runs[method].append(timing)
                print(f"repeat {repeat} {method:7s} " + " ".join(f"{k} {v:7.2f}s" for k, v in timing.items()))
    medians = {
        m: {phase: statistics.median(r[phase] for r in runs[m]) for phase in runs[m][0]} for m in METHODS
    }
    ratios = {
        kind: medians["icm"][f"total_{kind}"] / medians["linear"][f"total_{kind}"] for kind in ("wall", "cpu")
    }
    for kind, ratio in ratios.items():
        print(
            f"median total {kind}: linear {medians['linear'][f'total_{kind}']:.2f}s, "
            f"icm {medians['icm'][f'total_{kind}']:.2f}s; ratio {ratio:.2f} (goal <= 2)"
        )
    layout = catalog.layout()
    data = {
        "benchmark": "fuse_cost",
        "catalog": str(args.catalog),
        "fvae": str(args.fvae),
        "fvae_arch": fvae.model.config.arch,
        "n": layout.size,
        "k": args.k,
        "icm_params": icm_params,
        "repeats": args.repeats,
        "runs": runs,
        "median_seconds": medians,
        "ratio_icm_over_linear": ratios,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "environment": environment(),
    }
    path = write_json(args.name, data)
    _chart(medians, ratios, layout.size, args.k, RESULTS / f"{args.name}.png")
    print(f"wrote {path}")
    return 0


def _chart(medians: dict, ratios: dict, n: int, k: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
    for ax, kind in zip(axes, ("wall", "cpu"), strict=True):
        bottom = [0.0] * len(METHODS)
        for phase in ("read", "fuse", "write"):
            values = [medians[m][f"{phase}_{kind}"] for m in METHODS]
            ax.bar(METHODS, values, bottom=bottom, label=phase)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        ax.set_ylabel(f"median {kind} seconds")
        ax.set_title(f"{kind}: icm / linear = {ratios[kind]:.2f}")
    axes[0].legend()
    fig.suptitle(f"fusion cost, K = {k}, N = {n:,}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
