"""Console output helpers: rich tables and progress bars, JSON for scripts."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(soft_wrap=True)  # never hard-wrap lines that scripts may parse
err_console = Console(stderr=True, soft_wrap=True)


def print_json(data: Any) -> None:
    def default(value: Any) -> Any:
        if isinstance(value, datetime):
            return value.isoformat()
        raise TypeError(f"not JSON serialisable: {type(value).__name__}")

    sys.stdout.write(json.dumps(data, indent=2, default=default) + "\n")


@contextmanager
def progress_bar(description: str, total: int | None):
    """Yield an ``advance(n)`` callable driving a rich progress bar on stderr."""
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
        disable=not err_console.is_terminal,
    )
    with progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)
