"""The README's quick start as a new user types it: relative paths, from a fresh working directory.

``icmf demo`` (few steps) runs as a separate process in an empty temporary directory, its output
is checked to be short, and ``icmf serve icmf-demo/serve.yaml`` serves what it wrote; the README's
``openai`` client block then runs against that server, unchanged but for the port.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ICMF = Path(sys.executable).with_name("icmf")
DEMO_MAX_LINES = 40


def readme_block(marker: str) -> str:
    """The fenced code block that follows ``<!-- marker ... -->`` in the README."""
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- {marker}.*?-->\n```\w*\n(.*?)```", text, flags=re.S)
    assert match, f"README.md has no block marked {marker}"
    return match.group(1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def user_env() -> dict[str, str]:
    """The environment of a user's shell: no Ray address of the test session's cluster."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return env | {"HF_HUB_OFFLINE": "1", "ICMF_LOG_DIR": "logs"}


def wait_healthy(port: int, server: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"icmf serve exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"icmf serve was not healthy within {timeout_s}s")


def stop(process: subprocess.Popen) -> None:
    """Stop the process group this test started (its own Ray included), never anyone else's."""
    for sig, grace in ((signal.SIGINT, 30), (signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        if process.poll() is not None:
            break
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
    try:  # Ray's own daemons of that process group, should any outlive their driver
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_demo_then_serve_as_the_readme_says(tmp_path):
    demo = subprocess.run(
        [str(ICMF), "demo", "--per-task", "1", "--steps", "40", "--fvae-steps", "30"],
        cwd=tmp_path,
        env=user_env(),
        capture_output=True,
        text=True,
        timeout=900,
        stdin=subprocess.DEVNULL,
    )
    output = demo.stdout + demo.stderr
    assert demo.returncode == 0, output
    lines = output.strip().splitlines()
    assert len(lines) <= DEMO_MAX_LINES, output
    # Ray's and the libraries' chatter went to the log, not to the user.
    for noise in ("RESUME", "LOAD_GLOBAL", "PlacementGroupCleaner", "TrainingReport", "Warning", "INFO"):
        assert noise not in output, output
    for method in ("task_arithmetic", "ties", "icm", "icm+refine+span"):
        assert (
            method in output
            and (tmp_path / "icmf-demo" / "fused" / method / "adapter_model.safetensors").exists()
        )
    assert (tmp_path / "icmf-demo" / "fusion_quality.png").stat().st_size > 0
    assert any((tmp_path / "icmf-demo" / "logs").glob("demo-*.log"))
    assert "icmf serve icmf-demo/serve.yaml" in output

    port = free_port()
    server = subprocess.Popen(
        [str(ICMF), "serve", "icmf-demo/serve.yaml", "--port", str(port)],
        cwd=tmp_path,
        env=user_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        wait_healthy(port, server, timeout_s=240)
        client = readme_block("quickstart-client").replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        run = subprocess.run(
            [sys.executable, "-c", client], cwd=tmp_path, capture_output=True, text=True, timeout=300
        )
        assert run.returncode == 0, run.stdout + run.stderr
        texts = dict(line.split(": ", 1) for line in run.stdout.strip().splitlines())
        assert list(texts) == ["base", "adapter", "task_arithmetic", "icm"]
        for name in ("adapter", "task_arithmetic", "icm"):  # the untrained base emits any token
            assert re.fullmatch(r"[0-9 ]+", texts[name].strip()) and texts[name] != texts["base"], texts
    finally:
        stop(server)
