"""Errors of task models, task definitions, examples and evaluation.

All are ``ValueError`` subclasses (through :class:`engine.errors.IcmfError`), so the CLI reports
them as one-line ``icmf: error: ...`` messages. Each names the file or field at fault and the fix.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.errors import IcmfError


class TaskError(IcmfError, ValueError):
    """A task, its model or its evaluation cannot be set up as asked."""


class SpecError(TaskError):
    """A model spec or task definition is invalid; ``faults`` lists every fault found at once.

    Args:
        source: the file (or ``"<dict>"``) the spec came from.
        faults: one line per fault, each ``field: problem (fix)``.
    """

    def __init__(self, source: str, faults: Sequence[str]):
        self.source = str(source)
        self.faults = list(faults)
        lines = "\n".join(f"  - {f}" for f in self.faults)
        super().__init__(f"{self.source}: {len(self.faults)} fault(s):\n{lines}")


class ExamplesError(TaskError):
    """A task's examples file cannot be read, lacks fields, or holds bad values.

    Args:
        source: the examples file.
        faults: one line per fault (rows are 0-based, in file order).
    """

    def __init__(self, source: str, faults: Sequence[str]):
        self.source = str(source)
        self.faults = list(faults)
        if len(self.faults) == 1:
            message = f"{self.source}: {self.faults[0]}"
        else:
            message = f"{self.source}: {len(self.faults)} fault(s):\n" + "\n".join(
                f"  - {f}" for f in self.faults
            )
        super().__init__(message)
