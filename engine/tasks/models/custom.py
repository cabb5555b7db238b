"""A custom ``torch.nn.Module`` classifier given by an import path ``package.module:factory``."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

import torch
from torch import nn

from engine.tasks.base import BaseTaskModel, Batch, Example, model_device, register_task_model
from engine.tasks.errors import TaskError
from engine.tasks.metrics import classification_example_sums, classification_nll, finalize_classification
from engine.tasks.models.classification import label_tensor

# Submodules PEFT inserts; a hidden module is named as in the plain base model.
_PEFT_PARTS = {"lora_A", "lora_B", "lora_dropout", "modules_to_save", "lora_embedding_A", "lora_embedding_B"}
_PEFT_WRAPPED = {"base_layer", "original_module"}


def load_factory(path: str) -> Callable[..., nn.Module]:
    """Resolve ``package.module:attr`` (``attr`` may be dotted) to a callable."""
    module_name, _, attr = path.partition(":")
    try:
        target = importlib.import_module(module_name)
    except ImportError as exc:
        raise TaskError(
            f"factory {path!r}: cannot import module {module_name!r} ({exc}); is it installed?"
        ) from None
    for part in attr.split("."):
        if not hasattr(target, part):
            raise TaskError(f"factory {path!r}: module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise TaskError(f"factory {path!r}: {attr!r} is not callable")
    return target


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under a ``PeftModel`` (with LoRA layers injected), or ``model`` itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def last_linear_name(model: nn.Module) -> str:
    """Name of the last ``nn.Linear`` in module order, as named in the plain base model.

    Works on the base and on a PEFT-wrapped model: LoRA's own linears are skipped and a wrapped
    layer (``x.base_layer``, ``x.original_module``) is reported as ``x``.
    """
    names = []
    for name, module in unwrap(model).named_modules():
        parts = name.split(".")
        if not isinstance(module, nn.Linear) or _PEFT_PARTS.intersection(parts):
            continue
        names.append(".".join(p for p in parts if p not in _PEFT_WRAPPED))
    if not names:
        raise TaskError("custom model has no nn.Linear layer; set hidden_module in the model spec")
    return names[-1]


@register_task_model("custom")
class CustomModuleTask(BaseTaskModel):
    """A classifier ``nn.Module`` from ``spec.factory(**spec.factory_kwargs)``.

    Examples ``{"input": list[float], "label": int}``; the model maps ``x [n, d_in]`` to logits
    ``[n, C]``. Metrics: ``loss`` (mean cross-entropy), ``accuracy``. Hidden state: the input of
    ``spec.hidden_module`` (default: the last ``nn.Linear``, i.e. the features the head reads),
    flattened to ``[n, d]``.
    """

    def _build(self) -> nn.Module:
        model = load_factory(self.spec.factory)(**self.spec.factory_kwargs)
        if not isinstance(model, nn.Module):
            raise TaskError(
                f"factory {self.spec.factory!r} returned {type(model).__name__}, not an nn.Module"
            )
        return model

    def _inputs(self, examples: Sequence[Example]) -> torch.Tensor:
        rows = [e["input"] for e in examples]
        widths = {len(r) for r in rows}
        if len(widths) > 1:
            raise TaskError(
                f"inputs have different lengths {sorted(widths)}; every input needs the same size"
            )
        return torch.tensor(rows, dtype=torch.float32)

    def encode(self, examples: Sequence[Example]) -> Batch:
        """Returns ``input`` ``[n, d_in]`` float32 and ``labels`` ``[n]`` long."""
        return {"input": self._inputs(examples), "labels": label_tensor(examples, self.spec.num_labels)}

    def _logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        param = next(model.parameters(), None)
        return model(x.to(param.dtype) if param is not None else x)

    def _loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return classification_nll(self._logits(model, batch["input"]), batch["labels"]).mean()

    def _example_sums(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        return classification_example_sums(self._logits(model, batch["input"]), batch["labels"])

    def _finalize(self, sums):
        return finalize_classification(sums)

    def _hidden(self, model: nn.Module, examples: Sequence[Example]) -> torch.Tensor:
        name = self.spec.hidden_module or last_linear_name(model)
        try:
            module = unwrap(model).get_submodule(name)
        except AttributeError:
            raise TaskError(f"hidden_module {name!r}: the model has no such submodule") from None
        captured: list[torch.Tensor] = []
        handle = module.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        try:
            x = self._inputs(examples).to(model_device(model))
            self._logits(model, x)
        finally:
            handle.remove()
        if not captured:
            raise TaskError(f"hidden_module {name!r} was not called in the forward pass")
        return captured[0].reshape(len(examples), -1)
