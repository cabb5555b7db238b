"""``icm``: ICM-Fusion — fusion by task-vector arithmetic in the latent space of a meta-trained
F-VAE (DESIGN.md §2.6–2.7).

Each input adapter is put in the F-VAE's layout, normalised and encoded with its task's vector
(the one seen in meta-training, or — for a task the F-VAE never saw — the vector derived from
its adapter, so unseen tasks need only their adapter); the latents and task vectors are combined
(conflict projection, weights ``alpha`` = the fusion weights); the fused code is decoded,
de-normalised and written back as a LoRA over the union of the inputs' modules, optionally
truncated to ``rank`` exactly.

Needs ``context["fvae"]``: an :class:`engine.meta.artifact.FVAEArtifact` (CLI: ``--model DIR``).
"""

from __future__ import annotations

from typing import Literal

import pydantic
import torch

from engine.adapters.codec import from_flat, to_canonical, to_flat, to_lora, unflatten
from engine.adapters.lora import LoraAdapter, LoraModule
from engine.fusion.lowrank import truncate_lowrank
from engine.fusion.modulewise import fused_adapter
from engine.fusion.registry import FusionConfigError, FusionInputs, fusion_method
from engine.fvae.latent import fuse_latents
from engine.meta.taskvec import project
from engine.tasks.functional import adapter_factors


class IcmParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    combine: Literal["weighted", "mean", "sum", "slerp"] = "weighted"
    project: bool = True
    rank: int | None = pydantic.Field(None, gt=0, description="truncate each module to this rank")
    task_vectors: Literal["trained", "adapter"] = pydantic.Field(
        "trained",
        description="'trained': meta-training's vector when the task has one; 'adapter': always derive",
    )
    refine_steps: int = pydantic.Field(
        0, ge=0, description="few-shot latent refinement: Adam steps on the fused code and weights"
    )
    refine_lr: float = pydantic.Field(0.05, gt=0, description="refinement step size")
    refine_reg: float = pydantic.Field(
        1e-3, ge=0, description="L2 pull of the refined code towards the fused one (per latent unit)"
    )
    refine_weights: bool = pydantic.Field(True, description="refine the fusion weights alpha too")
    refine_holdout: float = pydantic.Field(
        0.25, ge=0, lt=1, description="fraction of each task's shots kept to choose the refinement step"
    )
    refine_condition: bool = pydantic.Field(False, description="refine the fused task vector too")
    span_granularity: Literal["task", "module"] = pydantic.Field(
        "task", description="refine_span weights: one per input adapter, or one per adapter and module"
    )
    refine_span: bool = pydantic.Field(
        False,
        description="add the input adapters' exact deltas with refined weights (output rank grows by "
        "the inputs' ranks unless `rank` truncates)",
    )


