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

from engine.adapters.codec import from_flat, to_canonical, to_flat, to_lora
from engine.adapters.lora import LoraAdapter, LoraModule
from engine.fusion.lowrank import truncate_lowrank
from engine.fusion.modulewise import fused_adapter
from engine.fusion.registry import FusionConfigError, FusionInputs, fusion_method
from engine.fvae.latent import fuse_latents
from engine.meta.taskvec import project


class IcmParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    combine: Literal["weighted", "mean", "sum", "slerp"] = "weighted"
    project: bool = True
    rank: int | None = pydantic.Field(None, gt=0, description="truncate each module to this rank")
    task_vectors: Literal["trained", "adapter"] = pydantic.Field(
        "trained",
        description="'trained': meta-training's vector when the task has one; 'adapter': always derive",
    )


@fusion_method("icm", IcmParams, reference="https://arxiv.org/abs/2508.04153 (ICM-Fusion)")
def icm(inputs: FusionInputs, params: IcmParams) -> LoraAdapter:
    """Fuse in the latent space of a meta-trained F-VAE (ICM-Fusion)."""
    artifact = inputs.context.get("fvae")
    if artifact is None:
        raise FusionConfigError("icm needs a trained F-VAE: pass --model DIR (the output of `icmf train`)")
    layout, normalizer, model = artifact.layout, artifact.normalizer, artifact.model
    gauge = bool(artifact.meta.get("gauge", True))
    source = artifact.meta.get("task_vector_source", {})
    canon = [to_canonical(a, layout, gauge=gauge) for a in inputs.adapters]
    x = torch.stack([to_flat(c) for c in canon])  # [K, N]
    xn = normalizer.normalize(x)
    tasks = inputs.tasks or [f"input{i}" for i in range(len(canon))]
    cond = torch.stack(
        [
            artifact.task_vectors[t]
            if params.task_vectors == "trained" and t in artifact.task_vectors
            else project(xn[i], int(source.get("dim", model.config.cond_dim)), int(source.get("seed", 0)))
            for i, t in enumerate(tasks)
        ]
    )
    alpha = torch.tensor(inputs.weights, dtype=torch.float32)
    with torch.no_grad():
        model.eval()
        mu, _ = model.encode(xn, cond)
        z_f, v_f = fuse_latents(mu, cond, alpha, combine=params.combine, project=params.project)
        fused = normalizer.denormalize(model.decode(z_f[None], v_f[None])[0])
    mask = torch.stack([c.mask for c in canon]).any(dim=0)
    lora = to_lora(from_flat(fused, layout, mask), trim=True)
    modules = {}
    for name, module in lora.modules.items():
        A, B = (
            (module.A, module.B) if params.rank is None else truncate_lowrank(module.A, module.B, params.rank)
        )
        modules[name] = LoraModule(A=A, B=B, scaling=1.0)
    return fused_adapter(inputs, modules)
