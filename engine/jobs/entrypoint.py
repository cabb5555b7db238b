"""The job's entrypoint: an ``icmf`` command, checked with the real parser before it is submitted."""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Sequence

from engine.errors import IcmfError

# Commands that make no sense inside a job: they talk to the cluster from outside it.
NOT_IN_A_JOB = ("submit", "jobs")


class EntrypointError(IcmfError, ValueError):
    """The command given after ``--`` is not a valid ``icmf`` command."""


def check_command(argv: Sequence[str], parser: argparse.ArgumentParser) -> list[str]:
    """Validate ``icmf SUBCOMMAND ...`` with the CLI's own parser (so a typo fails here, not after the
    job waited in the cluster's queue); returns the arguments after ``icmf``.

    ``parser`` is ``engine.cli.main.build_parser()``: the CLI sits above this package, so it hands
    its parser down rather than this module importing it.

    Raises:
        EntrypointError: empty command, not ``icmf``, a cluster-side command, or arguments the
            parser rejects (its message is included).
    """
    argv = list(argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        raise EntrypointError(
            "no command to run: give it after --, e.g. `icmf submit ... -- icmf train cfg.yaml`"
        )
    if argv[0] != "icmf":
        raise EntrypointError(
            f"a job runs an icmf command; got {argv[0]!r} (e.g. `-- icmf train cfg.yaml`; for other "
            "programs use `ray job submit`)"
        )
    if len(argv) > 1 and argv[1] in NOT_IN_A_JOB:
        raise EntrypointError(f"`icmf {argv[1]}` runs on your machine, not inside a job")
    _parse(parser, argv[1:])
    return argv[1:]


def build_entrypoint(argv: Sequence[str], parser: argparse.ArgumentParser) -> str:
    """The shell command line Ray runs for ``argv`` (``icmf ...``, checked with ``parser``), each
    argument quoted."""
    return shlex.join(["icmf", *check_command(argv, parser)])


def _parse(parser: argparse.ArgumentParser, args: list[str]) -> None:
    import contextlib
    import io

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(args)
    except SystemExit as exc:
        if exc.code == 0:  # --help / --version: valid, but prints and exits inside the job
            raise EntrypointError("`--help`/`--version` print and exit; run them locally") from None
        lines = stderr.getvalue().strip().splitlines() or ["invalid arguments"]
        reason = lines[-1].split("error: ", 1)[-1]
        raise EntrypointError(f"`icmf {shlex.join(args)}` does not parse: {reason}") from None