@fusion_method("icm", IcmParams, reference="https://arxiv.org/abs/2508.04153 (ICM-Fusion)")
def icm(inputs: FusionInputs, params: IcmParams) -> LoraAdapter:
    """Fuse in the latent space of a meta-trained F-VAE (ICM-Fusion)."""
    artifact = inputs.context.get("fvae")
    if artifact is None:
        raise FusionConfigError("icm needs a trained F-VAE: pass --model DIR (the output of `icmf train`)")
    layout, normalizer, model = artifact.layout, artifact.normalizer, artifact.model
    gauge = bool(artifact.meta.get("gauge", True))
    canon = [to_canonical(a, layout, gauge=gauge) for a in inputs.adapters]
    x = torch.stack([to_flat(c) for c in canon])  # [K, N]
    xn = normalizer.normalize(x)
    tasks = inputs.tasks or [f"input{i}" for i in range(len(canon))]
    cond = torch.stack([_task_vector(t, xn[i], artifact, inputs, params) for i, t in enumerate(tasks)])
    alpha = torch.tensor(inputs.weights, dtype=torch.float32)
    with torch.no_grad():
        model.eval()
        mu, _ = model.encode(xn, cond)
        z_f, v_f = fuse_latents(mu, cond, alpha, combine=params.combine, project=params.project)
        fused = normalizer.denormalize(model.decode(z_f[None], v_f[None])[0])
    details: dict = {}
    span = None
    if params.refine_steps:
        objective = _objective(inputs, layout, tasks)
        inputs_factors = [adapter_factors(a, layout) for a in inputs.adapters] if params.refine_span else None
        fused, span, details = refine_latent(
            model, normalizer, mu, cond, alpha, objective, tasks, params, inputs_factors
        )
    mask = torch.stack([c.mask for c in canon]).any(dim=0)
    lora = to_lora(from_flat(fused, layout, mask), trim=True)
    modules = {}
    for name, module in lora.modules.items():
        A, B = module.A, module.B
        if span is not None:  # exact sum: decoded delta + sum_t beta_t dW_t (ranks concatenate)
            column = layout.index[name]
            parts = [
                (adapter.modules[name], float(span[t, column]))
                for t, adapter in enumerate(inputs.adapters)
                if name in adapter.modules
            ]
            A = torch.cat([A] + [m.A.float() for m, _ in parts])
            B = torch.cat([B] + [m.B.float() * (m.scaling * beta) for m, beta in parts], dim=1)
        if params.rank is not None:
            A, B = truncate_lowrank(A, B, params.rank)
        modules[name] = LoraModule(A=A, B=B, scaling=1.0)
    adapter = fused_adapter(inputs, modules)
    if details:
        adapter.config["icmf_details"] = details
    return adapter


def _task_vector(
    task: str, xn: torch.Tensor, artifact, inputs: FusionInputs, params: IcmParams
) -> torch.Tensor:
    """The condition of one input: the vector meta-training used for the task; else one given in
    ``context["task_vectors"]`` (e.g. computed now from k in-context examples of an unseen task);
    else, for an F-VAE trained on adapter-derived vectors, the projection of the adapter itself."""
    source = artifact.meta.get("task_vector_source", {})
    cond_dim = artifact.model.config.cond_dim
    given = inputs.context.get("task_vectors") or {}
    if params.task_vectors == "trained" and task in artifact.task_vectors:
        return artifact.task_vectors[task]
    if task in given:
        vector = torch.as_tensor(given[task], dtype=torch.float32).flatten()
        if vector.numel() != cond_dim:
            raise FusionConfigError(
                f"task vector of {task!r} has {vector.numel()} values; this F-VAE is conditioned on {cond_dim}"
            )
        return vector
    if source.get("kind", "adapter_projection") == "adapter_projection":
        return project(xn, int(source.get("dim", cond_dim)), int(source.get("seed", 0)))
    raise FusionConfigError(
        f"task {task!r} has no task vector: this F-VAE was trained on in-context vectors; compute one "
        "from k examples with `icmf taskvec --task ...` (or pass context['task_vectors'])"
    )


def _objective(inputs: FusionInputs, layout, tasks: list[str]):
    objective = inputs.context.get("objective")
    if objective is None:
        raise FusionConfigError(
            "icm refine_steps > 0 needs few-shot examples of the fused tasks: pass context={'objective': "
            "FewShotObjective} (CLI: tasks defined in the catalog with `icmf task add`)"
        )
    if objective.host.layout.layout_id != layout.layout_id:
        raise FusionConfigError(
            f"the few-shot objective uses layout {objective.host.layout.layout_id}, the F-VAE "
            f"{layout.layout_id}; build the objective on the F-VAE's layout"
        )
    missing = [t for t in tasks if t not in objective.shots]
    if missing:
        raise FusionConfigError(
            f"no few-shot examples for task(s) {missing}: refinement needs k examples each"
        )
    return objective


