"""Scale benchmark: ingest, stream and meta-train on 1,000 vs 10,000 synthetic adapters.

For each catalog size (default 1,000 and 10,000 adapters of the ``small`` layout, N = 16,384 float32
per adapter, 8 long-tailed tasks) this script

1. **ingests** the catalog (``engine.catalog.synth.synthesize``: validation-free synthetic records
   through the catalog's own shard writer and manifest commit) into a fresh directory and times it,
2. **streams** it in a fresh subprocess on an embedded local Ray: one statistics pass
   (``Catalog.compute_stats``) and one full ``iter_batches`` scan, timed, peak RSS sampled,
3. **meta-trains** a small F-VAE for ``--steps`` episodes per worker with 1 and with 2 Ray Train
   workers (``engine.meta.train.train_fvae``, data-free proxy fusion loss), each run in a fresh
   subprocess, and records episodes/s (median of the report windows after the first, as printed
   by the rank-0 worker) and the peak RSS of the driver, of the Ray Train workers and of the other
   Ray workers (Ray Data).

Every Ray process runs with Ray Data's object-store budget bounded
(``DataContext.execution_options.resource_limits.object_store_memory``, ``--object-store-mib``);
``--unbounded-check`` adds one 10k run without the bound to show what it changes.

RSS is sampled every ``--sample-interval`` s in a background thread of the subprocess (driver =
that process; workers = ``ray::*`` processes under its raylet). ``private`` = RSS minus resident
shared pages (object-store pages a process touched count as shared); ``shmem`` = resident shared
memory (``RssShmem``: Ray's object store lives in /dev/shm), the part that is object-store pages.
Training runs use the default ``train.data_split`` (disjoint shares); ``--split-check`` adds one
run at the largest size with every worker streaming the whole catalog (``full``), for comparison.

Results: ``<out-dir>/scale.json`` and ``<out-dir>/scale.png``. Run (about 10 minutes on 2 cores):
``.venv/bin/python -m benchmarks.scale``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
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

from benchmarks._common import RESULTS, environment, write_json
from benchmarks.catalog_scan import _ray_workers, maxrss_bytes

MIB = 2**20
WORK_DIR = RESULTS / "tmp"
# The rank-0 worker prints one line per report window (engine/meta/train.py).
WINDOW_LINE = re.compile(r"\[icmf train\] step (\d+)/\d+ .* ([\d.]+) episodes/s")


# ------------------------------------------------------------------------------------------ memory
def shmem_bytes(pid: int) -> int:
    """Resident shared memory of a process (``RssShmem``: object-store pages it has touched)."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("RssShmem:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Sampler:
    """Peak RSS (and private RSS) of this process, of Ray Train workers and of other Ray workers."""

    def __init__(self, interval: float):
        import psutil

        self.me = psutil.Process()
        self.interval = interval
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _keep(self, key: str, value: int) -> None:
        self.peak[key] = max(self.peak.get(key, 0), value)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        import psutil

        info = self.me.memory_info()
        self._keep("driver_rss", info.rss)
        self._keep("driver_private", info.rss - info.shared)
        self._keep("driver_shmem", shmem_bytes(self.me.pid))
        sums = {"train": 0, "other": 0}
        for proc in _ray_workers(self.me):
            try:
                info, title = proc.memory_info(), proc.cmdline()[0]
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, IndexError):
                continue
            kind = "train" if "TrainWorker" in title else "other"
            self._keep(f"{kind}_worker_rss", info.rss)
            self._keep(f"{kind}_worker_private", info.rss - info.shared)
            self._keep(f"{kind}_worker_shmem", shmem_bytes(proc.pid))
            sums[kind] += info.rss
        for kind, total in sums.items():
            self._keep(f"{kind}_workers_rss_sum", total)

    def mib(self) -> dict[str, float]:
        return {f"{k}_mib": round(v / MIB, 1) for k, v in sorted(self.peak.items())}


# ------------------------------------------------------------------------------------------ children
def _start_ray(object_store_mib: int, eager_free: bool = False, store_size_mib: int = 0) -> None:
    import ray.data

    from engine._ray import ensure_ray

    ensure_ray(object_store_bytes=store_size_mib * MIB or None)
    # Free each block from the object store as soon as the iterator has handed it out.
    ray.data.DataContext.get_current().eager_free = eager_free
    if object_store_mib:
        options = ray.data.DataContext.get_current().execution_options
        options.resource_limits = options.resource_limits.copy(object_store_memory=object_store_mib * MIB)


