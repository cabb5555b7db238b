"""``icmf eval``: evaluate a fused adapter on its tasks (losses, accuracy / exact match, gap closure)."""

from __future__ import annotations

from rich.table import Table

from engine._output import err_console, print_json, progress_bar
from engine.cli._args import add_catalog_arg
from engine.cli.task import quiet_libraries, table_console


def register(commands) -> None:
    description = (
        "evaluate a fused adapter on its tasks' held-out examples: loss of the base, of each task's "
        "own adapter and of the fused adapter, accuracy / exact match, perplexity, and gap closure "
        "G = (L_base - L_fused) / (L_base - L_own)"
    )
    p = commands.add_parser(
        "eval", help="evaluate a fused adapter: losses and gap closure", description=description
    )
    add_catalog_arg(p)
    p.add_argument(
        "--tasks", required=True, metavar="A,B,...", help="tasks to evaluate (defined with `icmf task add`)"
    )
    p.add_argument("--adapter", required=True, metavar="DIR", help="the fused PEFT adapter directory")
    p.add_argument(
        "--own",
        action="append",
        default=[],
        metavar="ID,...",
        help="own adapters (catalog ids, or TASK=ID); default: the fused adapter's provenance "
        "(icmf_provenance.json), else each task's first catalog adapter",
    )
    p.add_argument("--batch-size", type=int, default=32, help="examples per forward pass (default 32)")
    p.add_argument("--max-eval", type=int, help="at most this many held-out examples per task")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run_eval)


def _split_list(values: list[str]) -> list[str]:
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def run_eval(args) -> int:
    import warnings

    from engine.tasks.evaluate import evaluate_fusion

    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    quiet_libraries()
    tasks = _split_list([args.tasks])
    with progress_bar("evaluate", total=3 * len(tasks)) as advance:
        result = evaluate_fusion(
            args.catalog,
            tasks,
            args.adapter,
            own=_split_list(args.own) or None,
            batch_size=args.batch_size,
            max_eval=args.max_eval,
            progress=advance,
        )
    if args.json:
        print_json(result.to_dict())
        return 0
    table_console().print(result_table(result))
    for r in result.tasks:
        if r.note:
            err_console.print(f"{r.task}: {r.note}")
    return 0


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def result_table(result) -> Table:
    """A rich table of a :class:`~engine.tasks.evaluate.FusionEval`."""
    title = f"{result.adapter}" + (f" ({result.method})" if result.method else "")
    caption = f"mean G {_num(result.mean_gap)}   worst G {_num(result.worst_gap)}" + (
        f" ({result.worst_task})" if result.worst_task else ""
    )
    table = Table(title=title, caption=caption, caption_justify="left")
    for column in ("task", "n", "L_base", "L_own", "L_fused", "G", "acc/EM base→own→fused", "PPL fused"):
        table.add_column(column, justify="left" if column == "task" else "right", no_wrap=column == "task")
    table.add_column("own adapter", no_wrap=True)
    for r in result.tasks:
        key = "accuracy" if "accuracy" in r.fused else "exact_match"
        table.add_row(
            r.task,
            str(r.examples),
            _num(r.base["loss"]),
            _num(r.own_metrics["loss"]),
            _num(r.fused["loss"]),
            _num(r.gap, 3),
            " → ".join(_num(m.get(key), 3) for m in (r.base, r.own_metrics, r.fused)),
            _num(r.fused.get("perplexity")),
            f"{r.own.id} ({r.own.source})",
        )
    return table
