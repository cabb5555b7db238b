"""F-VAE size at real adapter layouts: parameters, peak RSS and seconds per K = 4 training step.

For each layout preset (``--layouts``, default the Llama-3-8B ``q,v`` and all-linear rank-16
presets of :mod:`engine.adapters.presets`) and each architecture (``--archs``, default the
module-token F-VAE against the ``chunked`` baseline, side by side; ``tokens/delta`` is the
module-token F-VAE with ``recon_space: delta``), a fresh subprocess

1. builds K (``--k``, 4) synthetic adapters of the layout in the catalog's canonical gauge
   (:func:`engine.catalog.synth.synthetic_records`, one task each; ranks 8-16, some modules
   absent), and the normaliser the arch reads (``SlotNormalizer.for_config``, from these K);
2. builds the F-VAE with ``FVAEConfig`` defaults (``hidden`` 256, ``latent_dim`` 256) and counts
   its parameters;
3. runs ``--steps`` (3) meta-training steps exactly as a Ray Train worker does
   (``engine.meta.step.episode_loss`` with the default settings: reconstruction + KL + the
   anchored, data-free proxy fusion loss; backward; AdamW), the first as warm-up; the figure is
   the median of the others, in wall-clock seconds and in CPU seconds of the process
   (``cpu_s_per_step``: on a shared, loaded machine the wall clock measures the other load; with
   the default one torch thread, CPU seconds are the time on one idle core);
4. counts the floating-point operations of one step (``torch.utils.flop_counter``) for a GPU
   projection: ``flops / (--gpu-tflops x 1e12)`` (default 50: an assumed sustained fp32/TF32
   rate of one H100/H200-class GPU; a projection, not a measurement).

``peak_rss_mib`` is the subprocess's peak RSS during the training steps (sampled every 20 ms;
it includes the K adapters, K x N x 4 bytes, and Python/torch); ``rss_data_mib`` the RSS before
the model exists; ``process_maxrss_mib`` the process's ``ru_maxrss`` (data generation included).

Results: ``benchmarks/results/fvae_scale.json`` and ``.png``. Run:
``.venv/bin/python -m benchmarks.fvae_scale`` (about 10 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import RESULTS, environment, write_json

MIB = 2**20


class _PeakSampler:
    """Samples this process's RSS every 20 ms in a thread: the peak of the training steps alone
    (``ru_maxrss`` also holds the synthetic data's generation)."""

    def __init__(self):
        import psutil

        self.process, self.peak, self.done = psutil.Process(), 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.02)

    def stop(self) -> int:
        self.done.set()
        self.thread.join()
        return max(self.peak, self.process.memory_info().rss)


