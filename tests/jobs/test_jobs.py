"""``icmf submit`` / ``icmf jobs`` without a cluster: the command is checked before anything is sent,
runtime environments merge as documented, exit statuses map, and an unreachable address is named."""

from __future__ import annotations

import socket

import pytest

from engine.cli.main import build_parser, main
from engine.jobs import build_entrypoint, build_runtime_env, exit_status
from engine.jobs.client import STOPPED_EXIT, auth_headers, normalise_address
from engine.jobs.entrypoint import EntrypointError
from engine.jobs.runtime_env import DEFAULT_EXCLUDES, RuntimeEnvError, load_runtime_env, parse_env_vars


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_entrypoint_is_the_quoted_icmf_command():
    argv = ["--", "icmf", "fuse", "--catalog", "s3://b/c", "--tasks", "a,b", "--method", "ties"]
    assert build_entrypoint([*argv, "--out", "out dir"], build_parser()) == (
        "icmf fuse --catalog s3://b/c --tasks a,b --method ties --out 'out dir'"
    )
    assert (
        build_entrypoint(["icmf", "train", "cfg.yaml", "--workers", "4"], build_parser())
        == "icmf train cfg.yaml --workers 4"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "no command to run"),
        (["--"], "no command to run"),
        (["python", "x.py"], "a job runs an icmf command; got 'python'"),
        (["icmf", "trian", "cfg.yaml"], "invalid choice: 'trian'"),
        (["icmf", "train"], "the following arguments are required: CONFIG.yaml"),
        (["icmf", "train", "cfg.yaml", "--workers", "two"], "invalid int value: 'two'"),
        (["icmf", "submit", "--", "icmf", "train", "c.yaml"], "runs on your machine"),
        (["icmf", "--help"], "print and exit"),
    ],
)
def test_bad_commands_are_refused_before_submitting(argv, message):
    with pytest.raises(EntrypointError, match=message):
        build_entrypoint(argv, build_parser())


def test_runtime_env_merges_file_and_flags(tmp_path):
    path = tmp_path / "env.yaml"
    path.write_text("pip: [icm-fusion]\nenv_vars: {A: '1', B: '2'}\nexcludes: [data/]\n")
    env = build_runtime_env(load_runtime_env(path), str(tmp_path), parse_env_vars(["B=3", "C=x=y"]))
    assert env["pip"] == ["icm-fusion"] and env["working_dir"] == str(tmp_path)
    assert env["env_vars"] == {"A": "1", "B": "3", "C": "x=y"}
    assert set(env["excludes"]) == {"data/", *DEFAULT_EXCLUDES}
    remote = build_runtime_env(None, "s3://bucket/pkg.zip")
    assert remote == {"working_dir": "s3://bucket/pkg.zip"}
    assert build_runtime_env() == {}


def test_runtime_env_faults_are_named(tmp_path):
    with pytest.raises(RuntimeEnvError, match="--env takes KEY=VALUE; got 'A', '=1'"):
        parse_env_vars(["A", "=1", "B=2"])
    with pytest.raises(RuntimeEnvError, match="not a directory"):
        build_runtime_env(None, str(tmp_path / "nope"))
    (tmp_path / "list.yaml").write_text("- pip\n")
    with pytest.raises(RuntimeEnvError, match="must be a mapping"):
        load_runtime_env(tmp_path / "list.yaml")
    with pytest.raises(RuntimeEnvError, match="no such runtime_env file"):
        load_runtime_env(tmp_path / "missing.yaml")


def test_exit_status_of_each_job_state():
    assert exit_status("SUCCEEDED", 0) == 0
    assert exit_status("FAILED", 3) == 3
    assert exit_status("FAILED", None) == 1  # e.g. the runtime env could not be set up
    assert exit_status("STOPPED", None) == STOPPED_EXIT
    assert exit_status("RUNNING", None) is None and exit_status("PENDING", None) is None


def test_address_and_token(monkeypatch, tmp_path):
    assert normalise_address("head:8265") == "http://head:8265"
    assert normalise_address("https://head:443") == "https://head:443"
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "")
    (tmp_path / "token").write_text("abc\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    assert auth_headers() == {"Authorization": "Bearer abc"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "xyz")
    assert auth_headers() == {"Authorization": "Bearer xyz"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert auth_headers() == {}


@pytest.mark.parametrize(
    "argv",
    [
        ["submit", "--wait", "--", "icmf", "train", "cfg.yaml"],
        ["jobs", "ls"],
        ["jobs", "status", "raysubmit_x"],
        ["jobs", "logs", "raysubmit_x", "--follow"],
        ["jobs", "stop", "raysubmit_x"],
    ],
)
def test_unreachable_address_is_named(argv, closed_port, capsys):
    address = f"http://127.0.0.1:{closed_port}"
    assert main([*argv[:2], "--address", address, *argv[2:]]) == 1
    err = capsys.readouterr().err
    assert f"icmf: error: cannot reach the Ray Jobs API at {address}" in err
    assert "dashboard port" in err and "Traceback" not in err


def test_missing_address_says_how_to_give_one(monkeypatch, capsys):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["jobs", "ls"]) == 1
    assert "pass --address http://HEAD:8265" in capsys.readouterr().err
