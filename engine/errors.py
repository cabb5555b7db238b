"""Exception types. Every error a user can cause is a ``ValueError`` subclass with a message that
names the file or field, the constraint that failed and, where there is one, the fix."""

from __future__ import annotations

from collections.abc import Sequence


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


class CatalogError(IcmfError, ValueError):
    """A catalog cannot be opened, read or written as asked."""


class IngestError(CatalogError):
    """A batch of adapters was rejected; ``failures`` lists every bad adapter at once."""

    def __init__(self, failures: Sequence[AdapterError]):
        self.failures = list(failures)
        lines = "\n".join(f"  - {f}" for f in self.failures)
        super().__init__(f"{len(self.failures)} adapter(s) rejected; nothing was ingested:\n{lines}")
