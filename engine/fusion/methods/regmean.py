"""``regmean``: per linear layer, the least-squares merge from each task's input Gram matrix.

Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models" (ICLR 2023),
https://arxiv.org/abs/2212.09849, code https://github.com/bloomberg/dataless-model-merging
(``regmean_merge``, ``reduce_non_diag``).

For a linear layer ``y = W x`` with task models ``W_i = W_0 + dW_i`` and input Gram matrices
``G_i = X_i^T X_i / n_i``, RegMean solves ``min_W sum_i ||W X_i - W_i X_i||^2``:
``W = (sum_i W_i G_i)(sum_i G_i)^-1``, so ``dW = (sum_i dW_i G_i)(sum_i G_i)^-1`` (the base
cancels). Before that the off-diagonal entries of each ``G_i`` are scaled by ``shrink`` (the
reference's ``reduce_non_diag(G, a)``: ``a G + (1 - a) diag(G)``).

Exact low-rank: ``dW = sum_i B_i (A_i G_i S^-1)`` with ``S = sum_j G_j``, i.e. the ``B``'s
concatenated and ``A_i' = (S^-1 G_i A_i^T)^T`` (``S`` symmetric): a LoRA of rank ``sum r_i``,
from ``d_in x d_in`` Gram matrices only (``S^-1`` is the pseudo-inverse, so input directions no
task excites get no update). An adapter that does not target a module still contributes its task's
``G_i`` there (its ``W_i = W_0``), as in the reference. Weights enter as ``G_i -> K w_i G_i`` (the
default weights give the reference; they must be positive).

Gram matrices come from ``context["grams"]`` (``{task: {module: G}}``: with ``inputs_from="base"``,
each task's matrices stored in the catalog, computed once with Ray Data by
:func:`engine.task_vectors.grams.task_grams`, which :func:`engine.fusion.fusion_context` supplies
and which are read one module at a time), or are computed from
``context["objective"]`` (the few-shot objective over the fused tasks' support examples;
:func:`engine.tasks.grams.input_grams`) through the base model (``inputs_from="base"``, so one
task's statistics serve every adapter of it) or through each task's own adapter
(``inputs_from="adapter"``, the reference's fine-tuned models). Unset ``shrink`` is picked on the
support examples when the context has ``loss_fn``, else the reference notebook's 0.9.
The provenance's ``details.grams`` names each task's stored key (or how the matrices were made).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Literal

import pydantic
import torch

from engine.adapters.lora import LoraAdapter, LoraModule
from engine.fusion.modulewise import fused_adapter, module_names
from engine.fusion.registry import FusionConfigError, FusionInputs, fusion_method
from engine.fusion.selection import Knob, pick_on_support, support_wanted

if TYPE_CHECKING:
    from engine.tasks.fewshot import FewShotObjective

SHRINK = Knob("shrink", 0.9, (0.1, 0.3, 0.5, 0.7, 0.9, 1.0))

Grams = Mapping[str, Mapping[str, torch.Tensor]]  # task -> module -> G [d_in, d_in]


class RegMeanParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    shrink: float | None = pydantic.Field(
        None, ge=0, le=1, description="scale of the Gram matrices' off-diagonal entries; None: picked or 0.9"
    )
    inputs_from: Literal["base", "adapter"] = pydantic.Field(
        "base", description="Gram matrices from the base model's inputs or each task's adapted model's"
    )

    @property
    def wanted_context(self) -> tuple[str, ...]:
        """The base model's Gram matrices are each task's stored ones; through the adapters they are
        computed from the few-shot objective; the support loss picks an unset ``shrink``."""
        inputs = ("grams",) if self.inputs_from == "base" else ("objective",)
        return (*inputs, *support_wanted(self.shrink))


def regmean_factors(
    modules: list[LoraModule | None], grams: list[torch.Tensor], coefficients: list[float], shrink: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """RegMean of one module: ``(A, B)`` with ``B @ A = (sum dW_i G_i)(sum G_i)^-1``.

    Args:
        modules: each task's module (None: the task's adapter does not target it).
        grams: each task's input Gram matrix ``[d_in, d_in]``.
        coefficients: each task's positive weight on its Gram matrix.
        shrink: off-diagonal scale.
    """
    shrunk = []
    for G, c in zip(grams, coefficients, strict=True):
        G = G.double()
        shrunk.append(c * (shrink * G + (1 - shrink) * torch.diag(torch.diagonal(G))))
    inverse = torch.linalg.pinv(sum(shrunk), hermitian=True, rtol=1e-10)
    As, Bs = [], []
    for module, G in zip(modules, shrunk, strict=True):
        if module is not None:
            As.append(module.A.double() @ G @ inverse)
            Bs.append(module.B.double() * module.scaling)
    return torch.cat(As), torch.cat(Bs, dim=1)


def _grams(inputs: FusionInputs, params: RegMeanParams, given, objective) -> list[Mapping[str, torch.Tensor]]:
    """Each adapter's ``{module: G}``: given per task, or computed (once per task from the base)."""
    if given is not None and params.inputs_from == "base":
        missing = sorted({t for t in inputs.tasks if t not in given})
        if missing:
            raise FusionConfigError(f"context.grams has no Gram matrices for task(s) {missing}")
        return [given[t] for t in inputs.tasks]
    if objective is None:
        raise FusionConfigError(
            "regmean needs each task's input Gram matrices: give FusionContext(grams={task: {module: G}}) "
            "or a few-shot objective over the fused tasks' support examples (`icmf task add`)"
        )
    from engine.tasks.functional import adapter_factors
    from engine.tasks.grams import input_grams

    per_task, out = {}, []
    for task, adapter in zip(inputs.tasks, inputs.adapters, strict=True):
        batch = objective.shots[task].batch
        if params.inputs_from == "adapter":
            out.append(input_grams(objective.host, batch, adapter_factors(adapter, objective.host.layout)))
        else:
            if task not in per_task:
                per_task[task] = input_grams(objective.host, batch)
            out.append(per_task[task])
    return out


