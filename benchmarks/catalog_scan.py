"""Catalog scan benchmark: Ray Data streaming vs a plain pyarrow read, and peak memory.

For each catalog size (default 1,000 and 10,000 synthetic adapters of the "small" layout,
N = 16,384 float32 per adapter) this script

1. builds the catalog once under the work directory (``engine.catalog.synth.synthesize``; reused
   on later runs when it already holds the right adapters),
2. scans every adapter's weights twice over, each scan in a fresh subprocess:

   * **ray**: ``catalog.dataset().iter_batches(batch_size=256, batch_format="numpy")`` on an
     embedded local Ray (``engine._ray.ensure_ray``), summing every ``weights`` batch;
   * **pyarrow**: ``pyarrow.parquet.ParquetFile(...).iter_batches(batch_size=256)`` over the
     manifest's shard files, converting ``weights`` to a ``[rows, N]`` float32 array and summing it,

   one warm-up scan (excluded) then ``--repeats`` timed scans; throughput is the median, in
   MB/s with MB = 10^6 bytes of weights (rows * N * 4),
3. records peak memory: the scanning process's RSS and, for the ray scan, the RSS of
   the Ray worker processes sampled every ``--sample-interval`` seconds in a background thread.

Results go to ``<out-dir>/catalog_scan.json`` and ``<out-dir>/catalog_scan.png``.

Run: ``.venv/bin/python benchmarks/catalog_scan.py`` (see ``benchmarks/README.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import environment

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WORK_DIR = REPO / "benchmarks" / "results" / "tmp"
DEFAULT_OUT_DIR = REPO / "benchmarks" / "results"
MB = 1e6
MIB = 2**20
# Helper processes a local Ray starts under the raylet that are not task/actor workers.
RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


# ---------------------------------------------------------------------------------------- memory
def maxrss_bytes() -> int:
    """Peak resident set size of this process so far (``ru_maxrss`` is KiB on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _ray_workers(root) -> list:
    """Ray worker processes (tasks, actors, idle workers) below ``root`` (the driver)."""
    import psutil

    workers = []
    for proc in root.children(recursive=True):
        try:
            cmdline = proc.cmdline() or [""]
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        title = cmdline[0]
        if (title.startswith("ray::") and not title.startswith(RAY_AGENTS)) or any(
            "default_worker.py" in part for part in cmdline[:4]
        ):
            workers.append(proc)
    return workers


class RssSampler:
    """Samples the driver's and the Ray workers' resident memory in a background thread.

    Per sample: every worker's RSS and its private part (RSS minus resident shared pages, i.e.
    without the object-store / file pages a worker has mapped). Keeps the peaks.
    """

    def __init__(self, interval: float, workers: bool):
        import psutil

        self.interval = interval
        self.with_workers = workers
        self.me = psutil.Process()
        self.peak = {
            "driver_rss": 0,
            "driver_private": 0,
            "worker_rss_max": 0,
            "worker_private_max": 0,
            "workers_rss_sum": 0,
            "workers_private_sum": 0,
            "num_workers_max": 0,
        }
        self.max_worker_title = ""
        self.worker_pids: set[int] = set()  # every worker process seen (churn: actors started per scan)
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        import psutil

        self.samples += 1
        info = self.me.memory_info()
        self.peak["driver_rss"] = max(self.peak["driver_rss"], info.rss)
        self.peak["driver_private"] = max(self.peak["driver_private"], info.rss - getattr(info, "shared", 0))
        if not self.with_workers:
            return
        total = private_total = count = 0
        for proc in _ray_workers(self.me):
            try:
                info = proc.memory_info()
                title = proc.cmdline()[0]
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, IndexError):
                continue
            private = info.rss - getattr(info, "shared", 0)
            count += 1
            self.worker_pids.add(proc.pid)
            total += info.rss
            private_total += private
            if info.rss > self.peak["worker_rss_max"]:
                self.peak["worker_rss_max"] = info.rss
                self.max_worker_title = title
            self.peak["worker_private_max"] = max(self.peak["worker_private_max"], private)
        self.peak["workers_rss_sum"] = max(self.peak["workers_rss_sum"], total)
        self.peak["workers_private_sum"] = max(self.peak["workers_private_sum"], private_total)
        self.peak["num_workers_max"] = max(self.peak["num_workers_max"], count)


