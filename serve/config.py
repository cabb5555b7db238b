"""The serving config: the ``args`` of the Serve application in a Serve config YAML.

``serve run serve/configs/lab.yaml`` hands these ``args`` to :func:`serve.app.build_app`;
``icmf serve`` reads the same file. Every fault (bad fields and missing files) is reported at once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml

from engine.errors import FaultsError, IcmfError, pydantic_faults
from engine.paths import absolute_location, folder_of

PATH_FIELDS = ("catalog", "base_model", "tokenizer", "fvae")


class ServeConfigError(FaultsError):
    """The serving config is invalid; the message lists every fault."""


class Limits(pydantic.BaseModel):
    """Per-request bounds (a request over any of them gets a 4xx, never reaches the model)."""

    model_config = pydantic.ConfigDict(extra="forbid")
    max_body_bytes: int = pydantic.Field(65536, gt=0, description="request body size")
    max_prompt_chars: int = pydantic.Field(512, gt=0)
    max_tokens: int = pydantic.Field(64, gt=0, description="largest max_tokens a request may ask")
    max_model_chars: int = pydantic.Field(4096, gt=0, description="size of the 'model' field (specs)")


class ServeConfig(pydantic.BaseModel):
    """What one serving application hosts and how.

    Attributes:
        catalog: catalog URI; the only place adapter ids resolve.
        base_model: the base model directory (``save_pretrained``), loaded once per replica.
        tokenizer: a lab char tokenizer JSON file (``tokenizer_kind: char``) or a transformers
            tokenizer directory (``hf``).
        base_aliases: extra names of the bare base in the ``model`` field (besides ``base``).
        fvae: an F-VAE artifact directory (``icmf train`` output); enables ``icm`` fusion specs.
        cache_size: adapters (stored or fused) kept loaded per replica.
        negative_ttl_s: how long a failed load is remembered.
        read_cache_mib: catalog adapters kept in host memory after a read (MiB), so fusion specs
            over the same inputs with new weights skip the catalog read (0 disables it).
        icm_cache_mib: per-input ``icm`` work kept per replica (MiB): each input adapter's
            condition, F-VAE code, decoded reconstruction and factors
            (:class:`engine.fusion.icm.inputs.IcmInputsCache`), so a cold ``icm`` spec over
            inputs seen before pays one decode, not an encode and a decode per input (0 disables
            it). An entry is about 2 x 4 bytes per layout slot (~150 KB for the lab's model).
        batching: ``mixed`` (one forward per batch, each sample routed to its adapter) or
            ``grouped`` (one forward per adapter within a batch).
        fingerprint_check_s: how often each replica re-hashes its base weights in the background
            to prove no swap wrote them (0: only once, at start-up).
        health_check_period_s, health_check_timeout_s: Serve's health check of each model
            replica (Serve's defaults are 10 s and 30 s). A killed replica is noticed within
            about a second whatever these say (Ray reports the dead actor); they bound how long
            a hung replica, or one whose base weights changed, keeps receiving requests. The
            check itself is cheap (no hashing), so a short period costs nothing.
        auth_token: bearer token clients must send; ``auth_token_env`` names an environment
            variable that holds it instead (the env var wins when both are set).
    """

    model_config = pydantic.ConfigDict(extra="forbid")
    catalog: str
    base_model: str
    tokenizer: str
    tokenizer_kind: Literal["char", "hf"] = "char"
    base_aliases: list[str] = pydantic.Field(default_factory=list)
    fvae: str | None = None
    cache_size: int = pydantic.Field(8, ge=1, le=4096)
    negative_ttl_s: float = pydantic.Field(5.0, ge=0)
    read_cache_mib: int = pydantic.Field(256, ge=0)
    icm_cache_mib: int = pydantic.Field(256, ge=0)
    batching: Literal["mixed", "grouped"] = "mixed"
    max_batch_size: int = pydantic.Field(8, ge=1, le=256)
    batch_wait_timeout_s: float = pydantic.Field(0.005, ge=0, le=1)
    num_replicas: int = pydantic.Field(1, ge=1)
    num_cpus: float = pydantic.Field(1.0, gt=0, description="CPUs per model replica")
    torch_threads: int = pydantic.Field(1, ge=1)
    fingerprint_check_s: float = pydantic.Field(300.0, ge=0)
    health_check_period_s: float = pydantic.Field(2.0, gt=0, le=600)
    health_check_timeout_s: float = pydantic.Field(10.0, gt=0, le=600)
    limits: Limits = pydantic.Field(default_factory=Limits)
    auth_token: str | None = None
    auth_token_env: str | None = "ICMF_SERVE_TOKEN"

    def resolved_token(self) -> str | None:
        """The bearer token in force, or ``None`` when auth is off."""
        if self.auth_token_env and os.environ.get(self.auth_token_env):
            return os.environ[self.auth_token_env]
        return self.auth_token or None

    @classmethod
    def from_args(cls, args: dict[str, Any], check_paths: bool = True) -> ServeConfig:
        """Validate ``args``, listing every fault (fields, then missing local files) together.

        Raises:
            ServeConfigError: with one line per fault.
        """
        try:
            config = cls.model_validate(args or {})
        except pydantic.ValidationError as exc:
            raise ServeConfigError("invalid serve config", pydantic_faults(exc.errors())) from None
        faults = config.missing_paths() if check_paths else []
        if check_paths and not faults:
            faults = config.content_faults()
        if faults:
            raise ServeConfigError("invalid serve config", faults)
        return config

    def content_faults(self) -> list[str]:
        """Faults a replica would hit at start-up, found on the driver first (Serve would restart
        a failing replica again and again): the catalog opens, the base model's config and the
        tokenizer load, the F-VAE loads and reads a layout of the catalog."""
        faults = []
        catalog = None
        try:
            from engine.catalog.catalog import Catalog

            catalog = Catalog(self.catalog)
            catalog.version()
        except (IcmfError, OSError, ValueError) as exc:
            faults.append(f"catalog: {self.catalog} cannot be opened ({exc})")
            catalog = None
        try:
            from transformers import AutoConfig

            AutoConfig.from_pretrained(self.base_model)
        except (OSError, ValueError) as exc:
            faults.append(
                f"base_model: {self.base_model} is not a model directory ({type(exc).__name__}: {exc})"
            )
        try:
            from engine.tasks.tokenizers import load_tokenizer

            load_tokenizer(self.tokenizer, self.tokenizer_kind)
        except (OSError, ValueError, KeyError) as exc:
            faults.append(f"tokenizer: {self.tokenizer} cannot be loaded as {self.tokenizer_kind!r} ({exc})")
        if self.fvae:
            try:
                from engine.fvae.artifact import FVAEArtifact

                layout_id = FVAEArtifact.load(self.fvae).layout.layout_id
                if catalog is not None and layout_id not in set(catalog.manifest()["layout_id"].to_pylist()):
                    faults.append(
                        f"fvae: {self.fvae} reads layout {layout_id}, which no adapter of {self.catalog} has"
                    )
            except (IcmfError, OSError, ValueError, KeyError) as exc:
                faults.append(f"fvae: {self.fvae} cannot be loaded ({type(exc).__name__}: {exc})")
        return faults

    def missing_paths(self) -> list[str]:
        """Faults for local paths that do not exist (URIs such as ``s3://`` are not checked)."""
        faults = []
        for name in PATH_FIELDS:
            value = getattr(self, name)
            if value and "://" not in value and not Path(value).exists():
                faults.append(f"{name}: {value} does not exist")
        return faults


def load_serve_file(path: str | Path, check_paths: bool = True) -> tuple[dict[str, Any], ServeConfig]:
    """Read a Serve config YAML: ``(its http_options, the first application's validated args)``.

    Relative local paths in the args (``catalog``, ``base_model``, ``tokenizer``, ``fvae``) are
    relative to the YAML file's folder and come back absolute. (Ray's own ``serve run`` hands the
    args to :func:`serve.app.build_app` unresolved, so there they are relative to the directory
    it is started from.)

    Raises:
        ServeConfigError: unreadable file, no application, or invalid args (all faults listed).
    """
    path = Path(path)
    if not path.is_file():
        raise ServeConfigError(f"{path}: no such serve config file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ServeConfigError(f"{path}: not valid YAML: {exc}") from None
    apps = data.get("applications") if isinstance(data, dict) else None
    if not apps or not isinstance(apps, list):
        raise ServeConfigError(f"{path}: needs an 'applications' list (Serve config format)")
    args = dict(apps[0].get("args") or {})
    for name in PATH_FIELDS:
        if isinstance(args.get(name), str) and args[name]:
            args[name] = absolute_location(args[name], folder_of(path))
    return dict(data.get("http_options") or {}), ServeConfig.from_args(args, check_paths)
