"""``icmf submit`` and ``icmf jobs``: run icmf commands on a Ray cluster (being built, issue 6)."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("submit", help="submit an icmf command as a Ray job")
    parser.set_defaults(func=_run)
    parser = commands.add_parser("jobs", help="list, inspect, follow or stop Ray jobs")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    raise NotImplementedError("icmf submit/jobs is not implemented yet")
