"""A thin client of the Ray Jobs API: submit, follow logs, status, list, stop.

Every failure to reach the cluster becomes a :class:`JobsError` naming the address and the likely
fix, instead of a stack trace from ``requests``/``aiohttp``.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.errors import IcmfError

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# Exit status of `icmf submit --wait` for a job that was stopped: what a shell gives an
# interrupted command.
STOPPED_EXIT = 130


class JobsError(IcmfError, ValueError):
    """The Jobs API cannot be reached, or refused a request."""


def normalise_address(address: str | None) -> str:
    """``HEAD:8265`` -> ``http://HEAD:8265``; refuse an empty address with the fix."""
    if not address:
        raise JobsError("no cluster address: pass --address http://HEAD:8265 or set RAY_API_SERVER_ADDRESS")
    return address if "://" in address else f"http://{address}"


def _unreachable(address: str, exc: BaseException) -> JobsError:
    return JobsError(
        f"cannot reach the Ray Jobs API at {address} ({type(exc).__name__}: {exc}); check that the "
        "cluster is up and its dashboard port (8265 by default) is reachable from here, e.g. "
        "`ray dashboard clusters/aws-cpu.yaml` or `kubectl port-forward svc/<cluster>-head-svc 8265`"
    )


def auth_headers() -> dict[str, str]:
    """Ray's bearer token for clusters started with token authentication (Ray's own sources, in its
    order: ``$RAY_AUTH_TOKEN``, the file ``$RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``); none when
    ``RAY_AUTH_MODE=disabled`` or no token exists. Ray's SDK sends it only when this process itself
    runs in token mode, which a client machine usually does not."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        token = path.read_text().strip() if path.is_file() else ""
    return {"Authorization": f"Bearer {token}"} if token else {}


def exit_status(status: str, driver_exit_code: int | None) -> int | None:
    """The exit status ``icmf submit --wait`` returns for a job; ``None`` while it still runs."""
    if status == "SUCCEEDED":
        return 0
    if status == "FAILED":
        return driver_exit_code if driver_exit_code else 1
    if status == "STOPPED":
        return STOPPED_EXIT
    return None


def _details(info: Any) -> dict[str, Any]:
    """The fields of a ``JobDetails`` worth showing, as plain JSON-able values."""
    status = getattr(info.status, "value", info.status)
    return {
        "submission_id": info.submission_id,
        "job_id": info.job_id,
        "status": str(status),
        "entrypoint": info.entrypoint,
        "message": info.message,
        "start_time": info.start_time,
        "end_time": info.end_time,
        "driver_exit_code": info.driver_exit_code,
        "metadata": info.metadata or {},
        "exit_status": exit_status(str(status), info.driver_exit_code),
    }


class JobsClient:
    """One cluster's Jobs API (``http://HEAD:8265``)."""

    def __init__(self, address: str | None, headers: dict[str, str] | None = None):
        from ray.job_submission import JobSubmissionClient

        self.address = normalise_address(address)
        from ray.exceptions import AuthenticationError

        try:
            self._client = JobSubmissionClient(self.address, headers=headers or auth_headers())
        except AuthenticationError as exc:
            raise JobsError(f"the cluster at {self.address} refused this client's token: {exc}") from None
        except (ConnectionError, OSError, RuntimeError) as exc:
            raise _unreachable(self.address, exc) from None

    def _call(self, what: str, fn: Callable, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ConnectionError, OSError) as exc:
            raise _unreachable(self.address, exc) from None
        except RuntimeError as exc:  # the SDK's wrapper of an HTTP error status
            raise JobsError(f"{what} failed at {self.address}: {exc}") from None

    def submit(
        self,
        entrypoint: str,
        runtime_env: dict[str, Any] | None = None,
        submission_id: str | None = None,
        metadata: dict[str, str] | None = None,
        entrypoint_num_cpus: float | None = None,
        entrypoint_num_gpus: float | None = None,
    ) -> str:
        """Submit ``entrypoint``; returns the submission id."""
        return self._call(
            "submit",
            self._client.submit_job,
            entrypoint=entrypoint,
            runtime_env=runtime_env or None,
            submission_id=submission_id,
            metadata=metadata,
            entrypoint_num_cpus=entrypoint_num_cpus,
            entrypoint_num_gpus=entrypoint_num_gpus,
        )

    def status(self, job_id: str) -> dict[str, Any]:
        return _details(self._call(f"status of job {job_id}", self._client.get_job_info, job_id))

    def list(self) -> list[dict[str, Any]]:
        jobs = [_details(j) for j in self._call("listing jobs", self._client.list_jobs)]
        return sorted(jobs, key=lambda j: j["start_time"] or 0)

    def logs(self, job_id: str) -> str:
        return self._call(f"logs of job {job_id}", self._client.get_job_logs, job_id)

    def stop(self, job_id: str) -> bool:
        """Ask the job to stop; ``False`` when it had already finished."""
        return bool(self._call(f"stopping job {job_id}", self._client.stop_job, job_id))

    def follow(self, job_id: str, write: Callable[[str], None], poll_s: float = 0.5) -> dict[str, Any]:
        """Stream the job's logs through ``write`` until it ends; returns its final details."""

        async def tail() -> None:
            async for chunk in self._client.tail_job_logs(job_id):
                write(chunk)

        try:
            asyncio.run(tail())
        except (ConnectionError, OSError) as exc:
            raise _unreachable(self.address, exc) from None
        except RuntimeError as exc:
            raise JobsError(f"following the logs of job {job_id} at {self.address} failed: {exc}") from None
        return self.wait(job_id, poll_s=poll_s)

    def wait(self, job_id: str, timeout_s: float | None = None, poll_s: float = 0.5) -> dict[str, Any]:
        """Poll until the job is terminal (the log stream may close a moment before the status flips)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            details = self.status(job_id)
            if details["status"] in TERMINAL:
                return details
            if deadline is not None and time.monotonic() > deadline:
                raise JobsError(f"job {job_id} still {details['status']} after {timeout_s:.0f} s")
            time.sleep(poll_s)
