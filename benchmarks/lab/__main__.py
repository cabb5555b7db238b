"""``python -m benchmarks.lab build|report``: a thin CLI over :func:`benchmarks.lab.build.build_lab`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build (or finish) a lab; finished work is skipped")
    build.add_argument("--suite", choices=["encoder", "generative", "all"], default="all")
    build.add_argument("--size", choices=["tiny", "standard"], default="standard")
    build.add_argument(
        "--out", type=Path, help="lab directory (default benchmarks/results/lab/<size>-seed<seed>)"
    )
    build.add_argument("--seed", type=int, default=0)
    build.add_argument(
        "--workers", type=int, help="worker processes (default 2 for standard; 0 = in process)"
    )
    build.add_argument("--quiet", action="store_true", help="no progress bars")
    report = sub.add_parser("report", help="print the kept/rejected task table of a built lab")
    report.add_argument("lab", type=Path, nargs="?", help="lab directory or lab.json")
    report.add_argument("--size", choices=["tiny", "standard"], default="standard")
    report.add_argument("--seed", type=int, default=0)
    return parser


_SHORT = {
    "base_head_accuracy": "base+head",
    "mean_pool_probe_accuracy": "mean-pool probe",
    "lora_accuracy": "LoRA (mean)",
    "lora_min_accuracy": "LoRA min",
    "lora_max_accuracy": "LoRA max",
    "chance_accuracy": "chance",
    "base_loss": "base loss",
    "base_exact_match": "base EM",
    "lora_loss": "LoRA loss (mean)",
    "lora_exact_match": "LoRA EM (mean)",
    "loss_drop": "loss drop",
}


def print_report(manifest: dict) -> None:
    """The kept/rejected table of every suite (accuracies / losses on the eval split)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for suite, data in manifest["suites"].items():
        rows = data["report"]
        table = Table(title=f"{suite} suite: kept and rejected tasks (eval split)")
        columns = [k for k in rows[0] if k != "task"] if rows else []
        table.add_column("task", no_wrap=True)
        for c in columns:
            table.add_column(_SHORT.get(c, c), justify="right")
        for row in rows:
            cells = [f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in columns]
            table.add_row(row["task"], *cells)
        console.print(table)
        catalogs = ", ".join(
            f"{v}: {sum(map(len, c['adapters'].values()))}" for v, c in data["catalogs"].items()
        )
        console.print(f"{suite} catalogs (adapters): {catalogs}")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = _parser().parse_args(argv)
    from benchmarks.lab.build import build_lab, default_out
    from benchmarks.lab.manifest import load_lab

    try:
        if args.command == "build":
            suites = ("encoder", "generative") if args.suite == "all" else (args.suite,)
            manifest = build_lab(args.out, suites, args.size, args.seed, args.workers, args.quiet)
            seconds = manifest["build"]["seconds"]["total"]
            out = args.out or default_out(args.size, args.seed)
            print_report(manifest)
            print(f"lab built in {seconds:.1f}s: {out / 'lab.json'}")
        else:
            print_report(load_lab(args.lab or default_out(args.size, args.seed)))
    except (ValueError, FileNotFoundError) as exc:
        print(f"lab: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
