"""``icmf task ...``: define tasks (model spec, examples, split) in a catalog and list them."""

from __future__ import annotations

import os

from rich.console import Console
from rich.table import Table

from engine._output import console, print_json
from engine.cli._args import add_catalog_arg
from engine.tasks.errors import TaskError


def table_console() -> Console:
    """The console for tables: piped output (logs, files) gets 160 columns, not a squeezed 80."""
    return console if console.is_terminal else Console(soft_wrap=True, width=max(console.width, 160))


def quiet_libraries() -> None:
    """No ``datasets`` progress bars or info logs on the command line."""
    import datasets

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()


def register(commands) -> None:
    parser = commands.add_parser("task", help="define tasks (model, examples, split) in a catalog")
    sub = parser.add_subparsers(dest="task_command", required=True, metavar="ACTION")

    help_add = "add a task: its model spec, examples file, field names and split"
    p = sub.add_parser("add", help=help_add, description=help_add)
    p.add_argument("name", metavar="NAME", help="task name (the task of its catalog adapters)")
    add_catalog_arg(p)
    p.add_argument("--model", required=True, metavar="SPEC", help="model spec, a .json or .yaml file")
    p.add_argument(
        "--examples", required=True, metavar="FILE", help="examples: .jsonl, .csv or .parquet (path or URI)"
    )
    p.add_argument(
        "--format", choices=["json", "csv", "parquet"], help="examples format (default: from the suffix)"
    )
    p.add_argument(
        "--field",
        action="append",
        default=[],
        metavar="ROLE=COLUMN",
        help="read a role (prompt, completion, text, label, input) from another column (repeatable)",
    )
    p.add_argument(
        "--split",
        action="append",
        default=[],
        metavar="KEY=VALUE,...",
        help="split: eval=COUNT|FRACTION, support=K, train=N, seed=S, dedupe=true|false "
        "(default eval=0.2,support=16,seed=0, train = the rest)",
    )
    p.add_argument("--description", default="", help="free text")
    p.add_argument("--overwrite", action="store_true", help="replace an existing task of that name")
    p.add_argument("--no-check", action="store_true", help="do not read the examples now")
    p.set_defaults(func=add)

    help_ls = "list the catalog's tasks"
    p = sub.add_parser("ls", help=help_ls, description=help_ls)
    add_catalog_arg(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=list_tasks)

    help_show = "show one task's definition (JSON)"
    p = sub.add_parser("show", help=help_show, description=help_show)
    p.add_argument("name", metavar="NAME")
    add_catalog_arg(p)
    p.set_defaults(func=show)


def parse_pairs(values: list[str], option: str) -> dict[str, str]:
    """``["a=1,b=2", "c=3"]`` -> ``{"a": "1", "b": "2", "c": "3"}``."""
    pairs = {}
    for item in (part for value in values for part in value.split(",") if part.strip()):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise TaskError(f"{option} {item!r}: expected KEY=VALUE")
        pairs[key.strip()] = value.strip()
    return pairs


def add(args) -> int:
    from engine.catalog import Catalog
    from engine.tasks.examples import load_task_examples
    from engine.tasks.spec import TaskDefinition, load_model_spec, validate_spec
    from engine.tasks.store import save_task, task_names

    quiet_libraries()
    catalog = Catalog(args.catalog)
    examples = args.examples if "://" in args.examples else os.path.abspath(args.examples)
    data = {
        "name": args.name,
        "model": load_model_spec(args.model).model_dump(mode="json", exclude_defaults=True),
        "examples": examples,
        "examples_format": args.format,
        "fields": parse_pairs(args.field, "--field"),
        "split": parse_pairs(args.split, "--split"),
        "description": args.description,
    }
    definition = validate_spec(TaskDefinition, data, "icmf task add")
    if not args.overwrite and definition.name in task_names(catalog):
        raise TaskError(
            f"task {definition.name!r} already exists in {catalog.uri}; pass --overwrite to replace it"
        )
    summary = ""
    if not args.no_check:
        splits = load_task_examples(definition, catalog)
        summary = (
            f": eval {splits.eval.num_rows}, support {splits.support.num_rows}, "
            f"train {splits.train.num_rows} example(s)"
            + (f" ({splits.duplicates} duplicate(s) dropped)" if splits.duplicates else "")
        )
    save_task(catalog, definition, overwrite=args.overwrite)
    console.print(f"added task {definition.name} ({definition.model.kind}) to {catalog.uri}{summary}")
    return 0


def _model_summary(definition) -> str:
    model = definition.model
    if model.kind == "custom":
        return model.factory
    return model.path or f"config:{model.config.get('model_type')}"


def list_tasks(args) -> int:
    from engine.catalog import Catalog
    from engine.tasks.store import list_tasks as stored_tasks

    catalog = Catalog(args.catalog)
    definitions = stored_tasks(catalog)
    if args.json:
        print_json([d.model_dump(mode="json") for d in definitions])
        return 0
    adapters = catalog.tasks()
    table = Table(title=f"{args.catalog}: {len(definitions)} task(s)")
    for column in ("name", "kind", "model", "examples", "fields", "split", "adapters"):
        table.add_column(column, overflow="fold")
    for d in definitions:
        split = d.split
        table.add_row(
            d.name,
            d.model.kind,
            _model_summary(d),
            d.examples,
            ", ".join(f"{role}={col}" for role, col in d.columns.items()),
            f"eval={split.eval} support={split.support} train={'rest' if split.train is None else split.train} seed={split.seed}",
            str(adapters.get(d.name, 0)),
        )
    table_console().print(table)
    return 0


def show(args) -> int:
    from engine.tasks.store import load_task

    print_json(load_task(args.catalog, args.name).model_dump(mode="json"))
    return 0
