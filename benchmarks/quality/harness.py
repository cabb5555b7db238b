"""Score fused adapters on a lab suite: base, own and fused losses, gap closure (docs/design.md §4).

One :class:`SuiteHarness` per suite holds the frozen base with LoRA slots (built once), every kept
task's held-out and support examples, its own adapter (run 0's final checkpoint in the ``main``
catalog: full training split, seed 0) and, for classification, its heads: the base row uses the
lab's frozen-base linear head, the own and fused rows the own adapter's trained head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load_file

from benchmarks.lab.tasks import read_split, suite_model_spec
from benchmarks.quality.bootstrap import TaskSums
from engine.adapters.lora import LoraAdapter
from engine.catalog import Catalog
from engine.tasks.base import task_model
from engine.tasks.fewshot import FewShotObjective, TaskShots
from engine.tasks.functional import LoraHost, adapter_factors
from engine.tasks.metrics import gap_closure


def own_adapter_id(suite: dict[str, Any], task: str, variant: str = "main") -> str:
    """Run 0's final checkpoint of ``task`` in the ``variant`` catalog."""
    ids = suite["catalogs"][variant]["adapters"][task]
    run0 = [i for i in ids if suite["adapters"][i]["run"] == "run0"] or ids
    return max(run0, key=lambda i: suite["adapters"][i]["step"])