# ---------------------------------------------------------------------------------------- scans
def scan_pyarrow(catalog, batch_size: int) -> tuple[int, float]:
    """Plain pyarrow read of the manifest's shards; returns ``(rows, checksum)``."""
    import numpy as np
    import pyarrow.parquet as pq

    size = catalog.layout().size
    shards = sorted(set(catalog.manifest()["shard"].to_pylist()))
    rows, total = 0, 0.0
    for shard in shards:
        source = pq.ParquetFile(catalog.path(shard), filesystem=catalog.fs)
        # The same columns the Ray path reads (engine.catalog.streaming.adapter_dataset).
        for batch in source.iter_batches(batch_size=batch_size, columns=["id", "weights", "mask"]):
            column = batch.column("weights")
            weights = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), size)
            weights = weights.astype(np.float32, copy=False)
            total += float(weights.sum(dtype=np.float64))
            rows += len(weights)
    return rows, total


def scan_ray(catalog, batch_size: int) -> tuple[int, float]:
    """Ray Data stream of the catalog; returns ``(rows, checksum)``."""
    import numpy as np

    global _last_dataset
    rows, total = 0, 0.0
    _last_dataset = dataset = catalog.dataset()
    for batch in dataset.iter_batches(batch_size=batch_size, batch_format="numpy"):
        weights = batch["weights"]
        total += float(weights.sum(dtype=np.float64))
        rows += len(weights)
    return rows, total


_last_dataset = None  # the last scanned ray.data.Dataset, for its per-operator stats


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    """One scan mode on one catalog, in this (fresh) process: warm-up + timed repeats + memory."""
    import psutil

    from engine.catalog.catalog import Catalog

    catalog = Catalog(args.catalog)
    layout = catalog.layout()
    result: dict[str, Any] = {"mode": args.child, "catalog": args.catalog}
    started = time.perf_counter()
    if args.child == "ray":
        from engine._ray import ensure_ray

        ensure_ray()
        scan = scan_ray
    else:
        scan = scan_pyarrow
    result["startup_s"] = time.perf_counter() - started
    result["loadavg_before"] = os.getloadavg()
    result["driver_rss_before_scan"] = psutil.Process().memory_info().rss
    result["driver_maxrss_before_scan"] = maxrss_bytes()

    times, checksums, rows = [], [], 0
    with RssSampler(args.sample_interval, workers=args.child == "ray") as sampler:
        for i in range(args.repeats + 1):
            t0 = time.perf_counter()
            rows, checksum = scan(catalog, args.batch_size)
            elapsed = time.perf_counter() - t0
            checksums.append(checksum)
            if i == 0:
                result["warmup_s"] = elapsed
            else:
                times.append(elapsed)
    nbytes = rows * layout.size * 4
    expected = catalog.manifest().num_rows
    if rows != expected:
        raise RuntimeError(f"{args.child} scan saw {rows} rows, the manifest lists {expected}")
    if args.child == "ray":
        import ray

        try:
            result["ray_dataset_stats"] = _last_dataset.stats()
        except Exception as exc:  # diagnostics only
            result["ray_dataset_stats"] = f"unavailable: {exc!r}"
        ray.shutdown()
    median = statistics.median(times)
    result.update(
        rows=rows,
        bytes=nbytes,
        times_s=times,
        median_s=median,
        mb_per_s=nbytes / MB / median,
        mb_per_s_runs=[nbytes / MB / t for t in times],
        checksum=checksums[-1],
        checksums_agree=max(checksums) - min(checksums) <= 1e-6 * max(1.0, abs(checksums[-1])),
        driver_peak_rss=maxrss_bytes(),
        sampled=dict(
            sampler.peak,
            samples=sampler.samples,
            max_worker_title=sampler.max_worker_title,
            distinct_worker_pids=len(sampler.worker_pids),
        ),
        loadavg_after=os.getloadavg(),
    )
    return result


