"""Exception types. Every error a user can cause is a ``ValueError`` subclass with a message that
names the file or field, the constraint that failed and, where there is one, the fix."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def _rebuild(cls: type[BaseException], args: tuple, state: dict) -> BaseException:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class IcmfError(Exception):
    """Base class of every error the engine raises on purpose.

    Errors cross process boundaries (Ray pickles a worker's exception to its driver), so they are
    rebuilt from their message and attributes, not by calling ``__init__`` again: subclasses take
    their own arguments (a source and a list of faults, ...), which ``BaseException`` would pass
    back as the one formatted message and fail (``missing 1 required positional argument``).
    """

    def __reduce__(self):
        return (_rebuild, (type(self), self.args, dict(self.__dict__)))


class FaultsError(IcmfError, ValueError):
    """An input with faults, every one listed at once (as torchtune reports a config).

    The message is ``source: fault`` for one fault, ``source: N fault(s):`` and one ``  - fault``
    line each for several, or ``source`` alone when no faults are given (a complete message).

    Args:
        source: the file, field or object at fault (or the whole message).
        faults: one line per fault, each ``field: problem (fix)``.
    """

    def __init__(self, source: str, faults: Sequence[str] = ()):
        self.source = str(source)
        self.faults = list(faults)
        if not self.faults:
            message = self.source
        elif len(self.faults) == 1:
            message = f"{self.source}: {self.faults[0]}"
        else:
            lines = "\n".join(f"  - {f}" for f in self.faults)
            message = f"{self.source}: {len(self.faults)} fault(s):\n{lines}"
        super().__init__(message)


def pydantic_faults(errors: Iterable[Mapping[str, Any]], top: str = "(top level)") -> list[str]:
    """One line per pydantic error (``ValidationError.errors()``): ``field.path: problem``, with
    the offending value (shortened) for wrong values; ``top`` names a fault of the whole input."""
    faults = []
    for error in errors:
        where = ".".join(str(p) for p in error["loc"]) or top
        if error["type"] == "missing":
            faults.append(f"{where}: required")
        elif error["type"] == "extra_forbidden":
            faults.append(f"{where}: unknown field; remove it (check the spelling)")
        else:
            value = repr(error.get("input"))
            value = value if len(value) <= 60 else value[:57] + "..."
            faults.append(f"{where}: {error['msg']} (got {value})")
    return list(dict.fromkeys(faults))


class AdapterError(IcmfError, ValueError):
    """An adapter directory cannot be read or fails validation.

    Args:
        source: the adapter directory (or file) at fault.
        cause: what is wrong with it, phrased so the user can fix it.
    """

    def __init__(self, source: str, cause: str):
        self.source = str(source)
        self.cause = cause
        super().__init__(f"{self.source}: {cause}")


class InvalidNameError(IcmfError, ValueError):
    """An id or name (adapter, task, layout, method) breaks the naming rule; ids never become paths."""


class CatalogError(IcmfError, ValueError):
    """A catalog cannot be opened, read or written as asked."""


class CommitConflict(CatalogError):
    """Another writer committed the catalog version this write was about to commit."""


class IngestError(CatalogError):
    """A batch of adapters was rejected; ``failures`` lists every bad adapter at once."""

    def __init__(self, failures: Sequence[AdapterError]):
        self.failures = list(failures)
        lines = "\n".join(f"  - {f}" for f in self.failures)
        super().__init__(f"{len(self.failures)} adapter(s) rejected; nothing was ingested:\n{lines}")