def refine_latent(model, normalizer, mu, cond, alpha, objective, tasks, params, inputs_factors=None):
    """Few-shot latent refinement (DESIGN.md §2.6): Adam on the fusion weights and a residual of
    the fused code (and of the fused task vector with ``refine_condition``), minimising the fused
    adapter's support loss over all tasks plus an L2 pull towards the unrefined code. The decoder
    is frozen, so the adapter stays on the F-VAE's manifold, which is what keeps a few shots from
    overfitting.

    With ``inputs_factors`` (``refine_span``), the fused adapter is the decoded one plus
    ``sum_t beta_t dW_t`` over the input adapters' exact deltas, ``beta`` starting at 0 and refined
    too: the search covers the generator's manifold and the span of the inputs.

    With ``refine_holdout`` > 0 the shots are split: the fit part drives Adam, the held-out part
    picks the step (early stopping; step 0 = no refinement), so few shots cannot make it worse
    than the unrefined fusion on data it was not fitted to.

    Shapes: ``mu [K, latent]``, ``cond [K, d]``, ``alpha [K]``. Returns the best decoded adapter
    seen (lowest held-out loss) ``[N]`` in weight space, its ``beta [K, M]`` (or None), and a record.
    """
    model.requires_grad_(False)
    weights = alpha.clone().requires_grad_(params.refine_weights)
    residual = torch.zeros(mu.shape[1], requires_grad=True)
    cond_residual = torch.zeros(cond.shape[1], requires_grad=params.refine_condition)
    modules = objective.host.layout.num_modules
    shape = (mu.shape[0], modules) if params.span_granularity == "module" else (mu.shape[0], 1)
    beta = torch.zeros(shape, requires_grad=inputs_factors is not None)
    trainable = [residual] + ([weights] if params.refine_weights else [])
    trainable += [cond_residual] if params.refine_condition else []
    trainable += [beta] if inputs_factors is not None else []
    optimizer = torch.optim.Adam(trainable, lr=params.refine_lr)
    # Fit on part of the shots, pick the step on the rest: with few shots the fit loss keeps falling
    # long after held-out quality has turned (overfitting); step 0 is the unrefined fusion.
    fit, check = (
        objective.split(1 - params.refine_holdout, seed=0) if params.refine_holdout else (objective,) * 2
    )
    best = (float("inf"), None, None, -1)
    history, checks = [], []
    for step in range(params.refine_steps + 1):
        z_f, v_f = fuse_latents(mu, cond, weights, combine=params.combine, project=params.project)
        z_f, v_f = z_f + residual, v_f + cond_residual
        fused = normalizer.denormalize(model.decode(z_f[None], v_f[None])[0])
        candidate = (
            fused
            if inputs_factors is None
            else _with_span(fused, objective.host.layout, inputs_factors, beta)
        )
        support = fit.loss(candidate, tasks)
        with torch.no_grad():
            value = float(check.loss(candidate, tasks)) if check is not fit else float(support.detach())
        if value < best[0]:
            best = (value, fused.detach().clone(), beta.detach().expand(-1, modules).clone(), step)
        history.append(float(support.detach()))
        checks.append(value)
        if step == params.refine_steps:
            break
        loss = support + params.refine_reg * (residual.pow(2).sum() + cond_residual.pow(2).sum())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    record = {
        "support_loss_start": history[0],
        "support_loss_end": history[-1],
        "holdout_loss_start": checks[0],
        "support_loss_best": best[0],  # on the held-out shots when refine_holdout > 0
        "best_step": best[3],
        "weights": [float(w) for w in weights.detach()],
    }
    if inputs_factors is not None:
        record["span_weights"] = (
            best[2].tolist() if params.span_granularity == "module" else best[2][:, 0].tolist()
        )
    return best[1], (best[2] if inputs_factors is not None else None), {"refine": record}


def _with_span(fused: torch.Tensor, layout, inputs_factors, beta: torch.Tensor):
    """Per-module factors of ``decoded + sum_t beta_t dW_t`` (ranks concatenated; differentiable)."""
    factors = []
    for m, (A, B) in enumerate(unflatten(fused, layout)):
        A_parts = [A] + [f[m][0] for f in inputs_factors]
        B_parts = [B] + [f[m][1] * beta[t, min(m, beta.shape[1] - 1)] for t, f in enumerate(inputs_factors)]
        factors.append((torch.cat(A_parts), torch.cat(B_parts, dim=1)))
    return factors
