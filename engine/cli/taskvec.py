"""``icmf taskvec``: compute in-context task vectors on Ray and store them in the catalog."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from engine._output import err_console, print_json
from engine.cli._args import add_catalog_arg
from engine.cli.task import quiet_libraries, table_console
from engine.tasks.errors import TaskError


def register(commands) -> None:
    description = (
        "compute in-context task vectors: per task, the mean last-layer hidden state of the base "
        "model (with the task's adapter, unless --no-adapter) over k examples (the task's support "
        "split, or --examples FILE), on a Ray Data actor pool; stored as task_vectors/<task>.json "
        "in the catalog"
    )
    p = commands.add_parser(
        "taskvec", help="compute and store in-context task vectors", description=description
    )
    add_catalog_arg(p)
    p.add_argument("--task", action="append", default=[], metavar="NAME", help="a task (repeat or A,B,...)")
    p.add_argument("--all", action="store_true", help="every task with a definition in the catalog")
    p.add_argument(
        "--examples", metavar="FILE", help="examples file of the one --task (JSONL, CSV or Parquet)"
    )
    p.add_argument("--model", metavar="SPEC", help="model spec (YAML/JSON) for a task with no definition")
    p.add_argument("--k", type=int, default=16, help="examples per task (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle picking the examples (default 0)")
    p.add_argument("--no-adapter", action="store_true", help="the base model alone, no adapter applied")
    p.add_argument(
        "--adapter",
        default="first",
        metavar="ID|first|all",
        help="adapter(s) applied: the task's first catalog adapter (default), all of them (mean), "
        "or catalog id(s) ID,... (one task)",
    )
    p.add_argument("--concurrency", type=int, help="actors in the pool (default: as CPUs allow)")
    p.add_argument("--num-cpus", type=float, default=1, help="CPUs per actor (default 1)")
    p.add_argument("--num-gpus", type=float, default=0, help="GPUs per actor (default 0: CPU)")
    p.add_argument("--local", action="store_true", help="compute in this process, without Ray")
    p.add_argument("--no-save", action="store_true", help="print only; do not store in the catalog")
    p.add_argument("--json", action="store_true", help="print JSON (vectors included)")
    p.set_defaults(func=run_taskvec)


def _split_list(values: list[str]) -> list[str]:
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def check_args(args, tasks: list[str]) -> None:
    """Every fault of the arguments at once (ValueError)."""
    faults = []
    if args.all and tasks:
        faults.append("give --task NAME or --all, not both")
    if not args.all and not tasks:
        faults.append("name the tasks: --task NAME (repeatable) or --all")
    if args.examples and len(tasks) != 1:
        faults.append("--examples FILE is for exactly one --task")
    if args.k < 1:
        faults.append(f"--k must be >= 1, got {args.k}")
    if args.no_adapter and args.adapter != "first":
        faults.append("--no-adapter and --adapter contradict each other; drop one")
    if args.adapter not in ("first", "all") and len(tasks) != 1:
        faults.append("--adapter ID is for exactly one --task; use first or all for several")
    if args.concurrency is not None and args.concurrency < 1:
        faults.append(f"--concurrency must be >= 1, got {args.concurrency}")
    if faults:
        raise TaskError("; ".join(faults))


def run_taskvec(args) -> int:
    import time
    import warnings

    from engine.catalog import Catalog
    from engine.task_vectors import compute_task_vectors, save_task_vectors
    from engine.tasks.store import task_names

    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    quiet_libraries()
    tasks = _split_list(args.task)
    check_args(args, tasks)
    catalog = Catalog(args.catalog).at()  # one manifest version (one listing) per command
    if args.all:
        tasks = task_names(catalog)
        if not tasks:
            raise TaskError(f"catalog {catalog.uri} has no task definitions; add them with `icmf task add`")
    adapters = args.adapter if args.adapter in ("first", "all") else _split_list([args.adapter])
    start = time.perf_counter()
    vectors = compute_task_vectors(
        catalog,
        tasks,
        k=args.k,
        with_adapter=not args.no_adapter,
        examples=args.examples,
        seed=args.seed,
        concurrency=args.concurrency,
        adapters=adapters,
        model=args.model,
        use_ray=not args.local,
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
    )
    seconds = time.perf_counter() - start
    paths = [] if args.no_save else save_task_vectors(catalog, vectors)
    if args.json:
        print_json(
            {"vectors": [v.to_record() for v in vectors.values()], "stored": paths, "seconds": seconds}
        )
        return 0
    table_console().print(vectors_table(vectors))
    where = "not stored (--no-save)" if args.no_save else f"stored in {catalog.uri} under task_vectors/"
    err_console.print(
        f"{len(vectors)} task vector(s) in {seconds:.1f}s; {where}", markup=False, highlight=False
    )
    return 0


def vectors_table(vectors) -> Table:
    """A rich table of ``{task: TaskVector}``: dimension, k, adapters, model, norm."""
    table = Table(title="task vectors")
    for column in ("task", "d", "k", "adapters", "model", "norm", "examples"):
        table.add_column(column, justify="right" if column in ("d", "k", "norm") else "left")
    for v in vectors.values():
        adapters = ", ".join(v.adapters) if v.with_adapter else "(base alone)"
        norm = f"{float(v.vector.norm()):.4g}"
        cells = (v.task, str(v.dim), str(v.k), adapters, v.model, norm, v.examples_source)
        table.add_row(*(Text(cell) for cell in cells))  # literal: names and paths are not markup
    return table