def _check(inputs: FusionInputs, params: RegMeanParams, grams, objective) -> None:
    faults = []
    if len(inputs.tasks) != len(inputs.adapters):
        faults.append(
            f"regmean needs the task of each adapter (got {len(inputs.tasks)} for {len(inputs.adapters)})"
        )
    if any(w <= 0 for w in inputs.weights):
        faults.append(f"regmean weights scale Gram matrices and must be positive (got {inputs.weights})")
    if (grams is None or params.inputs_from == "adapter") and objective is not None:
        missing = sorted({t for t in inputs.tasks if t not in objective.shots})
        if missing:
            faults.append(f"the objective has no support examples for task(s) {missing}")
    if faults:
        raise FusionConfigError("; ".join(faults))


@fusion_method("regmean", RegMeanParams, reference="https://arxiv.org/abs/2212.09849 (RegMean)")
def regmean(
    inputs: FusionInputs,
    params: RegMeanParams,
    *,
    grams: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    objective: FewShotObjective | None = None,
    loss_fn: Callable[[LoraAdapter], float] | None = None,
) -> tuple[LoraAdapter, dict]:
    """Least-squares merge per linear layer from each task's input Gram matrix (RegMean), exact low-rank."""
    _check(inputs, params, grams, objective)
    given = grams
    grams = _grams(inputs, params, given, objective)
    count = len(inputs.adapters)
    names = module_names(inputs.adapters)
    missing = [f"{t}/{n}" for t, g in zip(inputs.tasks, grams, strict=True) for n in names if n not in g]
    if missing:
        raise FusionConfigError(f"no Gram matrix for {', '.join(sorted(set(missing))[:5])}")

    def build(values: dict[str, float]) -> LoraAdapter:
        modules = {}
        for name in names:  # one module at a time
            A, B = regmean_factors(
                [a.modules.get(name) for a in inputs.adapters],
                [g[name] for g in grams],
                [count * w for w in inputs.weights],
                values["shrink"],
            )
            modules[name] = LoraModule(A=A.float().contiguous(), B=B.float().contiguous(), scaling=1.0)
        return fused_adapter(inputs, modules)

    fused, details = pick_on_support(loss_fn, params, None, build, (SHRINK,))
    # Which statistics were used: each task's stored key (engine.task_vectors.grams), else how made.
    made = "given" if given is not None and params.inputs_from == "base" else "support examples"
    details["grams"] = {t: getattr(g, "key", made) for t, g in zip(inputs.tasks, grams, strict=True)}
    return fused, details
