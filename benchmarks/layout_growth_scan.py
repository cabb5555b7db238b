"""Grown-layout scan benchmark: a catalog whose layout grew vs the same adapters in one layout.

Builds two catalogs of the same ``--n`` synthetic adapters of one base model (4 layers, d = 128):

* **grown**: three ingests, each growing the layout: ``q,v`` at rank 4, then ``q,k,v`` at rank 8,
  then ``q,k,v,o`` at rank 8 (a third of the adapters each, stored in their own layout version);
* **single**: every adapter written directly in the final layout (``Layout.embed``), one ingest.

Both stream through ``catalog.dataset(columns=["weights", "mask"]).iter_batches(batch_size=256)``
in one process on an embedded local Ray, alternating, one warm-up scan each (excluded) then
``--repeats`` timed scans; the figure is the ratio of the medians (grown / single; the goal: at
most 1.1). The sums of the streamed weights must agree (same content). Results go to
``<out-dir>/layout_growth_scan.json`` and ``.png``.

Run: ``.venv/bin/python benchmarks/layout_growth_scan.py [--n 600]`` (see ``benchmarks/README.md``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT_DIR = REPO / "benchmarks" / "results"
BASE = "synthetic/grown"
VERSIONS = (
    (("q_proj", "v_proj"), 4),
    (("q_proj", "k_proj", "v_proj"), 8),
    (("q_proj", "k_proj", "v_proj", "o_proj"), 8),
)


def build(work: Path, n: int):
    from engine.catalog import AdapterRecord, Catalog
    from engine.catalog.synth import build_layout, synthetic_records

    layouts = [build_layout(4, modules, 128, r, base_model=BASE) for modules, r in VERSIONS]
    final = layouts[-1]
    grown, single = Catalog(work / "grown"), Catalog(work / "single")
    grown._ensure_settings(None)
    single._ensure_settings(None)
    padded = []
    for k, layout in enumerate(layouts):
        records = list(synthetic_records(layout, n // len(layouts), num_tasks=4, seed=k))
        grown.add_records(iter(records))
        for _, record in records:
            weights, mask = final.embed(layout, record.weights, record.mask)
            meta = dict(record.meta, layout_id=final.layout_id)
            padded.append((final, AdapterRecord(meta, weights, mask)))
    single.add_records(iter(padded))
    assert grown.layout() == final and len(grown.layouts()) == 3 and len(single.layouts()) == 1
    return grown, single


def scan(catalog) -> tuple[float, float, int]:
    start = time.perf_counter()
    total, rows = 0.0, 0
    dataset = catalog.dataset(columns=["weights", "mask"])
    for batch in dataset.iter_batches(batch_size=256, batch_format="numpy"):
        total += float(batch["weights"].sum(dtype=np.float64))
        rows += len(batch["weights"])
    return time.perf_counter() - start, total, rows


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    names = ["single", "grown"]
    values = [result[name]["mb_per_s"] for name in names]
    ax.bar(["one layout", "grown (3 versions)"], values, color=["#4c72b0", "#dd8452"])
    ax.set_ylabel("Ray Data scan, MB/s")
    ax.set_title(f"{result['n']} adapters, N={result['N']}: ratio {result['time_ratio']:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=600, help="adapters per catalog")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args(argv)

    from engine._ray import ensure_ray

    work = Path(tempfile.mkdtemp(prefix="icmf-grown-scan-"))
    try:
        grown, single = build(work, args.n)
        ensure_ray()
        times: dict[str, list[float]] = {"grown": [], "single": []}
        sums = {}
        for repeat in range(args.repeats + 1):
            for name, catalog in (("single", single), ("grown", grown)):
                seconds, total, rows = scan(catalog)
                sums[name] = (round(total, 3), rows)
                if repeat:  # the first round warms both up
                    times[name].append(seconds)
        if sums["grown"] != sums["single"]:
            raise SystemExit(f"the two catalogs streamed different contents: {sums}")
        size = grown.layout().size
        megabytes = sums["grown"][1] * size * 4 / 1e6
        result = {
            "benchmark": "layout_growth_scan",
            "created": datetime.now(timezone.utc).isoformat(),
            "n": sums["grown"][1],
            "N": size,
            "versions": [{"modules": list(m), "r_max": r} for m, r in VERSIONS],
            "repeats": args.repeats,
            "time_ratio": statistics.median(times["grown"]) / statistics.median(times["single"]),
        }
        for name in times:
            median = statistics.median(times[name])
            result[name] = {"seconds": times[name], "median_s": median, "mb_per_s": megabytes / median}
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "layout_growth_scan.json").write_text(json.dumps(result, indent=2) + "\n")
        plot(result, args.out_dir / "layout_growth_scan.png")
        print(
            f"grown {result['grown']['mb_per_s']:.0f} MB/s, single {result['single']['mb_per_s']:.0f} MB/s, "
            f"time ratio grown/single {result['time_ratio']:.3f}"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
