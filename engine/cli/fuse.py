"""``icmf fuse``: fuse catalog adapters with any registered method into a PEFT adapter."""

from __future__ import annotations

import argparse

import yaml

from engine._output import console
from engine.cli._args import add_catalog_arg


def _csv(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _floats(value: str) -> list[float]:
    try:
        return [float(v) for v in _csv(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"weights must be numbers separated by commas, got {value!r}"
        ) from None


def _param(value: str) -> tuple[str, object]:
    key, sep, raw = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--param takes key=value, got {value!r}")
    return key, yaml.safe_load(raw)  # 0.5 -> float, null -> None, factors -> str


def _picked(details: dict) -> str:
    """``alpha=0.75, density=0.4`` for the hyperparameters a method picked on support examples."""
    values, source = details.get("hyperparameters") or {}, details.get("source") or {}
    return ", ".join(f"{k}={v:g}" for k, v in values.items() if source.get(k) == "support")


def register(commands) -> None:
    from engine.fusion import list_methods

    methods = list_methods()
    listing = "\n".join(f"  {m.name:<16} {m.summary}" for m in methods)
    p = commands.add_parser(
        "fuse",
        help="fuse catalog adapters into one PEFT adapter",
        description=f"Fuse catalog adapters into one stock PEFT adapter.\n\nmethods:\n{listing}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_catalog_arg(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--tasks", type=_csv, help="tasks a,b,...: each task's first-ingested adapter")
    which.add_argument("--adapters", type=_csv, help="adapter ids id1,id2,...")
    p.add_argument("--method", required=True, help="fusion method (listed above)")
    p.add_argument("--weights", type=_floats, help="one weight per adapter (default uniform 1/K)")
    p.add_argument(
        "--param", type=_param, action="append", default=[], metavar="KEY=VALUE", help="method parameter"
    )
    p.add_argument(
        "--model", metavar="FVAE_DIR", help="trained F-VAE (output of `icmf train`), for --method icm"
    )
    p.add_argument(
        "--shots",
        type=int,
        metavar="K",
        help="few-shot examples per task for the support loss (lorahub, icm refinement, hyperparameter "
        "selection; default: the task's support split)",
    )
    p.add_argument(
        "--no-support-selection",
        dest="support_selection",
        action="store_false",
        help="hyperparameters not given with --param take the method's defaults instead of being "
        "picked on the tasks' support examples",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", required=True, help="output adapter directory: a local path or s3://, gs://, ... URI"
    )
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=fuse)


def fuse(args) -> int:
    from engine.catalog import Catalog
    from engine.fusion import fuse_from_catalog, fusion_context

    catalog = Catalog(args.catalog).at()  # one manifest version (one listing) per command
    params = dict(args.param)
    context = fusion_context(
        args.method,
        params,
        catalog=catalog,
        adapter_ids=args.adapters,
        tasks=args.tasks,
        fvae=args.model,
        shots=args.shots,
        support_selection=args.support_selection,
    )
    result = fuse_from_catalog(
        catalog,
        args.method,
        adapter_ids=args.adapters,
        tasks=args.tasks,
        weights=args.weights,
        params=params,
        seed=args.seed,
        context=context,
    )
    path = result.save(args.out, overwrite=args.overwrite)
    inputs = ", ".join(f"{i['id']}×{i['weight']:.3g}" for i in result.provenance["inputs"])
    ranks = sorted({m.rank for m in result.adapter.modules.values()})
    console.print(
        f"fused [{inputs}] with {args.method} -> {path} (rank {'/'.join(map(str, ranks))})", markup=False
    )
    picked = _picked(result.provenance.get("details") or {})
    if picked:
        console.print(f"picked on the support examples: {picked}", markup=False)
    return 0
