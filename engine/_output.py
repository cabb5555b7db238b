"""Console output helpers: rich tables and progress bars, JSON for scripts."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
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


def _real_stream(stream: Any, fd: int) -> bool:
    try:
        return stream.fileno() == fd
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return False


@contextmanager
def library_output_to(log_file: Path | None):
    """Run a command with everything but its own output in ``log_file``.

    Ray's and the libraries' output (Python warnings and logging, native logs written straight
    to file descriptors 1 and 2, Ray workers' echoed output) goes to the log; the command's own
    lines (``console``, ``err_console``, ``print``) stay on the terminal. ``None``, or streams
    that are not the process's file descriptors 1 and 2 (captured by a test runner), leave
    everything as it is.
    """
    from engine._ray import set_worker_logs_to_driver

    if log_file is None or not (_real_stream(sys.stdout, 1) and _real_stream(sys.stderr, 2)):
        yield
        return
    log_file.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    terminal_out = os.fdopen(os.dup(1), "w", buffering=1, encoding=sys.stdout.encoding)
    terminal_err = os.fdopen(os.dup(2), "w", buffering=1, encoding=sys.stderr.encoding)
    saved = (sys.stdout, console.file, err_console.file)
    with open(log_file, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout, console.file, err_console.file = terminal_out, terminal_out, terminal_err
        set_worker_logs_to_driver(False)
        try:
            yield
        finally:
            link_ray_logs(log_file.parent)
            set_worker_logs_to_driver(True)
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(terminal_out.fileno(), 1)
            os.dup2(terminal_err.fileno(), 2)
            sys.stdout, console.file, err_console.file = saved
            terminal_out.close()
            terminal_err.close()


def link_ray_logs(log_dir: Path) -> None:
    """Link the Ray session's log folder (workers' output) as ``log_dir/ray``."""
    from engine._ray import session_log_dir

    target = session_log_dir()
    link = log_dir / "ray"
    if target is None or not os.path.isdir(target):
        return
    try:
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target, target_is_directory=True)
    except OSError:
        pass  # a read-only or odd folder: the log file still names nothing wrong


def report_line(report: dict[str, Any]) -> str:
    """One training report as the user reads it."""
    skipped = f" ({report['skipped']} spike(s) skipped)" if report.get("skipped") else ""
    return (
        f"[icmf train] step {report['step']}/{report['steps']} loss {report['loss']:.4f} recon {report['recon']:.4f} "
        f"kl {report['kl']:.2f} fusion {report['fusion']:.4f} {report['episodes_per_s']:.1f} episodes/s{skipped}"
    )


@contextmanager
def training_progress(steps: int, print_reports: bool) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A progress bar on a terminal; elsewhere (logs, CI) one line per report if ``print_reports``."""
    with progress_bar("meta-train the F-VAE", total=steps) as advance:
        done = 0

        def show(report: dict[str, Any]) -> None:
            nonlocal done
            advance(report["step"] - done)
            done = report["step"]
            if print_reports and not console.is_terminal:
                console.print(report_line(report), highlight=False, markup=False)

        yield show