def spawn_child(mode: str, catalog: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run one scan mode in a fresh interpreter and return its JSON result."""
    with tempfile.TemporaryDirectory(prefix="catalog_scan-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            mode,
            "--catalog",
            str(catalog),
            "--child-out",
            str(out),
            "--repeats",
            str(args.repeats),
            "--batch-size",
            str(args.batch_size),
            "--sample-interval",
            str(args.sample_interval),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout)
        if proc.returncode != 0 or not out.exists():
            sys.stderr.write(proc.stdout[-5000:] + proc.stderr[-5000:])
            raise RuntimeError(f"{mode} scan of {catalog} failed (exit status {proc.returncode})")
        return json.loads(out.read_text())


# ---------------------------------------------------------------------------------------- catalogs
def build_catalog(work_dir: Path, n: int, layout_spec: str, seed: int, num_tasks: int) -> tuple[Path, dict]:
    """The catalog of ``n`` synthetic adapters under ``work_dir``, built unless already there."""
    from engine.catalog.catalog import Catalog
    from engine.catalog.synth import parse_layout, synthesize

    layout = parse_layout(layout_spec)
    path = work_dir / f"catalog-{layout.layout_id}-n{n}-t{num_tasks}-seed{seed}"
    if path.exists():
        try:
            catalog = Catalog(path)
            manifest = catalog.manifest()
            ok = manifest.num_rows == n and set(manifest["layout_id"].to_pylist()) == {layout.layout_id}
        except Exception:  # any unreadable leftover is rebuilt
            ok = False
        if ok:
            return path, {"cached": True, "build_s": 0.0}
        shutil.rmtree(path)
    print(f"  building {n} adapters ({layout_spec}, N={layout.size}) at {path} ...", flush=True)
    # The per-module SVDs of synthesis are tiny: intra-op threads only add overhead, and on a busy
    # machine torch's spinning worker threads slow synthesis down several times.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        synthesize(Catalog(path), n, layout, num_tasks=num_tasks, seed=seed)
    finally:
        torch.set_num_threads(threads)
    return path, {"cached": False, "build_s": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------- report
def summarise(n: int, pa_res: dict, ray_res: dict) -> dict[str, Any]:
    sampled = ray_res["sampled"]
    return {
        "n": n,
        "rows": ray_res["rows"],
        "bytes": ray_res["bytes"],
        "pyarrow_mb_per_s": pa_res["mb_per_s"],
        "ray_mb_per_s": ray_res["mb_per_s"],
        "ratio_ray_over_pyarrow": ray_res["mb_per_s"] / pa_res["mb_per_s"],
        # Sampled RSS, not ru_maxrss: Linux carries a process's peak across fork and exec, so a
        # scan process spawned after this one built a large catalog would report the build's peak.
        "ray_driver_peak_rss_mib": sampled["driver_rss"] / MIB,
        "ray_driver_maxrss_mib": ray_res["driver_peak_rss"] / MIB,
        "ray_driver_rss_before_scan_mib": ray_res["driver_rss_before_scan"] / MIB,
        "ray_driver_peak_private_mib": sampled["driver_private"] / MIB,
        "ray_worker_peak_rss_mib": sampled["worker_rss_max"] / MIB,
        "ray_worker_peak_private_mib": sampled["worker_private_max"] / MIB,
        "ray_workers_sum_peak_rss_mib": sampled["workers_rss_sum"] / MIB,
        "pyarrow_peak_rss_mib": pa_res["sampled"]["driver_rss"] / MIB,
        "pyarrow_peak_private_mib": pa_res["sampled"]["driver_private"] / MIB,
        "pyarrow_maxrss_mib": pa_res["driver_peak_rss"] / MIB,
        "pyarrow_rss_before_scan_mib": pa_res["driver_rss_before_scan"] / MIB,
        "ray_distinct_worker_processes": sampled["distinct_worker_pids"],
        "ray_warmup_s": ray_res["warmup_s"],
        "ray_startup_s": ray_res["startup_s"],
    }


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [f"{r['n']:,} adapters\n({r['bytes'] / MB:,.0f} MB)" for r in rows]
    x = np.arange(len(rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))

    width = 0.38
    series = [("pyarrow", "pyarrow_mb_per_s", "#4c72b0"), ("Ray Data", "ray_mb_per_s", "#dd8452")]
    for i, (name, key, color) in enumerate(series):
        values = [r[key] for r in rows]
        bars = left.bar(x + (i - 0.5) * width, values, width, label=name, color=color)
        left.bar_label(bars, labels=[f"{v:,.0f}" for v in values], padding=2, fontsize=9)
    left.set_ylim(0, max(max(r["pyarrow_mb_per_s"], r["ray_mb_per_s"]) for r in rows) * 1.2)
    left.set_xticks(
        x,
        [
            f"{lab}\nray/pyarrow = {r['ratio_ray_over_pyarrow']:.2f}"
            for lab, r in zip(labels, rows, strict=True)
        ],
    )
    left.set_ylabel("scan throughput (MB/s, median of repeats)")
    left.set_title("Weights scan throughput (higher is better)")
    left.legend(loc="upper right")

    width = 0.2
    series = [
        ("Ray driver, sampled RSS", "ray_driver_peak_rss_mib", "#dd8452"),
        ("Ray driver, private (RSS - shared)", "ray_driver_peak_private_mib", "#f2c09c"),
        ("largest Ray worker, sampled RSS", "ray_worker_peak_rss_mib", "#c44e52"),
        ("pyarrow process, sampled RSS", "pyarrow_peak_rss_mib", "#4c72b0"),
    ]
    for i, (name, key, color) in enumerate(series):
        values = [r[key] for r in rows]
        bars = right.bar(x + (i - 1.5) * width, values, width, label=name, color=color)
        right.bar_label(bars, labels=[f"{v:,.0f}" for v in values], padding=2, fontsize=8)
    right.set_ylim(0, max(r[key] for r in rows for _, key, _ in series) * 1.25)
    right.set_xticks(x, labels)
    right.set_ylabel("peak resident memory (MiB)")
    right.set_title("Peak RSS while scanning (flat = bounded memory)")
    right.legend(loc="upper left", fontsize=9)

    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(rows: list[dict[str, Any]], memory: dict[str, float]) -> None:
    header = (
        f"{'adapters':>9} {'MB':>7} {'pyarrow MB/s':>13} {'ray MB/s':>9} {'ray/pa':>7} "
        f"{'driver MiB':>11} {'drv priv MiB':>13} {'worker MiB':>11} {'pa MiB':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['n']:>9,} {r['bytes'] / MB:>7,.0f} {r['pyarrow_mb_per_s']:>13,.0f} "
            f"{r['ray_mb_per_s']:>9,.0f} {r['ratio_ray_over_pyarrow']:>7.2f} "
            f"{r['ray_driver_peak_rss_mib']:>11,.0f} {r['ray_driver_peak_private_mib']:>13,.0f} "
            f"{r['ray_worker_peak_rss_mib']:>11,.0f} "
            f"{r['pyarrow_peak_rss_mib']:>7,.0f}"
        )
    if memory:
        print(
            "peak RSS, largest / smallest catalog: "
            + ", ".join(f"{k.replace('_', ' ')} x{v:.2f}" for k, v in memory.items())
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000], help="adapters per catalog")
    parser.add_argument("--layout", default="small", help="layout preset, spec or JSON file (synth)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-tasks", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="timed scans after one warm-up")
    parser.add_argument("--sample-interval", type=float, default=0.2, help="RSS sampling period (s)")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR, help="catalog cache")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="JSON and PNG go here")
    parser.add_argument("--name", default="catalog_scan", help="file name of the JSON and PNG (no suffix)")
    parser.add_argument("--child-timeout", type=float, default=600, help="seconds per scan subprocess")
    parser.add_argument("--child", choices=["ray", "pyarrow"], help=argparse.SUPPRESS)
    parser.add_argument("--catalog", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        Path(args.child_out).write_text(json.dumps(run_child(args)))
        return 0

    from engine.catalog.synth import parse_layout

    started = time.perf_counter()
    load_at_start = os.getloadavg()
    layout = parse_layout(args.layout)
    sizes = sorted(set(args.sizes))
    args.work_dir.mkdir(parents=True, exist_ok=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    print(f"catalog_scan: sizes {sizes}, layout {args.layout!r} (N={layout.size}), seed {args.seed}")

    catalogs, rows = [], []
    for n in sizes:
        path, build = build_catalog(args.work_dir, n, args.layout, args.seed, args.num_tasks)
        how = "cached" if build["cached"] else f"built in {build['build_s']:.1f} s"
        print(f"  catalog n={n:,}: {how}")
        print(f"  n={n:,}: pyarrow scan ...", flush=True)
        pa_res = spawn_child("pyarrow", path, args)
        print(f"  n={n:,}: ray scan ...", flush=True)
        ray_res = spawn_child("ray", path, args)
        if abs(pa_res["checksum"] - ray_res["checksum"]) > 1e-6 * max(1.0, abs(pa_res["checksum"])):
            raise RuntimeError(
                f"n={n}: ray and pyarrow sums differ: {ray_res['checksum']} vs {pa_res['checksum']}"
            )
        catalogs.append({"n": n, "path": str(path), **build, "pyarrow": pa_res, "ray": ray_res})
        rows.append(summarise(n, pa_res, ray_res))
        if not build["cached"]:  # synthesis (random factors, canonical gauge) + shard and manifest writes
            rows[-1]["build_mb_per_s"] = ray_res["bytes"] / MB / build["build_s"]

    memory = {}
    if len(rows) > 1:
        small, large = rows[0], rows[-1]
        for key in (
            "ray_driver_peak_rss_mib",
            "ray_driver_peak_private_mib",
            "ray_worker_peak_rss_mib",
            "pyarrow_peak_rss_mib",
        ):
            memory[key.removesuffix("_mib").removeprefix("ray_")] = large[key] / small[key]
    goals = {
        "ratio_ray_over_pyarrow_min": 0.5,
        "ratio_met_smallest": rows[0]["ratio_ray_over_pyarrow"] >= 0.5,
        "peak_rss_growth_max": 1.1,
        "driver_rss_flat": not memory or memory["driver_peak_rss"] <= 1.1,
        "worker_rss_flat": not memory or memory["worker_peak_rss"] <= 1.1,
    }
    result = {
        "benchmark": "catalog_scan",
        "config": {
            "sizes": sizes,
            "layout": args.layout,
            "layout_id": layout.layout_id,
            "N": layout.size,
            "num_modules": layout.num_modules,
            "seed": args.seed,
            "num_tasks": args.num_tasks,
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "warmup_runs": 1,
            "statistic": "median",
            "sample_interval_s": args.sample_interval,
            "mb": "10^6 bytes of float32 weights (rows * N * 4)",
            "mib": "2^20 bytes",
        },
        "environment": dict(environment(), loadavg_at_start=load_at_start, loadavg_at_end=os.getloadavg()),
        "summary": rows,
        "peak_rss_ratio_largest_over_smallest": memory,
        "goals": goals,
        "catalogs": catalogs,
        "total_s": time.perf_counter() - started,
    }
    json_path = args.out_dir / f"{args.name}.json"
    png_path = args.out_dir / f"{args.name}.png"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    env = result["environment"]
    plot(
        rows,
        png_path,
        f"catalog_scan: layout {args.layout} (N={layout.size} float32), batch {args.batch_size}; "
        f"{env['cpu_count']} CPUs (load avg {load_at_start[0]:.1f} at start), Ray {env['versions']['ray']}, "
        f"pyarrow {env['versions']['pyarrow']}; {result['environment']['timestamp'][:16]}Z",
    )
    print()
    print_table(rows, memory)
    print(f"wrote {json_path} and {png_path} ({result['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
