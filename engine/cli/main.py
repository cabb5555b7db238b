"""Entry point of the ``icmf`` command."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from datetime import datetime
from pathlib import Path

from engine import __version__
from engine._output import library_output_to
from engine.cli import catalog as catalog_cmd
from engine.cli import demo as demo_cmd
from engine.cli import eval as eval_cmd
from engine.cli import fuse as fuse_cmd
from engine.cli import jobs as jobs_cmd
from engine.cli import serve as serve_cmd
from engine.cli import task as task_cmd
from engine.cli import taskvec as taskvec_cmd
from engine.cli import train as train_cmd
from engine.errors import IcmfError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="icmf", description="ICM-Fusion: fuse catalogs of LoRA adapters on Ray."
    )
    parser.add_argument("--version", action="version", version=f"icmf {__version__}")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's and the libraries' output here instead of in the log file "
        "($ICMF_LOG_DIR, default ~/.cache/icmf/logs; the demo's: <workdir>/logs)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    catalog_cmd.register(commands)
    demo_cmd.register(commands)
    task_cmd.register(commands)
    taskvec_cmd.register(commands)
    eval_cmd.register(commands)
    fuse_cmd.register(commands)
    train_cmd.register(commands)
    serve_cmd.register(commands)
    jobs_cmd.register(commands)
    return parser


# Errors a user causes and can fix: the engine's own (every one names the file or field at fault)
# and a path that is missing or not readable. Anything else is a bug and keeps its traceback.
USER_ERRORS = (IcmfError, FileNotFoundError, PermissionError)
EXIT_BUG = 70  # sysexits' EX_SOFTWARE: an internal error, distinct from a user error's 1


def command_log_file(args: argparse.Namespace) -> Path:
    """Where a command's library and Ray output goes: ``args.log_dir_of(args)`` when the command sets it
    (the demo: its workdir), else ``$ICMF_LOG_DIR`` or ``~/.cache/icmf/logs``."""
    log_dir_of = getattr(args, "log_dir_of", None)
    log_dir = log_dir_of(args) if log_dir_of else os.environ.get("ICMF_LOG_DIR") or "~/.cache/icmf/logs"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(log_dir).expanduser().absolute() / f"{args.command}-{stamp}-{os.getpid()}.log"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    log_file = None if args.verbose else command_log_file(args)
    try:
        with library_output_to(log_file):
            return int(args.func(args) or 0)
    except USER_ERRORS as exc:
        print(f"icmf: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("icmf: interrupted", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print(
            f"icmf: internal error in `icmf {args.command}`: this is a bug in icmf {__version__}, not in "
            "your input; please report it with the traceback above",
            file=sys.stderr,
        )
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