def _release_freed_memory() -> None:
    """Hand the synthetic data generation's freed heap back to the OS (glibc keeps it otherwise,
    and it would count as the training step's RSS)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def child(
    layout_name: str, arch: str, k: int, steps: int, threads: int, flops: bool = True
) -> dict[str, Any]:
    """One (layout, arch) measurement in this (fresh) process; ``arch`` may name a
    ``recon_space`` after a slash (``tokens/delta``)."""
    import numpy as np
    import psutil
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.catalog_scan import maxrss_bytes
    from engine.catalog.synth import parse_layout, synthetic_records
    from engine.fvae import FVAE, FVAEConfig, SlotNormalizer
    from engine.meta.step import EpisodeBatch, EpisodeSettings, episode_loss

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    layout = parse_layout(layout_name)
    start = time.perf_counter()
    records = [r for _, r in synthetic_records(layout, k, num_tasks=k, seed=0)]
    x = torch.from_numpy(np.stack([r.weights for r in records]))
    mask = torch.from_numpy(np.stack([r.mask for r in records]))
    del records
    slot = torch.from_numpy(layout.slot_mask(mask.numpy()))
    count = slot.sum(0).numpy()
    mean = ((x * slot).sum(0) / slot.sum(0).clamp_min(1)).numpy()
    std = (((x - torch.from_numpy(mean)) ** 2 * slot).sum(0) / slot.sum(0).clamp_min(1)).sqrt().numpy()
    arch, _, space = arch.partition("/")
    structure = {"layout": layout.to_dict()} if arch == "tokens" else {}
    if space:
        structure["recon_space"] = space
    config = FVAEConfig(input_dim=layout.size, cond_dim=64, arch=arch, **structure)
    normalizer = SlotNormalizer.for_config(config, layout, mean, std, count)
    del slot
    data_s = time.perf_counter() - start
    _release_freed_memory()
    rss_data = psutil.Process().memory_info().rss
    sampler = _PeakSampler()
    model = FVAE(config)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4)
    batch = EpisodeBatch(x=x, mask=mask, cond=torch.randn(k, 64), tasks=tuple(f"t{i}" for i in range(k)))
    times, cpu_times, losses = [], [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        optimizer.zero_grad()
        out = episode_loss(model, normalizer, batch, layout, EpisodeSettings())
        out["loss"].backward()
        optimizer.step()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        losses.append(float(out["loss"].detach()))
    step_peak = sampler.stop()
    peak = maxrss_bytes()
    counter = FlopCounterMode(display=False)
    if flops:
        with counter:
            episode_loss(model, normalizer, batch, layout, EpisodeSettings())["loss"].backward()
    return {
        "layout": layout_name,
        "arch": config.arch if not space else f"{config.arch}/{space}",
        "N": layout.size,
        "modules": layout.num_modules,
        "k": k,
        "threads": threads,
        "parameters": params,
        "data_s": round(data_s, 2),
        "rss_data_mib": round(rss_data / MIB),
        "peak_rss_mib": round(step_peak / MIB),
        "process_maxrss_mib": round(peak / MIB),
        "step_s": [round(t, 2) for t in times],
        "s_per_step": round(statistics.median(times[1:] or times), 2),
        "cpu_s_per_step": round(statistics.median(cpu_times[1:] or cpu_times), 2),
        "losses": losses,
        "gflop_per_step": round(counter.get_total_flops() / 1e9, 1) if flops else None,
    }


def run(args) -> dict[str, Any]:
    rows = []
    for layout_name in args.layouts:
        for arch in args.archs:
            command = [
                sys.executable,
                "-m",
                "benchmarks.fvae_scale",
                "--child",
                f"{layout_name}:{arch}",
                "--k",
                str(args.k),
                "--steps",
                str(args.steps),
                "--threads",
                str(args.threads),
                *(["--no-flops"] if args.no_flops else []),
            ]
            env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
            done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout)
            if done.returncode != 0:
                row = {"layout": layout_name, "arch": arch, "error": done.stderr.strip().splitlines()[-1:]}
            else:
                row = json.loads(done.stdout.strip().splitlines()[-1])
                if row["gflop_per_step"] is not None:
                    row["gpu_projection_s"] = round(row["gflop_per_step"] / (args.gpu_tflops * 1e3), 3)
            print(json.dumps(row), flush=True)
            rows.append(row)
    return {
        "environment": environment(),
        "settings": {**vars(args), "gpu_projection": f"flops / {args.gpu_tflops} TFLOP/s (assumed)"},
        "rows": rows,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "error" not in r]
    labels = [f"{r['layout']}\n{r['arch']}" for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, key, title in zip(
        axes,
        ("parameters", "peak_rss_mib", "s_per_step"),
        ("F-VAE parameters", "peak RSS, one K=4 step (MiB)", "s / step (CPU)"),
        strict=True,
    ):
        ax.bar(range(len(rows)), [r[key] for r in rows])
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", nargs="+", default=["llama3-8b-qv-r16", "llama3-8b-all-r16"])
    parser.add_argument("--archs", nargs="+", default=["tokens", "chunked"])
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gpu-tflops", type=float, default=50.0)
    parser.add_argument("--no-flops", action="store_true", help="skip the flop count (one step less)")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--name", default="fvae_scale")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        layout_name, arch = args.child.rsplit(":", 1)
        print(json.dumps(child(layout_name, arch, args.k, args.steps, args.threads, not args.no_flops)))
        return 0
    result = run(args)
    path = write_json(args.name, result)
    plot(result, RESULTS / f"{args.name}.png")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
