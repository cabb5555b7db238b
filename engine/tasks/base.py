"""The ``TaskModel`` protocol (the model a LoRA adapts), its registry, and the shared batching.

A task model builds the frozen base model, turns examples (dicts keyed by the kind's roles, see
:data:`engine.tasks.spec.ROLES`) into tensors, and measures any model built on that base — the
base itself or a ``PeftModel`` with an adapter applied — on them: a differentiable loss, metrics
over many batches, and one last-layer hidden state per example (the input of task vectors).

Adding a kind is one file: subclass :class:`BaseTaskModel` and decorate it with
``@register_task_model("kind")``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from engine.tasks.spec import ModelSpec, load_model_spec

Example = Mapping[str, Any]
Batch = dict[str, torch.Tensor]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@runtime_checkable
class TaskModel(Protocol):
    """The model a LoRA adapts, and how to measure a model built on it.

    ``model`` arguments are the base from :meth:`build_base` or a ``PeftModel`` wrapping it.
    """

    spec: ModelSpec

    def build_base(self) -> nn.Module:
        """A fresh base model: deterministic (seeded), frozen (no parameter requires grad), eval mode."""
        ...

    def encode(self, examples: Sequence[Example]) -> Batch:
        """Examples -> a batch of tensors (padded; see each kind for the keys)."""
        ...

    def loss(self, model: nn.Module, examples: Sequence[Example] | Batch) -> torch.Tensor:
        """Differentiable scalar loss of ``model`` on one batch (gradients flow to trainable params)."""
        ...

    def metrics(
        self, model: nn.Module, examples: Sequence[Example], batch_size: int = 32
    ) -> dict[str, float]:
        """Metrics over all ``examples`` (no grad): ``loss`` plus ``accuracy`` or ``exact_match``/``perplexity``."""
        ...

    def example_sums(
        self, model: nn.Module, examples: Sequence[Example], batch_size: int = 32
    ) -> dict[str, torch.Tensor]:
        """Each example's share of the sums behind :meth:`metrics`: ``[n]`` float64 per key (no grad).

        ``finalize`` of their totals over any multiset of examples gives that multiset's metrics,
        which is what a bootstrap over examples resamples.
        """
        ...

    def finalize(self, sums: Mapping[str, float]) -> dict[str, float]:
        """Metrics from sums of :meth:`example_sums` (totals over the examples measured)."""
        ...

    def hidden_states(
        self, model: nn.Module, examples: Sequence[Example], batch_size: int = 32
    ) -> torch.Tensor:
        """Last-layer hidden state per example, ``[n, d]`` float32 on the CPU (no grad)."""
        ...


_REGISTRY: dict[str, type[BaseTaskModel]] = {}


def register_task_model(kind: str) -> Callable[[type[BaseTaskModel]], type[BaseTaskModel]]:
    """Class decorator: make ``cls`` the task model of ``kind``."""

    def decorate(cls: type[BaseTaskModel]) -> type[BaseTaskModel]:
        _REGISTRY[kind] = cls
        cls.kind = kind
        return cls

    return decorate


def task_model(spec: ModelSpec | Mapping[str, Any] | str) -> BaseTaskModel:
    """The task model for a spec (a :class:`ModelSpec`, a dict, or a JSON/YAML file path).

    Raises:
        SpecError: if the spec is invalid (every fault listed).
    """
    import engine.tasks.models  # noqa: F401  (registers the built-in kinds)

    spec = load_model_spec(spec)
    return _REGISTRY[spec.kind](spec)


class BaseTaskModel:
    """Shared parts of the task models: seeded building, batching, device handling."""

    kind: str = ""

    def __init__(self, spec: ModelSpec):
        self.spec = spec

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec.model_dump(exclude_defaults=True)})"

    # ------------------------------------------------------------------ to implement per kind
    def _build(self) -> nn.Module:
        raise NotImplementedError

    def encode(self, examples: Sequence[Example]) -> Batch:
        raise NotImplementedError

    def _loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def _example_sums(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _finalize(self, sums: Mapping[str, float]) -> dict[str, float]:
        raise NotImplementedError

    def _hidden(self, model: nn.Module, examples: Sequence[Example]) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ shared
    def build_base(self) -> nn.Module:
        """A fresh base model: seeded with ``spec.seed`` (the global RNG is left untouched),
        every parameter frozen, eval mode, ``spec.dtype``."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.spec.seed)
            model = self._build()
        model = model.to(DTYPES[self.spec.dtype])
        model.requires_grad_(False)
        return model.eval()

    def loss(self, model: nn.Module, examples: Sequence[Example] | Batch) -> torch.Tensor:
        batch = examples if isinstance(examples, dict) else self.encode(examples)
        return self._loss(model, to_device(batch, model_device(model)))

    @torch.no_grad()
    def metrics(
        self, model: nn.Module, examples: Sequence[Example], batch_size: int = 32
    ) -> dict[str, float]:
        sums = self.example_sums(model, examples, batch_size)
        return self.finalize({key: float(values.sum()) for key, values in sums.items()})

    @torch.no_grad()
    def example_sums(
        self, model: nn.Module, examples: Sequence[Example], batch_size: int = 32
    ) -> dict[str, torch.Tensor]:
        parts: dict[str, list[torch.Tensor]] = {}
        for chunk in batches(examples, batch_size):
            batch = to_device(self.encode(chunk), model_device(model))
            for key, values in self._example_sums(model, batch).items():
                parts.setdefault(key, []).append(values.cpu())
        if not parts:
            raise ValueError("metrics need at least one example")
        return {key: torch.cat(values) for key, values in parts.items()}

    def finalize(self, sums: Mapping[str, float]) -> dict[str, float]:
        return self._finalize(sums)

    @torch.no_grad()
    def hidden_states(
        self, model: nn.Module, examples: Sequence[Example], batch_size: int = 32
    ) -> torch.Tensor:
        parts = [self._hidden(model, chunk).float().cpu() for chunk in batches(examples, batch_size)]
        if not parts:
            raise ValueError("hidden_states need at least one example")
        return torch.cat(parts)


def batches(examples: Sequence[Example], size: int) -> Iterator[list[Example]]:
    """Consecutive chunks of at most ``size`` examples (any sequence, e.g. a list of dicts)."""
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    for start in range(0, len(examples), size):
        yield [examples[i] for i in range(start, min(start + size, len(examples)))]


def model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


def pad_right(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """Right-pad integer rows into ``[n, max_len]`` long."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
    return out
