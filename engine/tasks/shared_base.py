"""Which tasks fuse together: those whose **adapted** modules are the same.

A LoRA changes only the modules it targets, so adapters of several tasks can be fused (and an
F-VAE meta-trained on them) when those modules are the same in every task's model: same names and
shapes, same base weights. The rest of a task's model may differ — typically its own head, chosen
by a factory argument (``factory_kwargs: {task: sst2}``) or ``num_labels`` — and each task is then
scored with its own model spec. Specs are compared by a fingerprint of the adapted modules' base
weights (:func:`adapted_fingerprint`), not as a whole.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from engine.tasks.errors import TaskError
from engine.tasks.spec import ModelSpec

_FINGERPRINTS: dict[tuple[str, tuple[str, ...]], str] = {}
_CACHE_SIZE = 64  # specs whose fingerprint a process remembers (each is one base model build)


def spec_key(spec: ModelSpec) -> str:
    """The canonical JSON of a model spec (tasks with equal keys share one built model)."""
    return spec.model_dump_json()


def adapted_fingerprint(base: nn.Module, modules: Sequence[str]) -> str:
    """``sha256:<16 hex>`` of the named modules of a *plain* base model (before any LoRA is
    applied): each module's name, its weight's and bias's shape, dtype and values.

    Raises:
        TaskError: a module the base model does not have, or that is not an ``nn.Linear``.
    """
    digest = hashlib.sha256()
    missing = []
    for name in sorted(modules):
        try:
            module = base.get_submodule(name)
        except AttributeError:
            module = None
        if not isinstance(module, nn.Linear):
            missing.append(name)
            continue
        digest.update(name.encode() + b"\0")
        for tensor in (module.weight, module.bias):
            if tensor is None:
                digest.update(b"none\0")
                continue
            data = tensor.detach().to("cpu").contiguous()
            digest.update(f"{tuple(data.shape)}{data.dtype}\0".encode())
            digest.update(data.view(torch.uint8).numpy().tobytes())
    if missing:
        raise TaskError(
            f"the base model has no nn.Linear module(s) {missing[:5]} that the adapters target; "
            "were the adapters trained on another base model?"
        )
    return "sha256:" + digest.hexdigest()[:16]


def spec_fingerprint(spec: ModelSpec, modules: Sequence[str]) -> str:
    """:func:`adapted_fingerprint` of the spec's freshly built base (remembered per process)."""
    from engine.tasks.base import task_model

    key = (spec_key(spec), tuple(sorted(modules)))
    if key not in _FINGERPRINTS:
        if len(_FINGERPRINTS) >= _CACHE_SIZE:
            _FINGERPRINTS.pop(next(iter(_FINGERPRINTS)))
        _FINGERPRINTS[key] = adapted_fingerprint(task_model(spec).build_base(), modules)
    return _FINGERPRINTS[key]


def group_by_spec(specs: Mapping[str, ModelSpec]) -> dict[str, list[str]]:
    """Tasks grouped by identical model spec (``spec_key -> tasks``), in first-seen order."""
    groups: dict[str, list[str]] = {}
    for task, spec in specs.items():
        groups.setdefault(spec_key(spec), []).append(task)
    return groups


def shared_base_fault(groups: Sequence[list[str]], fingerprints: Sequence[str]) -> str | None:
    """The fault when groups of tasks (one model spec each) do not adapt the same base weights."""
    by_print: dict[str, list[str]] = {}
    for tasks, fingerprint in zip(groups, fingerprints, strict=True):
        by_print.setdefault(fingerprint, []).extend(tasks)
    if len(by_print) <= 1:
        return None
    shown = "; ".join(f"{sorted(tasks)}" for tasks in by_print.values())
    return (
        f"tasks use {len(by_print)} different base models in the modules their adapters adapt "
        f"({shown}); fuse tasks whose adapted modules (the LoRA target modules) have the same base "
        "weights: their model specs may differ elsewhere (e.g. one head per task)"
    )


def check_shared_base(specs: Mapping[str, ModelSpec], modules: Sequence[str]) -> None:
    """Refuse tasks (``{task: spec}``) whose models differ in the adapted ``modules``. Tasks with
    one identical spec pass without building anything.

    Raises:
        TaskError: naming the groups of tasks that differ (or a base model lacking a module).
    """
    groups = group_by_spec(specs)
    if len(groups) <= 1:
        return
    prints = [spec_fingerprint(specs[tasks[0]], modules) for tasks in groups.values()]
    fault = shared_base_fault(list(groups.values()), prints)
    if fault is not None:
        raise TaskError(fault)
