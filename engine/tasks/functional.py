"""Run a task model with LoRA factors supplied per call: differentiable, no merge, no copies.

:class:`LoraHost` wraps the frozen base once with zero LoRA slots (PEFT) on every module of a
layout, at the layout's ``r_max`` and scaling 1 — the catalog's canonical form folds each
adapter's scaling into ``B`` and zero-pads its rank, so a canonical adapter is applied by
*substituting* its factors. The substitution goes through :func:`torch.func.functional_call`, so
gradients flow from a task loss back to whatever produced the factors (the F-VAE decoder, a latent
code, fusion weights). The base weights are never modified and the host is reused for every adapter.

A task head (``modules_to_save``, e.g. a classifier) is substituted the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from engine.adapters.codec import unflatten
from engine.adapters.layout import Layout
from engine.adapters.lora import LoraAdapter
from engine.tasks.base import BaseTaskModel, Batch, Example
from engine.tasks.errors import TaskError

# (A [r_max, d_in], B [d_out, r_max]) per layout module, in layout order.
Factors = Sequence[tuple[torch.Tensor, torch.Tensor]]


class _Call(nn.Module):
    """Holds the model so ``functional_call`` can reparametrise it around an arbitrary function."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[[nn.Module], Any]) -> Any:
        return fn(self.model)