def child_stream(args: argparse.Namespace) -> dict[str, Any]:
    from engine.catalog import Catalog

    catalog = Catalog(args.catalog)
    _start_ray(args.object_store_mib, args.eager_free, args.store_size_mib)
    result: dict[str, Any] = {"loadavg_before": os.getloadavg()}
    with Sampler(args.sample_interval) as sampler:
        t0 = time.perf_counter()
        catalog.compute_stats()
        result["stats_s"] = time.perf_counter() - t0
        t0, rows = time.perf_counter(), 0
        for batch in catalog.dataset().iter_batches(batch_size=256, batch_format="numpy"):
            rows += len(batch["weights"])
        result["stream_s"] = time.perf_counter() - t0
    result.update(rows=rows, peak=sampler.mib(), driver_maxrss_mib=maxrss_bytes() / MIB)
    result["loadavg_after"] = os.getloadavg()
    return result


def train_config(args: argparse.Namespace, out: str) -> dict[str, Any]:
    return {
        "catalog": args.catalog,
        "out": out,
        "fvae": {"arch": "conv", "latent_dim": 64, "depth": 8, "channels": 8, "max_channels": 32},
        "task_vectors": {"dim": 32},
        "train": {
            "steps": args.steps,
            "checkpoint_every": args.steps,
            "report_every": args.report_every,
            "workers": args.workers,
            "max_tasks": 4,
            "fusion_loss": "proxy",
            "data_split": args.data_split,
        },
    }


def child_train(args: argparse.Namespace) -> dict[str, Any]:
    from engine.fvae.artifact import FVAEArtifact
    from engine.meta.config import load_config
    from engine.meta.train import train_fvae

    _start_ray(args.object_store_mib, args.eager_free, args.store_size_mib)
    result: dict[str, Any] = {"loadavg_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="scale-train-") as out, Sampler(args.sample_interval) as sampler:
        t0 = time.perf_counter()
        train_fvae(load_config(train_config(args, out)))
        result["train_wall_s"] = time.perf_counter() - t0
        result.update(FVAEArtifact.load(out).meta.model_dump(mode="json", include={"data_split"}))
    result.update(peak=sampler.mib(), driver_maxrss_mib=maxrss_bytes() / MIB)
    result["loadavg_after"] = os.getloadavg()
    return result


def spawn(kind: str, catalog: Path, args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """Run one child in a fresh interpreter; returns its JSON result plus its stdout."""
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "benchmarks.scale", "--child", kind, "--catalog", str(catalog)]
        cmd += ["--child-out", str(out), "--steps", str(args.steps), "--report-every", str(args.report_every)]
        cmd += ["--sample-interval", str(args.sample_interval)]
        cmd += ["--object-store-mib", str(extra.get("object_store_mib", args.object_store_mib))]
        cmd += ["--workers", str(extra.get("workers", 1))] + (["--eager-free"] if args.eager_free else [])
        cmd += [
            "--data-split",
            extra.get("data_split", "disjoint"),
            "--store-size-mib",
            str(args.store_size_mib),
        ]
        repo = Path(__file__).resolve().parent.parent
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout, cwd=repo)
        if proc.returncode != 0 or not out.exists():
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise RuntimeError(f"{kind} child on {catalog} failed (exit status {proc.returncode})")
        result = json.loads(out.read_text())
        result["stdout"] = proc.stdout + proc.stderr
        return result


def episodes_per_s(output: str) -> dict[str, Any]:
    """Median episodes/s over the report windows after the first (start-up and warm-up)."""
    # Ray may echo a worker's line more than once (stdout and stderr of the driver): one per step.
    windows = sorted({int(step): float(rate) for step, rate in WINDOW_LINE.findall(output)}.items())
    rates = [rate for _, rate in windows[1:]] or [rate for _, rate in windows]
    if not rates:
        raise RuntimeError("no '[icmf train] ... episodes/s' lines in the training output")
    return {"episodes_per_s": statistics.median(rates), "windows": windows}


