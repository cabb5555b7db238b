"""Read a built lab's ``lab.json`` with every path resolved against the lab directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Keys whose string values are paths relative to the lab directory.
_PATH_KEYS = {"path", "uri", "train", "support", "eval"}


def _resolve(node: Any, root: Path, key: str | None = None) -> Any:
    if isinstance(node, dict):
        return {k: _resolve(v, root, k) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, root, key) for v in node]
    if isinstance(node, str) and key in _PATH_KEYS and not Path(node).is_absolute():
        return str(root / node)
    return node


def load_lab(path: str | Path) -> dict[str, Any]:
    """The manifest of the lab at ``path`` (its directory or its ``lab.json``), with absolute paths.

    Example::

        lab = load_lab("benchmarks/results/lab/standard-seed0")
        enc = lab["suites"]["encoder"]
        Catalog(enc["catalogs"]["main"]["uri"]).entries(task="vader-sign")
        enc["tasks"]["vader-sign"]["examples"]["eval"]      # JSONL: {"text", "label"}
    """
    path = Path(path)
    file = path / "lab.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no lab manifest; build one with `python -m benchmarks.lab build`")
    manifest = json.loads(file.read_text())
    manifest["suites"] = _resolve(manifest.get("suites", {}), file.parent.resolve())
    if "chart" in manifest:
        manifest["chart"] = str(file.parent.resolve() / manifest["chart"])
    manifest["root"] = str(file.parent.resolve())
    return manifest
