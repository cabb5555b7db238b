"""Where a location the user wrote points: the one rule every entry point applies before a path is
stored or handed to Ray workers (whose working directory differs from the user's)."""

from __future__ import annotations

import os
from pathlib import Path


def absolute_location(location: str, base: str | os.PathLike | None = None) -> str:
    """``location`` with a local path made absolute: ``~`` expanded, a relative path taken against
    ``base`` (default: the current directory). A URI (``scheme://...``) is returned unchanged."""
    if "://" in location:
        return location
    return os.path.abspath(os.path.join(base or os.getcwd(), os.path.expanduser(location)))


def folder_of(file: str | os.PathLike) -> Path:
    """The absolute folder of ``file``: what paths written inside that file are relative to."""
    return Path(os.path.abspath(file)).parent
