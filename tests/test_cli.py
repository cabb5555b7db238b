"""The ``icmf`` command line: spellings, JSON output, exit codes and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from engine.adapters import load_adapter
from engine.cli.main import main
from tests.helpers import make_adapter, rewrite_weights


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def adapters(tmp_path):
    return [str(make_adapter(tmp_path / f"a{i}", seed=i)) for i in range(2)]


def test_ingest_ls_show_export(tmp_path, capsys, adapters):
    cat = str(tmp_path / "cat")
    code, out, _ = run(
        capsys, "catalog", "ingest", *adapters, "--catalog", cat, "--task", "copy", "--tag", "t1"
    )
    assert code == 0 and "ingested 2 adapter(s)" in out
    code, out, _ = run(capsys, "catalog", "ls", "--catalog", cat, "--json")
    listed = json.loads(out)
    assert code == 0 and [e["task"] for e in listed] == ["copy", "copy"] and listed[0]["tags"] == ["t1"]
    code, out, _ = run(capsys, "catalog", "ls", "--catalog", cat, "--task", "other", "--json")
    assert json.loads(out) == []
    code, out, _ = run(capsys, "catalog", "ls", "--catalog", cat)
    assert code == 0 and listed[0]["id"] in out
    adapter_id = listed[0]["id"]
    code, out, _ = run(capsys, "catalog", "show", adapter_id, "--catalog", cat, "--json")
    shown = json.loads(out)
    assert shown["id"] == adapter_id and shown["layout"]["r_max"] == 4
    code, out, _ = run(capsys, "catalog", "export", adapter_id, str(tmp_path / "out"), "--catalog", cat)
    assert code == 0 and set(load_adapter(tmp_path / "out").modules) == set(load_adapter(adapters[0]).modules)
    code, out, err = run(capsys, "catalog", "ingest", *adapters, "--catalog", cat, "--task", "copy")
    assert code == 0 and "2 duplicate(s)" in out and "already in the catalog" in err


def test_bad_input_fails_with_the_reason(tmp_path, capsys, adapters):
    cat = str(tmp_path / "cat")
    rewrite_weights(tmp_path / "a1", lambda t: {k: v * float("nan") for k, v in t.items()})
    code, _, err = run(capsys, "catalog", "ingest", *adapters, "--catalog", cat, "--task", "copy")
    assert code == 1 and err.startswith("icmf: error: 1 adapter(s) rejected") and "non-finite" in err
    code, out, err = run(
        capsys, "catalog", "ingest", *adapters, "--catalog", cat, "--task", "copy", "--skip-invalid"
    )
    assert code == 1 and "ingested 1 adapter(s)" in out and "rejected" in err
    code, _, err = run(capsys, "catalog", "show", "../../etc/passwd", "--catalog", cat)
    assert code == 1 and "invalid adapter id" in err
    code, _, err = run(capsys, "catalog", "synth", "--catalog", cat, "--n", "3", "--layout", "bogus!")
    assert code == 1 and "invalid layout" in err


def test_a_bug_prints_its_traceback_and_says_it_is_a_bug(tmp_path, capsys, monkeypatch, adapters):
    """A user error is one line; anything else (here a ValueError no user input explains) keeps its
    traceback and is called a bug, not shown as if the input were at fault."""
    from engine.catalog import Catalog

    def broken(self, *args, **kwargs):
        raise ValueError("internal invariant broken")

    monkeypatch.setattr(Catalog, "entries", broken)
    code, _, err = run(capsys, "catalog", "ls", "--catalog", str(tmp_path / "cat"))
    assert (
        code == 70 and "Traceback (most recent call last)" in err and "ValueError: internal invariant" in err
    )
    assert "this is a bug in icmf" in err.splitlines()[-1] and "icmf: error:" not in err


def test_installed_command_exits_non_zero_with_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "engine.cli.main", "catalog", "show", "nope", "--catalog", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "no adapter 'nope'" in proc.stderr


@pytest.mark.ray
def test_synth_and_stats(tmp_path, capsys, ray_session):
    cat = str(tmp_path / "cat")
    code, out, _ = run(
        capsys, "catalog", "synth", "--catalog", cat, "--n", "20", "--layout", "tiny", "--tasks", "3"
    )
    assert code == 0 and "added 20 synthetic adapter(s)" in out
    code, out, _ = run(capsys, "catalog", "stats", "--catalog", cat, "--json")
    stats = json.loads(out)
    assert code == 0 and stats["num_adapters"] == 20 and sum(stats["tasks"].values()) == 20
    assert stats["slots"] == 2 * 2 * 4 * 64 and stats["mean_std"] > 0
