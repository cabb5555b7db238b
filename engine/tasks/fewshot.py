"""The few-shot objective: the mean loss of one adapter over the support examples of several tasks.

It scores a *fused* adapter the way fusion is judged (docs/design.md §4) but on the few-shot support
split, never the held-out one. It is differentiable in the adapter (through
:class:`~engine.tasks.functional.LoraHost`), so it serves three consumers:

- meta-training's data fusion loss (gradients to the F-VAE decoder, first-order),
- ``icm``'s latent refinement (gradients to the fused latent code and weights),
- ``lorahub``'s gradient-free weight search (:meth:`FewShotObjective.adapter_loss`, no grad).

A task whose adapters carry a head (``modules_to_save``, e.g. a classifier) is scored with its
own head, as a multi-head multi-task model would be. Tasks may have different model specs (e.g.
a custom model whose factory builds one head per task) when the modules their adapters adapt are
the same (:mod:`engine.tasks.shared_base`): each task is scored with its own model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from engine.adapters.layout import Layout
from engine.adapters.lora import LoraAdapter
from engine.errors import IcmfError
from engine.tasks.base import BaseTaskModel, Batch, Example
from engine.tasks.errors import TaskError, raise_task_faults
from engine.tasks.functional import Factors, LoraHost, adapter_factors

if TYPE_CHECKING:
    from engine.catalog import Catalog


@dataclass
class TaskShots:
    """One task's few-shot examples, encoded once.

    Attributes:
        task: task name.
        batch: the encoded support examples (the task model's ``encode``).
        head: the task's head tensors (``modules_to_save``), or None.
        count: number of examples.
        host: the task's own model with LoRA slots, when it differs from the objective's
            (another model spec with the same adapted modules); None: the objective's host.
    """

    task: str
    batch: Batch
    head: dict[str, torch.Tensor] | None = None
    count: int = 0
    host: LoraHost | None = None


@dataclass
class FewShotObjective:
    """Mean support loss over tasks of an adapter in ``host.layout``'s canonical form.

    Attributes:
        host: the base model with LoRA slots (tasks of other model specs carry their own host
            in :class:`TaskShots`; all hosts share the layout).
        shots: task -> its encoded support examples and head.
    """

    host: LoraHost
    shots: dict[str, TaskShots] = field(default_factory=dict)

    @classmethod
    def from_examples(
        cls,
        task_model: BaseTaskModel,
        layout: Layout,
        examples: Mapping[str, Sequence[Example]],
        heads: Mapping[str, Mapping[str, torch.Tensor] | None] | None = None,
        base: torch.nn.Module | None = None,
    ) -> FewShotObjective:
        """Build from examples in memory (``{task: [example, ...]}``) and optional heads
        (``base``: an already built plain base of ``task_model``, wrapped in place)."""
        host = LoraHost(task_model, layout, base=base)
        heads = heads or {}
        shots = {}
        for task, rows in examples.items():
            if not rows:
                raise TaskError(f"task {task!r}: no few-shot examples (the support split is empty)")
            head = heads.get(task)
            shots[task] = TaskShots(
                task, task_model.encode(list(rows)), dict(head) if head else None, len(rows)
            )
        return cls(host, shots)

    @classmethod
    def from_catalog(
        cls,
        catalog: Catalog,
        tasks: Sequence[str],
        layout: Layout,
        k: int | None = None,
        split: Literal["support", "train"] = "support",
    ) -> FewShotObjective:
        """Build from the tasks' definitions in ``catalog``: the first ``k`` examples of their
        ``split`` (``support``: the few shots fusion may use; ``train``: meta-training's pool, so
        the support split stays unseen until fusion).

        Heads come from each task's first catalog adapter (the one fusion treats as its own).
        Tasks of different model specs get one host per spec; the specs must agree on the
        layout's modules (:func:`engine.tasks.shared_base.check_shared_base`).

        Raises:
            TaskError: a task without a definition, tasks whose adapted modules differ, or no
                examples in ``split``.
        """
        from engine.tasks.base import task_model
        from engine.tasks.examples import load_task_examples
        from engine.tasks.shared_base import adapted_fingerprint, group_by_spec, shared_base_fault
        from engine.tasks.store import load_task

        definitions, examples, heads, faults = {}, {}, {}, []
        for task in tasks:  # every task's fault is listed at once
            try:
                definitions[task] = load_task(catalog, task)
                rows = getattr(load_task_examples(definitions[task], catalog), split)
            except IcmfError as exc:
                faults.append(exc)
                continue
            if rows.num_rows == 0:
                faults.append(TaskError(f"task {task!r}: its {split} split is empty"))
                continue
            if k is not None:
                rows = rows.select(range(min(k, rows.num_rows)))
            examples[task] = rows.to_list()
            entries = catalog.entries(task=task)
            heads[task] = catalog.load_adapter(entries[0]["id"]).extras if entries else None
        raise_task_faults(faults, "cannot give few-shot examples")
        groups = list(group_by_spec({t: d.model for t, d in definitions.items()}).values())
        models = [task_model(definitions[group[0]].model) for group in groups]
        bases = [model.build_base() for model in models]
        if len(groups) > 1:
            names = [m.name for m in layout.modules]
            fault = shared_base_fault(groups, [adapted_fingerprint(base, names) for base in bases])
            if fault is not None:
                raise TaskError(fault)
        objective = cls.from_examples(
            models[0], layout, {t: examples[t] for t in groups[0]}, heads, base=bases[0]
        )
        for group, model, base in zip(groups[1:], models[1:], bases[1:], strict=True):
            other = cls.from_examples(model, layout, {t: examples[t] for t in group}, heads, base=base)
            for task, shot in other.shots.items():
                shot.host = other.host
                objective.shots[task] = shot
        objective.shots = {t: objective.shots[t] for t in tasks}  # the caller's task order
        return objective

    @property
    def tasks(self) -> list[str]:
        return list(self.shots)

    def _tasks(self, tasks: Sequence[str] | None) -> list[str]:
        tasks = list(tasks) if tasks is not None else self.tasks
        unknown = [t for t in tasks if t not in self.shots]
        if unknown:
            raise TaskError(f"no few-shot examples for task(s) {unknown}; have {self.tasks}")
        return tasks

    def task_loss(
        self,
        adapter: Factors | torch.Tensor,
        task: str,
        sample: int | None = None,
        generator: torch.Generator | None = None,
        head: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Differentiable support loss of one task (``adapter``: flat ``[N]`` or factors).

        Args:
            sample: score a random subset of this many examples (episodes stay cheap).
            generator: RNG of the subset.
            head: score with this head instead of the task's (e.g. the head trained with the
                adapter that was fused).
        """
        shot = self.shots[task]
        batch = shot.batch
        if sample is not None and sample < shot.count:
            rows = torch.randperm(shot.count, generator=generator)[:sample]
            batch = select_rows(batch, rows)
        host = shot.host or self.host
        return host.loss(adapter, batch, head=shot.head if head is None else head)

    def loss(
        self,
        adapter: Factors | torch.Tensor,
        tasks: Sequence[str] | None = None,
        sample: int | None = None,
        generator: torch.Generator | None = None,
        heads: Mapping[str, Mapping[str, torch.Tensor] | None] | None = None,
    ) -> torch.Tensor:
        """Differentiable mean support loss over ``tasks`` (default: all); see :meth:`task_loss`.
        ``heads``: per task, a head to use instead of the task's own (None: keep the task's)."""
        tasks = self._tasks(tasks)
        heads = heads or {}
        losses = [self.task_loss(adapter, t, sample, generator, heads.get(t)) for t in tasks]
        return torch.stack(losses).mean()

    def split(self, fraction: float = 0.5, seed: int = 0) -> tuple[FewShotObjective, FewShotObjective]:
        """Two objectives over disjoint halves of every task's examples (inner support, outer query),
        sharing the host. Each task needs at least 2 examples."""
        first, second = {}, {}
        generator = torch.Generator().manual_seed(seed)
        for task, shot in self.shots.items():
            if shot.count < 2:
                raise TaskError(f"task {task!r}: {shot.count} few-shot example(s); a split needs >= 2")
            order = torch.randperm(shot.count, generator=generator)
            cut = min(max(1, round(shot.count * fraction)), shot.count - 1)
            first[task] = TaskShots(task, select_rows(shot.batch, order[:cut]), shot.head, cut, shot.host)
            second[task] = TaskShots(
                task, select_rows(shot.batch, order[cut:]), shot.head, shot.count - cut, shot.host
            )
        return FewShotObjective(self.host, first), FewShotObjective(self.host, second)

    def folds(self, k: int, seed: int = 0) -> list[tuple[FewShotObjective, FewShotObjective]]:
        """``k``-fold cross-validation: ``k`` (fit, held-out) pairs of objectives sharing the host.

        Every task's examples are shuffled (seeded) and cut into ``k`` near-equal folds; pair ``i``
        holds out fold ``i`` of every task and fits on the rest, so each example is held out exactly
        once. ``k`` equal to the smallest task's count is leave-one-out.

        Raises:
            TaskError: ``k < 2``, or a task with fewer than ``k`` examples.
        """
        if k < 2:
            raise TaskError(f"cross-validation needs at least 2 folds, got {k}")
        small = {t: s.count for t, s in self.shots.items() if s.count < k}
        if small:
            raise TaskError(f"{k} folds need at least {k} examples per task; task(s) {small} have fewer")
        generator = torch.Generator().manual_seed(seed)
        orders = {t: torch.randperm(s.count, generator=generator) for t, s in self.shots.items()}
        pairs = []
        for i in range(k):
            fit, held = {}, {}
            for task, shot in self.shots.items():
                parts = orders[task].tensor_split(k)
                rest = torch.cat([p for j, p in enumerate(parts) if j != i])
                fit[task] = TaskShots(task, select_rows(shot.batch, rest), shot.head, len(rest), shot.host)
                held[task] = TaskShots(
                    task, select_rows(shot.batch, parts[i]), shot.head, len(parts[i]), shot.host
                )
            pairs.append((FewShotObjective(self.host, fit), FewShotObjective(self.host, held)))
        return pairs

    def task_losses(
        self, adapter: Factors | torch.Tensor, tasks: Sequence[str] | None = None
    ) -> torch.Tensor:
        """Each task's mean support loss ``[len(tasks)]``, no grad (what cross-validation pairs)."""
        with torch.no_grad():
            return torch.stack([self.task_loss(adapter, t) for t in self._tasks(tasks)])

    def adapter_loss(self, adapter: LoraAdapter, tasks: Sequence[str] | None = None) -> float:
        """Mean support loss of a PEFT-style adapter (any ranks and scaling), no grad."""
        with torch.no_grad():
            return float(self.loss(adapter_factors(adapter, self.host.layout), tasks))


def select_rows(batch: Batch, rows: torch.Tensor) -> Batch:
    """The examples ``rows`` of an encoded batch (every tensor's first dimension is the example)."""
    return {key: value.index_select(0, rows) for key, value in batch.items()}
