"""A multi-node Ray cluster on this machine for tests: one head and worker raylets, each started
with ``ray start --block`` in its own process group, on free ports and a private temp dir.

``ray stop`` would kill every Ray process of this user (other clusters on a shared machine too),
so teardown signals only the process groups this helper created.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ports(*names: str) -> list[str]:
    """Explicit free ports for every listener Ray would otherwise put on a fixed default port
    (8265, 10001, 52365, ...) that another cluster on this machine may hold."""
    args = []
    for name in names:
        args += [f"--{name}", str(free_port())]
    return args


NODE_PORTS = (
    "node-manager-port",
    "object-manager-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "metrics-export-port",
    "runtime-env-agent-port",
)


@dataclass
class LocalCluster:
    """Start with :meth:`start`; always :meth:`stop` (tears down only these processes)."""

    cpus_per_node: tuple[int, ...] = (2, 2)
    env: dict[str, str] = field(default_factory=dict)
    temp_dir: str = ""
    gcs_port: int = 0
    dashboard_port: int = 0
    procs: list[subprocess.Popen] = field(default_factory=list)
    # Token authentication with a token of this cluster's own, so the test neither depends on nor
    # touches ~/.ray/auth_token; clients get it through $RAY_AUTH_TOKEN.
    token: str = field(default_factory=lambda: secrets.token_hex(16))

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def _spawn(self, args: list[str], log: str) -> None:
        out = open(Path(self.temp_dir) / log, "wb")  # noqa: SIM115 - lives as long as the process
        env = {**os.environ, **self.env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}
        # Our venv first on PATH, so the job's `icmf` entrypoint resolves to this checkout's.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env.pop("RAY_ADDRESS", None)
        self.procs.append(
            subprocess.Popen(
                [RAY, "start", "--block", "--disable-usage-stats", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # own process group: teardown kills exactly this tree
            )
        )

    def start(self, timeout_s: float = 120) -> LocalCluster:
        # Short path: Ray puts Unix sockets under it (limit ~107 bytes).
        self.temp_dir = tempfile.mkdtemp(prefix="icmfc-", dir="/tmp")
        try:
            self._start_nodes(timeout_s)
        except BaseException as exc:
            logs = self._log_tails()
            self.stop()
            if isinstance(exc, (TimeoutError, RuntimeError)):
                raise type(exc)(f"{exc}\n{logs}") from None
            raise
        return self

    def _log_tails(self, lines: int = 15) -> str:
        """The end of each `ray start` log (they are deleted with the temp dir)."""
        tails = []
        for log in sorted(Path(self.temp_dir).glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            tails.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(tails)

    def _start_nodes(self, timeout_s: float) -> None:
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        head, *workers = self.cpus_per_node
        self._spawn(
            [
                "--head",
                f"--port={self.gcs_port}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--num-cpus={head}",
                f"--temp-dir={self.temp_dir}",
                *_ports("ray-client-server-port", *NODE_PORTS),
            ],
            "head.log",
        )
        self._wait_for_dashboard(timeout_s)
        for i, cpus in enumerate(workers):
            self._spawn(
                [f"--address={self.gcs_address}", f"--num-cpus={cpus}", *_ports(*NODE_PORTS)],
                f"worker{i}.log",
            )
        self._wait_for_nodes(len(self.cpus_per_node), timeout_s)

    def _check_alive(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"`ray start` exited with {proc.returncode}; see {self.temp_dir}/*.log")

    def _wait_for_dashboard(self, timeout_s: float) -> None:
        from engine.jobs import JobsClient, JobsError

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                JobsClient(self.address, headers={"Authorization": f"Bearer {self.token}"})
                return
            except JobsError:
                time.sleep(0.5)
        raise TimeoutError(f"the head's dashboard did not come up within {timeout_s:.0f} s")

    def state(self, resource: str, **filters: str) -> list[dict]:
        """Rows of Ray's state API (``nodes``, ``actors``, ...) over HTTP with this cluster's token
        (the ``ray.util.state`` client would need token mode for the whole test process)."""
        import requests

        params: dict[str, object] = {"limit": 10_000, "detail": 1}
        if filters:
            params.update(
                filter_keys=list(filters),
                filter_predicates=["="] * len(filters),
                filter_values=list(filters.values()),
            )
        response = requests.get(
            f"{self.address}/api/v0/{resource}",
            params=params,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=30,
        )
        response.raise_for_status()
        return response.json()["data"]["result"]["result"]

    def nodes(self) -> list[dict]:
        return self.state("nodes")

    def _wait_for_nodes(self, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._check_alive()
            alive = [n for n in self.nodes() if n["state"] == "ALIVE"]
            if len(alive) >= count:
                return
            time.sleep(1)
        raise TimeoutError(f"{count} nodes did not join within {timeout_s:.0f} s")

    def stop(self) -> None:
        """SIGTERM each `ray start --block` (it stops its own raylet, GCS, dashboard, workers), then
        SIGKILL whatever is left of it: its process group, and its descendants that left the group
        (Ray workers call setsid). Workers first, head last; nothing else is touched."""
        import psutil

        descendants = []
        for proc in self.procs:
            try:
                descendants += psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        for proc in reversed(self.procs):
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 8
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc, signal.SIGKILL)
        for child in descendants:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        self.procs.clear()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # pgid == pid: start_new_session made it a group leader
    except (ProcessLookupError, PermissionError):
        pass
