"""Fixtures for the lab's tests: one tiny lab, built once per session through the CLI.

Every test module here is marked ``lab`` (the root conftest skips it without the lab's extra)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_lab(tmp_path_factory):
    """``(lab directory, manifest)`` of a tiny lab (both suites, seed 0), built in this process."""
    from benchmarks.lab.__main__ import main
    from benchmarks.lab.manifest import load_lab

    out = tmp_path_factory.mktemp("lab") / "tiny"
    assert main(["build", "--size", "tiny", "--out", str(out), "--seed", "0", "--quiet"]) == 0
    return out, load_lab(out)
