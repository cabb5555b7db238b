"""Which training failures are worth a retry: only a worker's or node's death.

Ray Train's own failure policy (``FailureConfig.max_failures``) restarts the worker group for
*any* worker error, so a bad config or examples file used to cost ``max_failures`` restarts before
its message surfaced. Its policy is not pluggable, so meta-training runs Ray Train with
``max_failures=0`` and decides here, on the driver (:func:`fit_with_retries`):

- a worker raised a **deterministic** error — any :class:`~engine.errors.IcmfError` (config, catalog,
  task, examples errors, :class:`WorkerFault`) or a pydantic validation error: it would repeat, so
  the run ends at once with the original exception and message;
- anything else (a worker or node died, a collective broke because a peer died, an I/O error):
  the run restarts from its latest checkpoint (same run name), at most ``max_failures`` times.

Inside workers, :func:`fail_fast` turns errors of local computation that would repeat (shape and
type errors, bad values, out of memory) into :class:`WorkerFault`, naming the worker and what it
was doing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import pydantic

from engine.errors import IcmfError

# Errors of local computation (no I/O, no collectives) that a retry would raise again.
_REPEATING = (
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    NotImplementedError,
    ArithmeticError,
    AssertionError,
    MemoryError,
    RuntimeError,  # torch: shape, dtype and device mismatches, out of memory
)
# ... except a RuntimeError that names the hardware or the communication layer.
_TRANSIENT_MARKERS = ("CUDA error", "NCCL", "ECC", "Gloo", "gloo", "Connection reset", "Connection closed")


class WorkerFault(IcmfError, RuntimeError):
    """An error inside a training worker that would repeat on a retry (the run ends at once)."""


def is_deterministic(error: BaseException) -> bool:
    """Whether ``error`` (raised by a worker's code) would be raised again by a retry."""
    return isinstance(error, (IcmfError, pydantic.ValidationError))


@contextmanager
def fail_fast(where: str) -> Iterator[None]:
    """Re-raise errors of local computation that would repeat as :class:`WorkerFault`
    (``"<where>: <Type>: <message>"``); project errors pass unchanged, anything else (I/O,
    collectives, a hardware fault) stays retryable."""
    try:
        yield
    except (IcmfError, pydantic.ValidationError):
        raise
    except _REPEATING as exc:
        if isinstance(exc, RuntimeError) and any(m in str(exc) for m in _TRANSIENT_MARKERS):
            raise
        raise WorkerFault(f"{where}: {type(exc).__name__}: {exc}") from exc


def first_deterministic(worker_failures: Mapping[int, BaseException]) -> BaseException | None:
    """The lowest rank's deterministic error among a failed group's errors, or None when every
    failure is retryable (e.g. a worker died and the others lost their collective)."""
    for rank in sorted(worker_failures):
        if is_deterministic(worker_failures[rank]):
            return worker_failures[rank]
    return None


def fit_with_retries(
    make_trainer: Callable[[], Any], max_failures: int, log: Callable[[str], None] = print
) -> Any:
    """``make_trainer().fit()``, ending at once on a deterministic worker error and restarting
    (a new trainer on the same run, which resumes from its latest checkpoint) on any other worker
    group failure, at most ``max_failures`` times (-1: without limit).

    ``make_trainer`` must build a trainer with Ray Train's own ``FailureConfig(max_failures=0)``.

    Raises:
        the workers' deterministic error itself (its type and message), or Ray Train's
        ``WorkerGroupError`` / ``ControllerError`` once the retries are spent (or for a
        controller failure that is not a worker's death).
    """
    from ray.exceptions import RayActorError
    from ray.train import ControllerError, WorkerGroupError

    failures = 0
    while True:
        try:
            return make_trainer().fit()
        except ControllerError as exc:
            # The controller may be the one to notice a worker's death (an actor call failed).
            cause = exc.controller_failure
            if is_deterministic(cause):
                raise cause from None
            if not isinstance(cause, RayActorError):
                raise
            error, causes = exc, [type(cause).__name__]
        except WorkerGroupError as exc:
            fatal = first_deterministic(exc.worker_failures)
            if fatal is not None:
                raise fatal from None
            error, causes = exc, sorted({type(e).__name__ for e in exc.worker_failures.values()})
        failures += 1
        if max_failures != -1 and failures > max_failures:
            raise error
        log(
            f"worker group failed ({', '.join(causes)}); restarting from the latest checkpoint "
            f"(retry {failures} of {max_failures if max_failures != -1 else 'unlimited'})"
        )