@dataclass
class SuiteHarness:
    """Everything needed to score fusions of one suite's tasks."""

    name: str
    suite: dict[str, Any]
    catalog: Catalog
    host: LoraHost
    tasks: list[str]
    own_ids: dict[str, str]
    own: dict[str, LoraAdapter]
    heads: dict[str, dict[str, torch.Tensor] | None]
    base_heads: dict[str, dict[str, torch.Tensor] | None]
    eval_examples: dict[str, list[dict]]
    support: dict[str, list[dict]]
    base_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    own_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    base_sums: dict[str, TaskSums] = field(default_factory=dict)  # per-example, for the bootstrap
    own_sums: dict[str, TaskSums] = field(default_factory=dict)

    @classmethod
    def build(cls, lab: dict[str, Any], name: str, max_eval: int | None = None) -> SuiteHarness:
        suite = lab["suites"][name]
        catalog = Catalog(suite["catalogs"]["main"]["uri"])
        tasks = sorted(t for t, info in suite["tasks"].items() if info["kept"])
        own_ids = {t: own_adapter_id(suite, t) for t in tasks}
        layout = catalog.layout(catalog.get(own_ids[tasks[0]])["layout_id"])
        host = LoraHost(task_model(suite_model_spec(suite)), layout)
        own = {t: catalog.load_adapter(i) for t, i in own_ids.items()}
        heads = {t: (dict(a.extras) or None) for t, a in own.items()}
        base_heads = {t: _base_head(suite, t) for t in tasks}
        evals = {t: read_split(suite, t, "eval")[:max_eval] for t in tasks}
        support = {t: read_split(suite, t, "support") for t in tasks}
        harness = cls(name, suite, catalog, host, tasks, own_ids, own, heads, base_heads, evals, support)
        for t in tasks:
            harness.base_sums[t] = harness._example_sums(None, t, base_heads[t])
            harness.own_sums[t] = harness._example_sums(adapter_factors(own[t], layout), t, heads[t])
            harness.base_metrics[t] = harness.metrics_from_examples(harness.base_sums[t])
            harness.own_metrics[t] = harness.metrics_from_examples(harness.own_sums[t])
        return harness

    def _example_sums(self, factors, task: str, head) -> TaskSums:
        sums = self.host.example_sums(factors, self.eval_examples[task], head=head)
        return {key: values.numpy() for key, values in sums.items()}

    def metrics_from_examples(self, sums: TaskSums) -> dict[str, float]:
        """A task's metrics from its per-example sums (as ``LoraHost.metrics`` computes them)."""
        return self.host.task_model.finalize({key: float(values.sum()) for key, values in sums.items()})

    @property
    def layout(self):
        return self.host.layout

    def objective(self, tasks: Sequence[str], k: int | None = None) -> FewShotObjective:
        """The few-shot objective over ``tasks``' support examples (first ``k`` of each)."""
        shots = {}
        for t in tasks:
            rows = self.support[t][:k] if k is not None else self.support[t]
            shots[t] = TaskShots(t, self.host.task_model.encode(rows), self.heads[t], len(rows))
        return FewShotObjective(self.host, shots)

    def score(self, adapter: LoraAdapter, tasks: Sequence[str]) -> dict[str, Any]:
        """Per task: fused metrics and gap closure; then mean / worst G and mean loss."""
        return self.score_examples(adapter, tasks)[0]

    def score_examples(
        self, adapter: LoraAdapter, tasks: Sequence[str]
    ) -> tuple[dict[str, Any], dict[str, TaskSums]]:
        """:meth:`score`, plus each task's per-example sums (what the paired bootstrap resamples)."""
        factors = adapter_factors(adapter, self.layout)
        per_task, sums = {}, {}
        for t in tasks:
            sums[t] = self._example_sums(factors, t, self.heads[t])
            fused = self.metrics_from_examples(sums[t])
            base, own = self.base_metrics[t], self.own_metrics[t]
            per_task[t] = {"fused": fused, "gap": gap_closure(base["loss"], own["loss"], fused["loss"])}
            if "accuracy" in fused:  # classification: also close the gap in accuracy (higher is better)
                per_task[t]["gap_accuracy"] = gap_closure(
                    -base["accuracy"], -own["accuracy"], -fused["accuracy"]
                )
        result = {
            "tasks": per_task,
            "mean_loss": sum(v["fused"]["loss"] for v in per_task.values()) / len(per_task),
        }
        for key, suffix in (("gap", ""), ("gap_accuracy", "_accuracy")):
            gaps = [v[key] for v in per_task.values() if v.get(key) is not None]
            result[f"mean_gap{suffix}"] = sum(gaps) / len(gaps) if gaps else None
            result[f"worst_gap{suffix}"] = min(gaps) if gaps else None
        result["pooled_gap"] = self._pooled(per_task, "loss", lower_is_better=True)
        if all("accuracy" in v["fused"] for v in per_task.values()):
            result["pooled_gap_accuracy"] = self._pooled(per_task, "accuracy", lower_is_better=False)
        return result, sums

    def _pooled(self, per_task: dict[str, Any], metric: str, lower_is_better: bool) -> float | None:
        """Gap closure of the summed metric, ``sum_t (base_t - fused_t) / sum_t (base_t - own_t)``.

        A mean of per-task ratios is dominated by tasks whose own adapter barely beats the base:
        with 192 eval examples an accuracy moves by ~0.03 by chance, so a task with an own-vs-base
        gap of 0.02 swings its G by +-1.5. Pooling weights each task by the gap it can close.
        """
        sign = 1.0 if lower_is_better else -1.0
        gained = sum(sign * (self.base_metrics[t][metric] - v["fused"][metric]) for t, v in per_task.items())
        closable = sum(sign * (self.base_metrics[t][metric] - self.own_metrics[t][metric]) for t in per_task)
        return gained / closable if closable > 0 else None

    def reference_rows(self, tasks: Sequence[str]) -> dict[str, dict[str, float]]:
        """The ``base`` and ``own`` rows of a task set (G = 0 and 1 by definition)."""
        mean = lambda m: sum(m[t]["loss"] for t in tasks) / len(tasks)  # noqa: E731
        rows = {}
        for label, metrics, gap in (("base", self.base_metrics, 0.0), ("own", self.own_metrics, 1.0)):
            rows[label] = {"mean_gap": gap, "worst_gap": gap, "pooled_gap": gap, "mean_loss": mean(metrics)}
            if "accuracy" in metrics[tasks[0]]:
                rows[label].update(mean_gap_accuracy=gap, worst_gap_accuracy=gap, pooled_gap_accuracy=gap)
        return rows


def _base_head(suite: dict[str, Any], task: str) -> dict[str, torch.Tensor] | None:
    """The lab's frozen-base linear head of a classification task (the ``L_base`` model)."""
    head = suite["tasks"][task].get("base_head")
    return load_file(head["path"]) if head else None
