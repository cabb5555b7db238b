"""Errors of task models, task definitions, examples and evaluation.

All are ``ValueError`` subclasses (through :class:`engine.errors.IcmfError`), so the CLI reports
them as one-line ``icmf: error: ...`` messages. Each names the file or field at fault and the fix.
"""

from __future__ import annotations

from engine.errors import FaultsError, IcmfError


class TaskError(IcmfError, ValueError):
    """A task, its model or its evaluation cannot be set up as asked."""


class SpecError(TaskError, FaultsError):
    """A model spec or task definition is invalid; ``faults`` lists every fault found at once
    (``source``: the file, or ``"<dict>"``, the spec came from)."""


class ExamplesError(TaskError, FaultsError):
    """A task's examples file (``source``) cannot be read, lacks fields, or holds bad values;
    ``faults`` has one line per fault (rows are 0-based, in file order)."""


def raise_task_faults(faults: list[Exception], what: str) -> None:
    """Raise the faults collected over several tasks, if any: a single one as itself (its type
    and message say the most), several as one :class:`TaskError` listing each, headed
    ``{count} task(s) {what}``."""
    if len(faults) == 1:
        raise faults[0]
    if faults:
        lines = "\n".join(f"  - {f}" for f in faults)
        raise TaskError(f"{len(faults)} task(s) {what}:\n{lines}")