# ------------------------------------------------------------------------------------------ parent
def ingest(work_dir: Path, n: int, layout_spec: str, tasks: int) -> tuple[Path, float]:
    """A fresh catalog of ``n`` synthetic adapters; returns its path and the ingest time."""
    import torch

    from engine.catalog import Catalog
    from engine.catalog.synth import parse_layout, synthesize

    path = work_dir / f"scale-n{n}"
    shutil.rmtree(path, ignore_errors=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny per-module SVDs: extra threads only spin (see catalog_scan)
    t0 = time.perf_counter()
    try:
        synthesize(Catalog(path), n, parse_layout(layout_spec), num_tasks=tasks, seed=0)
    finally:
        torch.set_num_threads(threads)
    return path, time.perf_counter() - t0


def run_size(n: int, args: argparse.Namespace) -> dict[str, Any]:
    path, ingest_s = ingest(args.work_dir, n, args.layout, args.tasks)
    print(f"  n={n:,}: ingested in {ingest_s:.1f} s; streaming ...", flush=True)
    stream = spawn("stream", path, args)
    stream.pop("stdout")
    row: dict[str, Any] = {"n": n, "ingest_s": ingest_s, "stream": stream, "train": {}}
    for workers in args.workers_list:
        print(f"  n={n:,}: training {args.steps} steps on {workers} worker(s) ...", flush=True)
        run = spawn("train", path, args, workers=workers)
        run.update(episodes_per_s(run.pop("stdout")))
        row["train"][str(workers)] = run
    if args.unbounded_check and n == max(args.sizes):
        print(f"  n={n:,}: training without the object-store bound ...", flush=True)
        run = spawn("train", path, args, workers=max(args.workers_list), object_store_mib=0)
        run.update(episodes_per_s(run.pop("stdout")))
        row["train_unbounded"] = run
    if args.split_check and n == max(args.sizes):
        print(f"  n={n:,}: training with every worker streaming the whole catalog ...", flush=True)
        run = spawn("train", path, args, workers=max(args.workers_list), data_split="full")
        run.update(episodes_per_s(run.pop("stdout")))
        row["train_full_split"] = run
    if not args.keep_catalogs:
        shutil.rmtree(path, ignore_errors=True)
    return row


PEAKS = {  # table column -> (phase, peak key)
    "stream_driver_rss_mib": ("stream", "driver_rss_mib"),
    "stream_driver_private_mib": ("stream", "driver_private_mib"),
    "stream_driver_shmem_mib": ("stream", "driver_shmem_mib"),
    "stream_worker_rss_mib": ("stream", "other_worker_rss_mib"),
    "stream_worker_private_mib": ("stream", "other_worker_private_mib"),
    "stream_worker_shmem_mib": ("stream", "other_worker_shmem_mib"),
    "train_driver_rss_mib": ("train", "driver_rss_mib"),
    "train_driver_private_mib": ("train", "driver_private_mib"),
    "train_worker_rss_mib": ("train", "train_worker_rss_mib"),
    "train_worker_private_mib": ("train", "train_worker_private_mib"),
    "train_worker_shmem_mib": ("train", "train_worker_shmem_mib"),
    "train_data_worker_rss_mib": ("train", "other_worker_rss_mib"),
    "train_data_worker_private_mib": ("train", "other_worker_private_mib"),
    "train_data_worker_shmem_mib": ("train", "other_worker_shmem_mib"),
}


def summarise(rows: list[dict[str, Any]], workers: list[int]) -> dict[str, Any]:
    """The headline figures: memory at each size (training: the most workers), its ratio to the
    smallest size, episodes/s per worker count, and what one training worker streamed."""
    table = []
    for row in rows:
        most = row["train"][str(max(workers))]
        phases = {"stream": row["stream"]["peak"], "train": most["peak"]}
        entry = {
            "n": row["n"],
            "ingest_s": round(row["ingest_s"], 1),
            "stats_s": round(row["stream"]["stats_s"], 1),
            "stream_s": round(row["stream"]["stream_s"], 1),
            **{column: phases[phase].get(key) for column, (phase, key) in PEAKS.items()},
            **{f"episodes_per_s_{w}w": round(row["train"][str(w)]["episodes_per_s"], 2) for w in workers},
        }
        split = most.get("data_split") or {}
        entry["rank0_streamed_adapters"] = sum((split.get("rank0_streamed") or {}).values()) or None
        entry["rank0_pool_fill_s"] = round(split["rank0_fill_s"], 2) if "rank0_fill_s" in split else None
        table.append(entry)
    small = table[0]

    def ratios(row: dict[str, Any]) -> dict[str, float]:
        return {
            key.removesuffix("_mib"): round(row[key] / small[key], 3)
            for key in small
            if key.endswith("_mib") and small[key] and row[key]
        }

    return {
        "table": table,
        "rss_ratio_largest_over_smallest": ratios(table[-1]),
        "ratio_over_smallest": {str(row["n"]): ratios(row) for row in table[1:]},
    }


def plot(summary: dict[str, Any], workers: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    table = summary["table"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    keys = [
        ("stream: driver", "stream_driver_rss_mib"),
        ("stream: largest\nRay Data worker", "stream_worker_rss_mib"),
        ("train: driver", "train_driver_rss_mib"),
        ("train: largest\nTrain worker", "train_worker_rss_mib"),
        ("train: largest\nRay Data worker", "train_data_worker_rss_mib"),
    ]
    x, width = np.arange(len(keys)), 0.8 / len(table)
    for i, row in enumerate(table):
        values = [row[k] or 0 for _, k in keys]
        offset = x + (i - (len(table) - 1) / 2) * width
        bars = left.bar(offset, values, width, color=f"C{i}", label=f"{row['n']:,} adapters")
        left.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=8, padding=2)
        # The private part (RSS minus shared pages): what does not come from the object store.
        private = [row.get(k.replace("_rss_", "_private_")) or 0 for _, k in keys]
        left.bar(offset, private, width, fill=False, hatch="//", edgecolor="black", linewidth=0)
    left.set_xticks(x, [name.replace(": ", ":\n") for name, _ in keys], fontsize=8)
    left.set_ylabel("peak RSS (MiB); hatched: private part")
    left.set_ylim(0, 1.3 * max(row[k] or 0 for row in table for _, k in keys))
    left.set_title("Peak RSS by catalog size (flat = bounded)")
    left.legend(fontsize=8, loc="upper left")
    x, width = np.arange(len(workers)), 0.8 / len(table)
    for i, row in enumerate(table):
        values = [row[f"episodes_per_s_{w}w"] for w in workers]
        bars = right.bar(
            x + (i - (len(table) - 1) / 2) * width,
            values,
            width,
            color=f"C{i}",
            label=f"{row['n']:,} adapters",
        )
        right.bar_label(bars, labels=[f"{v:.1f}" for v in values], fontsize=9, padding=2)
    right.set_xticks(x, [f"{w} Ray Train worker(s)" for w in workers])
    right.set_ylabel("episodes/s (median window)")
    right.set_title("Meta-training throughput on this machine")
    right.set_ylim(0, 1.25 * max(row[f"episodes_per_s_{w}w"] for row in table for w in workers))
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--layout", default="small")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--steps", type=int, default=60, help="episodes per worker per training run")
    parser.add_argument("--report-every", type=int, default=10)
    parser.add_argument("--workers-list", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--object-store-mib", type=int, default=256, help="Ray Data budget; 0 = Ray's default"
    )
    parser.add_argument("--eager-free", action="store_true", help="DataContext.eager_free in every run")
    parser.add_argument("--unbounded-check", action="store_true", help="one more 10k run without the bound")
    parser.add_argument(
        "--split-check", action="store_true", help="one more run at the largest size with data_split: full"
    )
    parser.add_argument(
        "--store-size-mib",
        type=int,
        default=0,
        help="Ray's object store size (0: Ray's default, 30%% of RAM)",
    )
    parser.add_argument("--sample-interval", type=float, default=0.2)
    parser.add_argument("--work-dir", type=Path, default=WORK_DIR)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--keep-catalogs", action="store_true")
    parser.add_argument("--child-timeout", type=float, default=900)
    parser.add_argument("--replot", action="store_true", help="redraw scale.png from scale.json")
    parser.add_argument("--child", choices=["stream", "train"], help=argparse.SUPPRESS)
    parser.add_argument("--catalog", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--data-split", default="disjoint", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run = child_stream if args.child == "stream" else child_train
        Path(args.child_out).write_text(json.dumps(run(args)))
        return 0

    if args.replot:
        saved = json.loads((args.out_dir / "scale.json").read_text())
        plot(saved["summary"], saved["config"]["workers_list"], args.out_dir / "scale.png")
        return 0
    args.work_dir.mkdir(parents=True, exist_ok=True)
    load_at_start, started = os.getloadavg(), time.perf_counter()
    print(f"scale: sizes {args.sizes}, layout {args.layout}, workers {args.workers_list}", flush=True)
    rows = [run_size(n, args) for n in sorted(args.sizes)]
    summary = summarise(rows, args.workers_list)
    result = {
        "benchmark": "scale",
        "config": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if "child" not in k
        },
        "environment": dict(environment(), loadavg_at_start=load_at_start, loadavg_at_end=os.getloadavg()),
        "summary": summary,
        "runs": rows,
        "wall_s": time.perf_counter() - started,
    }
    path = write_json("scale", result, args.out_dir)
    plot(summary, args.workers_list, args.out_dir / "scale.png")
    print(json.dumps(summary, indent=2))
    print(f"wrote {path} and scale.png in {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
