"""The rows of the fusion-quality table: which registry method, with which weights and parameters.

Weights follow each method's usual convention: averaging methods get ``1/K``; sign-election
methods (TIES, DARE-TIES) get 1 per task, as mergekit's examples do (their disjoint merge already
averages the agreeing entries); ``task_arithmetic-sum`` is Ilharco et al.'s ``λ = 1`` sum and
``task_arithmetic-tuned`` picks ``λ`` on the tasks' *support* examples (never the eval split).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.adapters.lora import LoraAdapter
from engine.fusion import fuse_adapters, fusion_context
from engine.tasks.fewshot import FewShotObjective

TUNED_LAMBDAS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)


@dataclass(frozen=True)
class MethodRow:
    """One row: ``label`` in the table, registry ``method``, weight convention, parameters."""

    label: str
    method: str
    weights: str = "mean"  # "mean" (1/K) or "one" (1 each)
    params: dict[str, Any] = field(default_factory=dict)
    few_shot: bool = False  # needs the support objective

    def weights_for(self, k: int) -> list[float]:
        return [1.0 / k] * k if self.weights == "mean" else [1.0] * k


BASELINES: tuple[MethodRow, ...] = (
    MethodRow("linear", "linear"),
    MethodRow("cat", "cat"),
    MethodRow("task_arithmetic", "task_arithmetic"),
    MethodRow("task_arithmetic-sum", "task_arithmetic", weights="one"),
    MethodRow("task_arithmetic-tuned", "task_arithmetic", weights="one", few_shot=True),
    MethodRow("svd", "svd"),
    MethodRow("ties", "ties", weights="one", params={"density": 0.5}),
    MethodRow("dare_linear", "dare_linear", params={"density": 0.5}),
    MethodRow("dare_ties", "dare_ties", weights="one", params={"density": 0.5}),
    MethodRow("magnitude_prune", "magnitude_prune", params={"density": 0.5}),
    MethodRow("lorahub", "lorahub", few_shot=True),
    MethodRow("task_arithmetic-fitted", "task_arithmetic", weights="one", few_shot=True),  # module-wise
    # The 2025 merges: 1/K weights give each its paper's task vectors (tau_i = dW_i, or the plain
    # average for STAR); the knobs left unset (alpha, density, shrink) are picked on the support
    # examples, as the papers pick them on validation data (engine.fusion.selection).
    MethodRow("knots_ties", "knots", few_shot=True),
    MethodRow("knots_dare", "knots", params={"inner": "dare"}, few_shot=True),
    MethodRow("iso_c", "iso_c", few_shot=True),
    MethodRow("iso_cts", "iso_cts", few_shot=True),
    MethodRow("tsv", "tsv", few_shot=True),
    MethodRow("core_space", "core_space", few_shot=True),  # inner TSV, the paper's headline
    MethodRow("star", "star"),
    MethodRow("regmean", "regmean", few_shot=True),  # Gram matrices of the support examples
)

# ICM-Fusion rows (need a meta-trained F-VAE). ``icm`` is the paper's method as specified: latent
# task-vector arithmetic, decode; the others add this project's few-shot steps (docs/design.md §2.6).
REFINE = {"refine_steps": 100, "refine_lr": 0.05}
ICM_ROWS: tuple[MethodRow, ...] = (
    MethodRow("icm", "icm"),
    MethodRow("icm-mean-noproject", "icm", params={"combine": "mean", "project": False}),
    MethodRow("icm-ungated", "icm", params={"familiarity_gate": False}),
    MethodRow("icm-gate-min", "icm", params={"gate_mode": "min"}),
    MethodRow("icm-no-prototypes", "icm", params={"task_prototypes": False}),
    MethodRow("icm-displacement-scaled", "icm", params={"partial_displacement": "scaled"}),
    MethodRow("icm+refine", "icm", params=REFINE, few_shot=True),
    MethodRow(
        "icm+refine+span",
        "icm",
        params={**REFINE, "refine_span": True, "span_granularity": "module"},
        few_shot=True,
    ),
)
FITTED_STEPS = 100


def run_row(
    row: MethodRow,
    adapters: Sequence[LoraAdapter],
    tasks: Sequence[str],
    seed: int,
    objective: Callable[[], FewShotObjective] | None = None,
    fusion_args: dict[str, Any] | None = None,
) -> tuple[LoraAdapter, dict[str, Any]]:
    """Fuse ``adapters`` as ``row`` says; returns the adapter and what was chosen (e.g. λ).

    ``fusion_args``: keyword arguments of :func:`engine.fusion.fusion_context` (``fvae``,
    ``task_vectors``); ``objective`` makes the few-shot objective, called only for rows that need it.
    """
    weights = row.weights_for(len(adapters))
    if row.label == "task_arithmetic-tuned":
        return _tuned_task_arithmetic(adapters, tasks, weights, seed, objective())
    if row.label == "task_arithmetic-fitted":
        return _fitted_task_arithmetic(adapters, tasks, objective(), row.params.get("steps", FITTED_STEPS))
    fused_context = fusion_context(
        row.method, row.params, tasks=tasks, objective=objective, **(fusion_args or {})
    )
    result = fuse_adapters(
        list(adapters), row.method, weights, row.params, seed=seed, tasks=list(tasks), context=fused_context
    )
    return result.adapter, result.provenance.get("details") or {}


def _tuned_task_arithmetic(adapters, tasks, weights, seed, objective: FewShotObjective):
    best = None
    for lam in TUNED_LAMBDAS:
        fused = fuse_adapters(list(adapters), "task_arithmetic", weights, {"lam": lam}, seed=seed).adapter
        loss = objective.adapter_loss(fused)
        if best is None or loss < best[0]:
            best = (loss, lam, fused)
    return best[2], {"lam": best[1], "support_loss": best[0]}


def _fitted_task_arithmetic(adapters, tasks, objective: FewShotObjective, steps: int):
    """``sum_t beta_{t,m} dW_{t,m}`` with per-task, per-module weights fitted by Adam on the support
    loss (AdaMerging-like), the step picked on a 25 % hold-out of the shots — the same optimiser,
    step size, steps and granularity as icm's span refinement (whose step is chosen by
    cross-validation instead)."""
    import torch

    from engine.adapters.lora import LoraModule
    from engine.fusion.modulewise import fused_adapter
    from engine.fusion.registry import FusionInputs
    from engine.tasks.functional import adapter_factors

    layout = objective.host.layout
    factors = [adapter_factors(a, layout) for a in adapters]
    beta = torch.full((len(adapters), layout.num_modules), 1.0 / len(adapters), requires_grad=True)
    optimizer = torch.optim.Adam([beta], lr=REFINE["refine_lr"])
    fit, check = objective.split(0.75, seed=0)
    best = (float("inf"), None, -1)
    for step in range(steps + 1):
        combined = [
            (
                torch.cat([f[m][0] for f in factors]),
                torch.cat([f[m][1] * beta[t, m] for t, f in enumerate(factors)], 1),
            )
            for m in range(layout.num_modules)
        ]
        loss = fit.loss(combined, tasks)
        with torch.no_grad():
            held_out = float(check.loss(combined, tasks))
        if held_out < best[0]:
            best = (held_out, beta.detach().clone(), step)
        if step == steps:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    modules = {}
    for name in sorted({n for a in adapters for n in a.modules}):
        m = layout.index[name]
        parts = [(a.modules[name], float(best[1][t, m])) for t, a in enumerate(adapters) if name in a.modules]
        A = torch.cat([p.A.float() for p, _ in parts])
        B = torch.cat([p.B.float() * (p.scaling * w) for p, w in parts], dim=1)
        modules[name] = LoraModule(A=A, B=B, scaling=1.0)
    fused = fused_adapter(FusionInputs(list(adapters), [1.0] * len(adapters), list(tasks), 0), modules)
    return fused, {"weights": best[1].tolist(), "holdout_loss": best[0], "best_step": best[2]}
