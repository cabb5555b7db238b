"""The runtime environment a job runs in: a YAML file (``clusters/runtime_env.yaml``) plus flags."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from engine.errors import IcmfError

# Never uploaded with --working-dir: environments, caches and local outputs are large and
# machine-specific (Ray refuses working directories over 500 MiB).
DEFAULT_EXCLUDES = [
    ".git",
    ".venv",
    "**/__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
    "icmf-demo",
    "benchmarks/results/tmp",
    "benchmarks/results/lab",
    "*.egg-info",
]


class RuntimeEnvError(IcmfError, ValueError):
    """A runtime environment file or flag that cannot be used."""


def load_runtime_env(path: str | Path) -> dict[str, Any]:
    """Read a runtime_env YAML mapping (Ray's runtime_env keys: pip, env_vars, working_dir, ...)."""
    path = Path(path)
    if not path.is_file():
        raise RuntimeEnvError(f"{path}: no such runtime_env file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RuntimeEnvError(f"{path}: invalid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise RuntimeEnvError(f"{path}: must be a mapping of runtime_env keys (pip, env_vars, ...)")
    return data


def parse_env_vars(pairs: Sequence[str]) -> dict[str, str]:
    """``KEY=VALUE`` flags to a mapping; every malformed pair is listed at once."""
    env, bad = {}, []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            bad.append(pair)
        else:
            env[key.strip()] = value
    if bad:
        raise RuntimeEnvError(f"--env takes KEY=VALUE; got {', '.join(map(repr, bad))}")
    return env


def build_runtime_env(
    base: Mapping[str, Any] | None = None,
    working_dir: str | None = None,
    env_vars: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Merge a runtime_env mapping with ``--working-dir`` and ``--env`` (flags win).

    A local working directory is checked here and uploaded by Ray without the
    :data:`DEFAULT_EXCLUDES`; a remote one (``s3://.../pkg.zip``) is passed through.
    """
    env = dict(base or {})
    if working_dir is not None:
        if "://" not in working_dir and not Path(working_dir).is_dir():
            raise RuntimeEnvError(f"--working-dir {working_dir}: not a directory")
        env["working_dir"] = working_dir
        if "://" not in working_dir:
            env["excludes"] = sorted(set(env.get("excludes", [])) | set(DEFAULT_EXCLUDES))
    if env_vars:
        env["env_vars"] = {**env.get("env_vars", {}), **env_vars}
    return env
