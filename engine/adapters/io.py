"""Read and write PEFT LoRA adapter directories (``adapter_config.json`` +
``adapter_model.safetensors``), validating everything on the way in.

Only safetensors are ever read: ``adapter_model.bin`` is a pickle, and unpickling an untrusted
file can run arbitrary code.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.adapters.lora import (
    PEFT_KEY_PREFIX,
    LoraAdapter,
    LoraModule,
    lora_scaling,
    module_rank_and_alpha,
)
from engine.errors import AdapterError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
# How a fused adapter was made (method, inputs, weights), written next to its PEFT files.
PROVENANCE_FILE = "icmf_provenance.json"

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
# LoRA variants this engine does not fuse; named so the error can say which one it met.
_UNSUPPORTED_KEYS = {
    "lora_embedding_A": "LoRA on embedding layers",
    "lora_embedding_B": "LoRA on embedding layers",
    "lora_magnitude_vector": "DoRA (use_dora=True)",
    "lora_B.bias": "LoRA with a bias (lora_bias=True)",
}


def load_adapter(path: str | os.PathLike) -> LoraAdapter:
    """Read and validate a PEFT LoRA adapter directory.

    Args:
        path: directory holding ``adapter_config.json`` and ``adapter_model.safetensors``.

    Returns:
        The adapter with float32 weights, per-module scaling resolved from ``r``/``lora_alpha``,
        ``rank_pattern``/``alpha_pattern`` and ``use_rslora``.

    Raises:
        AdapterError: naming the directory and every fault found in it.
    """
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(str(path), "not a directory (expected a PEFT adapter directory)")
    config = read_adapter_config(path)
    tensors = _read_safetensors(path)
    return _build_adapter(path, config, tensors)


def read_adapter_config(path: Path) -> dict[str, Any]:
    """Parse and check ``adapter_config.json``; raise :class:`AdapterError` listing all faults."""
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise AdapterError(str(path), f"missing {CONFIG_NAME} (is this a PEFT adapter directory?)")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(str(config_path), f"invalid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterError(str(config_path), "must hold a JSON object")
    faults = config_faults(config)
    if faults:
        raise AdapterError(str(config_path), "; ".join(faults))
    return config


def config_faults(config: dict[str, Any]) -> list[str]:
    """Every reason ``config`` is not a LoRA config this engine can read (empty when fine)."""
    faults = []
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        faults.append(f"peft_type is {peft_type!r}, expected 'LORA'")
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        faults.append(f"r must be a positive integer, got {r!r}")
    alpha = config.get("lora_alpha")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        faults.append(f"lora_alpha must be a positive number, got {alpha!r}")
    if config.get("use_dora"):
        faults.append("use_dora=True (DoRA) is not supported; only plain LoRA is fused")
    for name in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(name) or {}
        if not isinstance(pattern, dict):
            faults.append(f"{name} must be an object mapping module patterns to numbers")
            continue
        for key, value in pattern.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                faults.append(f"{name}[{key!r}] must be a positive number, got {value!r}")
            try:
                re.compile(key)
            except re.error as exc:
                faults.append(f"{name} key {key!r} is not a valid pattern: {exc}")
    return faults


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    weights_path = path / WEIGHTS_NAME
    if not weights_path.is_file():
        if (path / PICKLE_WEIGHTS_NAME).is_file():
            raise AdapterError(
                str(path),
                f"only {PICKLE_WEIGHTS_NAME} found: it is a pickle, and unpickling an untrusted file "
                "can run arbitrary code, so it is never loaded. Convert it with code you trust, e.g. "
                "PeftModel.from_pretrained(...).save_pretrained(dir, safe_serialization=True).",
            )
        raise AdapterError(str(path), f"missing {WEIGHTS_NAME}")
    try:
        with safe_open(str(weights_path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises several types for damaged files
        raise AdapterError(str(weights_path), f"corrupt or truncated safetensors file ({exc})") from None


def _is_module_to_save(key: str, modules_to_save: list[str]) -> bool:
    # PEFT saves a modules_to_save copy under the wrapped module's own name; any dotted prefix of
    # the parameter name that equals or ends with a listed name belongs to it.
    parts = key.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts))]
    return any(p == name or p.endswith("." + name) for p in prefixes for name in modules_to_save)


def _build_adapter(path: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> LoraAdapter:
    faults: list[str] = []
    halves: dict[str, dict[str, torch.Tensor]] = {}
    extras: dict[str, torch.Tensor] = {}
    modules_to_save = list(config.get("modules_to_save") or [])
    for full_key, tensor in tensors.items():
        key = full_key.removeprefix(PEFT_KEY_PREFIX)
        unsupported = next((why for marker, why in _UNSUPPORTED_KEYS.items() if marker in key), None)
        match = _LORA_KEY.match(key)
        if unsupported:
            faults.append(f"{full_key}: {unsupported} is not supported")
        elif match:
            halves.setdefault(match["module"], {})[match["which"]] = tensor
        elif _is_module_to_save(key, modules_to_save):
            extras[key] = tensor.detach().clone()
        else:
            faults.append(
                f"{full_key} is not a LoRA key (expected '<module>.lora_A.weight' / "
                "'<module>.lora_B.weight', or a parameter of modules_to_save)"
            )
    modules = {}
    for name in sorted(halves):
        module, module_faults = _build_module(name, halves[name], config)
        faults.extend(module_faults)
        if module is not None:
            modules[name] = module
    for key, tensor in extras.items():
        if not torch.is_floating_point(tensor) or not torch.isfinite(tensor).all():
            faults.append(f"{key}: modules_to_save tensor has non-finite or non-float values")
    if not halves and not faults:
        faults.append("no LoRA weights found (no '*.lora_A.weight' keys)")
    if faults:
        raise AdapterError(str(path), "; ".join(faults))
    return LoraAdapter(modules=modules, config=config, extras=extras, source=str(path))


def _build_module(
    name: str, halves: dict[str, torch.Tensor], config: dict[str, Any]
) -> tuple[LoraModule | None, list[str]]:
    missing = [f"lora_{w}" for w in "AB" if w not in halves]
    if missing:
        return None, [f"{name}: has no {' or '.join(missing)} weight"]
    A, B = halves["A"], halves["B"]
    if A.ndim != 2 or B.ndim != 2:
        return None, [
            f"{name}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} must both be 2-D "
            "(convolution LoRA is not supported)"
        ]
    faults = []
    if A.shape[0] != B.shape[1]:
        faults.append(
            f"{name}: shape mismatch, lora_A is {tuple(A.shape)} (rank {A.shape[0]}) but lora_B is "
            f"{tuple(B.shape)} (rank {B.shape[1]})"
        )
    rank, alpha = module_rank_and_alpha(config, name)
    if A.shape[0] != rank:
        faults.append(f"{name}: config gives rank {rank} (r / rank_pattern) but lora_A has {A.shape[0]} rows")
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        faults.append(f"{name}: non-finite values (NaN or Inf) in lora_A/lora_B")
    if faults:
        return None, faults
    scaling = lora_scaling(alpha, rank, bool(config.get("use_rslora", False)))
    return LoraModule(A=A.float(), B=B.float(), scaling=scaling), []


def save_adapter(
    adapter: LoraAdapter,
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write ``adapter`` as a stock PEFT adapter directory, atomically.

    Scaling is folded into ``B`` so the written config has ``lora_alpha == r`` per module
    (through ``rank_pattern``/``alpha_pattern`` where ranks differ) and ``use_rslora: false``;
    ``PeftModel.from_pretrained`` loads the result unchanged.

    The directory appears whole or not at all: it is written next to ``out_dir`` and renamed in,
    together with ``extra_files`` (name -> bytes, e.g. a provenance sidecar).

    Raises:
        AdapterError: if ``out_dir`` exists (and ``overwrite`` is false) or a value is non-finite.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise AdapterError(str(out_dir), "already exists; choose a new directory or pass overwrite")
    tensors, config = peft_state(adapter)
    for key, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise AdapterError(str(out_dir), f"refusing to write non-finite values in {key}")
    with staged_dir(out_dir) as staging:
        save_file(tensors, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name, data in (extra_files or {}).items():
            if Path(name).name != name or name in (CONFIG_NAME, WEIGHTS_NAME):
                raise AdapterError(str(out_dir), f"invalid extra file name {name!r}")
            (staging / name).write_bytes(data)
    return out_dir


@contextlib.contextmanager
def staged_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """A fresh directory next to ``out_dir`` to write an adapter into; on success it replaces
    ``out_dir`` whole (readers see the old directory or the new one, never a mix), on an error it
    is removed and ``out_dir`` is left as it was.

    Example::

        with staged_dir(out) as tmp:
            peft_model.save_pretrained(tmp)
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield staging
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def peft_state(adapter: LoraAdapter) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The safetensors state dict and ``adapter_config.json`` PEFT expects for ``adapter``.

    Scaling is folded into ``B``; each module keeps its own rank, expressed through
    ``rank_pattern``/``alpha_pattern`` (alpha = rank so PEFT's scaling is exactly 1).
    """
    tensors: dict[str, torch.Tensor] = {}
    for name, module in adapter.modules.items():
        tensors[f"{PEFT_KEY_PREFIX}{name}.lora_A.weight"] = module.A.float().contiguous()
        tensors[f"{PEFT_KEY_PREFIX}{name}.lora_B.weight"] = (module.B.float() * module.scaling).contiguous()
    for key, tensor in adapter.extras.items():
        tensors[f"{PEFT_KEY_PREFIX}{key}"] = tensor.contiguous()
    ranks = {name: m.rank for name, m in adapter.modules.items()}
    default_rank = max(set(ranks.values()), key=list(ranks.values()).count)
    # Full module names, anchored: PEFT matches '(.*\.)?<key>$', so a plain name could also match
    # a longer one ending in it (e.g. 'layers.1.q' vs 'layers.11.q').
    pattern = {f"^{re.escape(n)}": r for n, r in ranks.items() if r != default_rank}
    config = dict(adapter.config)
    config.update(
        peft_type="LORA",
        r=default_rank,
        lora_alpha=default_rank,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        use_rslora=False,
        use_dora=False,
        target_modules=sorted(adapter.modules),
        modules_to_save=config.get("modules_to_save") if adapter.extras else None,
    )
    return tensors, config


def _replace_dir(staging: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        os.replace(staging, out_dir)
        return
    # os.replace cannot swap a non-empty directory: move the old one aside first so that at every
    # instant either the old or the new directory is whole at out_dir's path.
    backup = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
    os.replace(out_dir, backup / "old")
    os.replace(staging, out_dir)
    shutil.rmtree(backup, ignore_errors=True)
