"""``icmf catalog ...``: ingest, list, show, export, statistics and synthetic catalogs."""

from __future__ import annotations

import argparse

from rich.table import Table

from engine._output import console, err_console, print_json, progress_bar
from engine.catalog import Catalog
from engine.cli._args import add_catalog_arg


def register(commands) -> None:
    parser = commands.add_parser("catalog", help="manage an adapter catalog")
    sub = parser.add_subparsers(dest="catalog_command", required=True, metavar="ACTION")

    def add(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        add_catalog_arg(p)
        p.set_defaults(func=func)
        return p

    p = add("ingest", ingest, "validate PEFT LoRA adapter directories and add them to the catalog")
    p.add_argument("paths", nargs="+", metavar="PATH", help="adapter directories")
    p.add_argument("--task", required=True, help="task the adapters solve")
    p.add_argument("--base-model", help="base model id (default: each adapter_config.json's)")
    p.add_argument(
        "--r-max",
        type=int,
        help="rank cap: refuse adapters of a higher rank (default: none; the layout grows to fit)",
    )
    p.add_argument(
        "--base-config",
        help="the base model's config.json (or its directory): check every module and shape against it",
    )
    p.add_argument("--no-gauge", action="store_true", help="new catalog: keep adapters' own bases")
    p.add_argument("--tag", action="append", default=[], help="tag to attach (repeatable)")
    p.add_argument(
        "--skip-invalid",
        action="store_true",
        help="land the valid adapters and report the rest (default: a bad adapter rejects the batch)",
    )

    p = add("ls", list_adapters, "list the catalog's adapters")
    p.add_argument("--task", help="only this task")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = add("show", show, "show one adapter's manifest entry and layout")
    p.add_argument("id", help="adapter id")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = add("export", export, "write a catalog adapter as a stock PEFT adapter directory")
    p.add_argument("id", help="adapter id")
    p.add_argument("out_dir", metavar="OUT_DIR", help="directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")

    p = add("stats", stats, "per-slot statistics (computed by one Ray Data pass when stale)")
    p.add_argument("--layout", help="layout id (default: the catalog's only layout)")
    p.add_argument("--recompute", action="store_true", help="recompute even if current")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = add("synth", synth, "add N synthetic adapters (random low-rank, long-tailed tasks)")
    p.add_argument("--n", type=int, required=True, help="number of adapters")
    p.add_argument(
        "--layout",
        default="small",
        help="preset (tiny, small, base; real models: llama3-8b-qv-r16, llama3-8b-all-r16, "
        "mistral-7b-all-r16, qwen2.5-0.5b-all-r16), 'layers=4,d=256,r=8', or JSON file",
    )
    p.add_argument("--tasks", type=int, default=8, help="number of tasks (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base-model", default="synthetic/llama")


def ingest(args) -> int:
    catalog = Catalog(args.catalog)
    with progress_bar(f"ingest {args.task}", total=2 * len(args.paths)) as advance:
        report = catalog.ingest(
            args.paths,
            task=args.task,
            base_model=args.base_model,
            r_max=args.r_max,
            gauge=False if args.no_gauge else None,
            tags=args.tag,
            skip_invalid=args.skip_invalid,
            progress=advance,
            base_config=args.base_config,
        )
    for source, existing in report.duplicates:
        err_console.print(f"skipped {source}: already in the catalog as {existing}")
    for failure in report.rejected:
        err_console.print(f"[red]rejected[/red] {failure}")
    console.print(
        f"ingested {len(report.added)} adapter(s) into {catalog.uri} (version {report.version}); "
        f"{len(report.duplicates)} duplicate(s), {len(report.rejected)} rejected"
    )
    return 1 if report.rejected else 0


def _row_for_display(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k != "peft_config"}


def list_adapters(args) -> int:
    entries = Catalog(args.catalog).at().entries(task=args.task)
    if args.json:
        print_json([_row_for_display(e) for e in entries])
        return 0
    table = Table(title=f"{args.catalog}: {len(entries)} adapter(s)")
    table.add_column("id", no_wrap=True)
    for column in ("task", "base model", "rank", "modules", "params", "created"):
        table.add_column(column)
    for e in entries:
        table.add_row(
            e["id"],
            e["task"],
            e["base_model"],
            str(e["rank"]),
            str(len(e["target_modules"])),
            f"{e['num_params']:,}",
            e["created"].strftime("%Y-%m-%d %H:%M:%S"),
        )
    console.print(table)
    return 0


def show(args) -> int:
    catalog = Catalog(args.catalog).at()
    entry = catalog.get(args.id)
    layout = catalog.layout(entry["layout_id"])
    detail = dict(
        _row_for_display(entry),
        layout={
            "id": layout.layout_id,
            "r_max": layout.r_max,
            "size": layout.size,
            "modules": layout.num_modules,
        },
    )
    if args.json:
        print_json(detail)
        return 0
    table = Table(show_header=False, title=args.id)
    for key, value in detail.items():
        table.add_row(key, ", ".join(map(str, value)) if isinstance(value, list) else str(value))
    console.print(table)
    return 0


def export(args) -> int:
    path = Catalog(args.catalog).at().export(args.id, args.out_dir, overwrite=args.overwrite)
    console.print(f"wrote PEFT adapter {args.id} to {path}")
    return 0


def stats(args) -> int:
    from engine._ray import ensure_ray

    catalog = Catalog(args.catalog).at()
    current = catalog.stats(args.layout)
    if args.recompute or current is None or current.manifest_version != catalog.version():
        ensure_ray()
        current = catalog.compute_stats(args.layout)
    summary = dict(
        layout_id=current.layout_id,
        manifest_version=current.manifest_version,
        num_adapters=current.num_adapters,
        tasks=catalog.tasks(),
        **current.summary(),
    )
    if args.json:
        print_json(summary)
        return 0
    table = Table(show_header=False, title=f"{args.catalog}: per-slot statistics")
    for key, value in summary.items():
        table.add_row(key, f"{value:.6g}" if isinstance(value, float) else str(value))
    console.print(table)
    return 0


def synth(args) -> int:
    from engine.catalog.synth import parse_layout, synthesize

    catalog = Catalog(args.catalog)
    layout = parse_layout(args.layout, base_model=args.base_model)
    with progress_bar("synthesise", total=args.n) as advance:
        version, added = synthesize(catalog, args.n, layout, args.tasks, args.seed, progress=advance)
    console.print(
        f"added {added} synthetic adapter(s) of layout {layout.layout_id} (N={layout.size}) "
        f"to {catalog.uri} (version {version})"
    )
    return 0
