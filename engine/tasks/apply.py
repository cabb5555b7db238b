"""Apply LoRA adapters to a base model, unmerged: a PEFT adapter directory or a catalog adapter id.

The base's own weights are never changed (no merge), so one base serves many adapters in turn:
:func:`adapted` applies one and restores the plain base on exit.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from engine.adapters.io import CONFIG_NAME, PICKLE_WEIGHTS_NAME, WEIGHTS_NAME, read_adapter_config
from engine.errors import AdapterError
from engine.tasks.errors import TaskError

if TYPE_CHECKING:
    from peft import PeftModel

    from engine.catalog import Catalog


def check_adapter_dir(path: str | Path) -> Path:
    """Check ``path`` is a PEFT LoRA adapter directory with safetensors weights.

    Raises:
        AdapterError: naming the directory and what is missing (a pickle-only ``.bin`` is refused).
    """
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(
            str(path), f"not a directory (expected a PEFT adapter directory with {CONFIG_NAME})"
        )
    read_adapter_config(path)
    if not (path / WEIGHTS_NAME).is_file():
        reason = f"missing {WEIGHTS_NAME}"
        if (path / PICKLE_WEIGHTS_NAME).is_file():
            reason += (
                f" (only {PICKLE_WEIGHTS_NAME} found: a pickle, never loaded; convert it to safetensors)"
            )
        raise AdapterError(str(path), reason)
    return path


def apply_adapter(model: nn.Module, adapter_dir: str | Path, name: str = "default") -> PeftModel:
    """Load a PEFT adapter onto ``model`` unmerged and make it the active adapter.

    Args:
        model: a plain base model (it is wrapped with ``PeftModel.from_pretrained``, which injects
            LoRA layers in place) or a ``PeftModel`` (the adapter is added under ``name``).
        adapter_dir: PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).
        name: adapter name inside PEFT.

    Returns:
        The ``PeftModel``, in eval mode with no trainable parameters.

    Raises:
        AdapterError: if the directory is not a safetensors LoRA adapter.
        TaskError: if the adapter does not fit the base (other modules or shapes, missing keys).
    """
    from peft import PeftModel

    path = check_adapter_dir(adapter_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if isinstance(model, PeftModel):
                model.load_adapter(str(path), adapter_name=name, is_trainable=False)
                model.set_adapter(name)
            else:
                model = PeftModel.from_pretrained(model, str(path), adapter_name=name, is_trainable=False)
        except (ValueError, RuntimeError, KeyError) as exc:
            raise TaskError(
                f"adapter {path}: cannot be applied to this base model ({exc}); was it trained on it?"
            ) from None
    missing = [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
    if missing:
        if name in model.peft_config and len(model.peft_config) == 1:
            model.unload()  # leave the caller's base as it was
        raise TaskError(f"adapter {path}: does not fit this base model: {missing[0]}")
    model.requires_grad_(False)
    return model.eval()


def apply_catalog_adapter(
    model: nn.Module, catalog: Catalog | str, adapter_id: str, name: str = "default"
) -> PeftModel:
    """Like :func:`apply_adapter` for a catalog adapter (exported to a temporary PEFT directory).

    The exported adapter has scaling folded into ``B`` (``s·B·A`` per module is unchanged).
    """
    from engine.catalog import Catalog

    catalog = catalog if isinstance(catalog, Catalog) else Catalog(catalog)
    with tempfile.TemporaryDirectory(prefix="icmf-adapter-") as tmp:
        path = catalog.export(adapter_id, Path(tmp) / adapter_id)
        return apply_adapter(model, path, name=name)


@contextmanager
def adapted(
    base: nn.Module,
    adapter_dir: str | Path | None = None,
    *,
    catalog: Catalog | str | None = None,
    adapter_id: str | None = None,
) -> Iterator[nn.Module]:
    """Apply an adapter (a directory, or ``adapter_id`` of ``catalog``) to ``base`` for a block.

    Yields the ``PeftModel``; on exit every LoRA layer is removed again (``unload``, no merge), so
    ``base`` is the plain base model once more. With neither adapter given, yields ``base``.

    Raises:
        TaskError: if ``base`` already carries adapters (pass the plain base model).
    """
    if hasattr(base, "peft_config"):
        raise TaskError("the base model already has adapters applied; pass the plain base model")
    if adapter_dir is not None and adapter_id is not None:
        raise ValueError("give adapter_dir or adapter_id, not both")
    if adapter_dir is None and adapter_id is None:
        yield base
        return
    if adapter_dir is not None:
        model = apply_adapter(base, adapter_dir)
    else:
        if catalog is None:
            raise ValueError(f"adapter_id {adapter_id!r} needs a catalog")
        model = apply_catalog_adapter(base, catalog, adapter_id)
    try:
        yield model
    finally:
        model.unload()