class LoraHost:
    """A frozen base model with LoRA slots on every module of ``layout``, factors supplied per call.

    Args:
        task_model: the task model (builds the base; loss, metrics, hidden states).
        layout: the layout whose modules get LoRA slots (rank ``r_max``, scaling 1).
        base: an already built plain base (default: ``task_model.build_base()``). It is wrapped
            in place by PEFT; do not use it elsewhere afterwards.

    Example::

        host = LoraHost(task_model, layout)
        loss = host.loss(flat, examples)              # flat [N] canonical adapter, differentiable
        metrics = host.metrics(flat, examples)        # no grad
    """

    def __init__(self, task_model: BaseTaskModel, layout: Layout, base: nn.Module | None = None):
        from peft import LoraConfig, get_peft_model

        self.task_model = task_model
        self.layout = layout
        base = base if base is not None else task_model.build_base()
        names = [m.name for m in layout.modules]
        missing = [n for n in names if not isinstance(_submodule(base, n), nn.Linear)]
        if missing:
            raise TaskError(
                f"layout {layout.layout_id} names modules the base model has no nn.Linear for: {missing[:5]}; "
                "was the catalog built for another base model?"
            )
        # No task_type: PEFT would otherwise add the classifier to modules_to_save; heads are
        # substituted per call instead.
        config = LoraConfig(
            r=layout.r_max, lora_alpha=layout.r_max, lora_dropout=0.0, target_modules=names, bias="none"
        )
        self.model = get_peft_model(base, config)
        self.model.requires_grad_(False)
        self.model.eval()
        self._call = _Call(self.model)
        self._slot_names = [
            (
                f"model.base_model.model.{name}.lora_A.default.weight",
                f"model.base_model.model.{name}.lora_B.default.weight",
            )
            for name in names
        ]
        params = dict(self._call.named_parameters())
        absent = [a for a, b in self._slot_names if a not in params or b not in params]
        if absent:
            raise TaskError(f"PEFT did not create the expected LoRA slots: {absent[:3]}")
        self._param_names = set(params)

    # ------------------------------------------------------------------ substitution
    def parameters_for(
        self, factors: Factors | torch.Tensor | None, head: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """The substitution dict for ``functional_call``.

        Args:
            factors: per-module ``(A, B)`` in layout order, a flat ``[N]`` canonical vector, or
                None for the bare base (zero factors).
            head: ``modules_to_save`` tensors keyed as in a PEFT adapter file
                (``classifier.weight``; any ``base_model.model.`` prefix or ``.modules_to_save``
                part is understood).
        """
        if factors is None:
            params = {}
            for (a, b), spec in zip(self._slot_names, self.layout.modules, strict=True):
                params[a] = torch.zeros(self.layout.r_max, spec.d_in)
                params[b] = torch.zeros(spec.d_out, self.layout.r_max)
        else:
            if isinstance(factors, torch.Tensor):
                factors = unflatten(factors, self.layout)
            if len(factors) != len(self._slot_names):
                raise ValueError(
                    f"got {len(factors)} factor pairs for {len(self._slot_names)} layout modules"
                )
            params = {}
            for (a, b), (A, B) in zip(self._slot_names, factors, strict=True):
                params[a], params[b] = A, B
        for key, value in (head or {}).items():
            params[self._head_name(key)] = value
        return params

    def _head_name(self, key: str) -> str:
        key = key.removeprefix("base_model.model.").replace(".modules_to_save.default", "")
        key = key.replace(".modules_to_save", "")
        name = f"model.base_model.model.{key}"
        if name not in self._param_names:
            raise TaskError(f"head tensor {key!r} has no matching parameter in the base model")
        return name

    def run(
        self,
        fn: Callable[[nn.Module], Any],
        factors: Factors | torch.Tensor | None,
        head: Mapping[str, torch.Tensor] | None = None,
    ) -> Any:
        """``fn(model)`` with the LoRA factors (and head) substituted; differentiable."""
        params = self.parameters_for(factors, head)
        return torch.func.functional_call(self._call, params, (fn,), strict=False)

    # ------------------------------------------------------------------ task-model shortcuts
    def loss(
        self,
        factors: Factors | torch.Tensor | None,
        examples: Sequence[Example] | Batch,
        head: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Differentiable mean loss on one batch of examples (or an encoded batch)."""
        return self.run(lambda model: self.task_model.loss(model, examples), factors, head)

    @torch.no_grad()
    def metrics(
        self,
        factors: Factors | torch.Tensor | None,
        examples: Sequence[Example],
        head: Mapping[str, torch.Tensor] | None = None,
        batch_size: int = 64,
    ) -> dict[str, float]:
        """The task model's metrics (``loss`` + accuracy / exact match / perplexity), no grad."""
        return self.run(lambda model: self.task_model.metrics(model, examples, batch_size), factors, head)

    @torch.no_grad()
    def example_sums(
        self,
        factors: Factors | torch.Tensor | None,
        examples: Sequence[Example],
        head: Mapping[str, torch.Tensor] | None = None,
        batch_size: int = 64,
    ) -> dict[str, torch.Tensor]:
        """Each example's share of the sums behind :meth:`metrics` (``TaskModel.example_sums``)."""
        return self.run(
            lambda model: self.task_model.example_sums(model, examples, batch_size), factors, head
        )

    @torch.no_grad()
    def hidden_states(
        self,
        factors: Factors | torch.Tensor | None,
        examples: Sequence[Example],
        head: Mapping[str, torch.Tensor] | None = None,
        batch_size: int = 64,
    ) -> torch.Tensor:
        """``[n, d]`` last-layer hidden states with the adapter applied."""
        return self.run(
            lambda model: self.task_model.hidden_states(model, examples, batch_size), factors, head
        )


def adapter_factors(adapter: LoraAdapter, layout: Layout) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A LoRA adapter of any ranks as per-module ``(A [r, d_in], s·B [d_out, r])`` in layout order.

    Ranks may exceed the layout's ``r_max`` (e.g. a ``cat`` fusion): the host's slots take factors
    of any rank. A module the adapter does not target gets zero rank-1 factors.

    Raises:
        TaskError: if the adapter targets modules outside the layout or with other shapes.
    """
    faults = [f for f in layout.check_fits(adapter) if "exceeds the layout's r_max" not in f]
    if faults:
        raise TaskError("adapter does not fit the layout: " + "; ".join(faults[:5]))
    factors = []
    for spec in layout.modules:
        module = adapter.modules.get(spec.name)
        if module is None:
            factors.append((torch.zeros(1, spec.d_in), torch.zeros(spec.d_out, 1)))
        else:
            factors.append((module.A.float(), module.B.float() * float(module.scaling)))
    return factors


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None
