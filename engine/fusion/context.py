"""What data-driven fusion methods read besides the adapters, weights and parameters.

One typed object for every caller (CLI, server, demo, benchmarks), built by
:func:`engine.fusion.api.fusion_context`. A method names the fields it reads as keyword-only
arguments of its function (:func:`engine.fusion.registry.fusion_method`); the registry passes
exactly those and refuses to run a method whose required fields are unset.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from engine.adapters.lora import LoraAdapter

if TYPE_CHECKING:  # annotations only: importing them here would load the task models for every method
    from engine.fusion.icm.inputs import IcmInputsCache
    from engine.fvae.artifact import FVAEArtifact
    from engine.tasks.fewshot import FewShotObjective


@dataclass(frozen=True)
class FusionContext:
    """Extra inputs of data-driven methods; every field is optional here, methods say which they need.

    Attributes:
        fvae: the meta-trained F-VAE (``icm``).
        task_vectors: in-context task vectors by task (``[d]`` each), for tasks the F-VAE may not
            have seen (``icm``; the catalog's stored ones, ``icmf taskvec``).
        objective: the few-shot objective over the fused tasks' support examples (``icm``
            refinement).
        loss_fn: ``LoraAdapter -> float``, a fused candidate's few-shot loss (``lorahub``);
            defaults to ``objective.adapter_loss``.
        icm_inputs_cache: keeps each input's ``icm`` encoding across fusions (a server's);
            results are bit-identical with and without it.
        grams: each task's input Gram matrices by module, ``{task: {module: G [d_in, d_in]}}``
            (``regmean``; ``fusion_context`` gives the catalog's stored ones, read one module at
            a time, :mod:`engine.task_vectors.grams`; computed from ``objective`` when unset).
    """

    fvae: FVAEArtifact | None = None
    task_vectors: Mapping[str, torch.Tensor] = field(default_factory=dict)
    objective: FewShotObjective | None = None
    loss_fn: Callable[[LoraAdapter], float] | None = None
    icm_inputs_cache: IcmInputsCache | None = None
    grams: Mapping[str, Mapping[str, torch.Tensor]] | None = None

    def __post_init__(self) -> None:
        if self.loss_fn is None and self.objective is not None:
            object.__setattr__(self, "loss_fn", self.objective.adapter_loss)


# What to give when a method needs a field that is unset (the registry's error message).
CONTEXT_HINTS = {
    "fvae": "a trained F-VAE, the output of `icmf train` (`icmf fuse --model DIR`; serving: the "
    "config's `fvae`)",
    "task_vectors": "in-context task vectors: compute them with `icmf taskvec`",
    "objective": "few-shot examples of the fused tasks to refine on: define the tasks with examples "
    "in the catalog (`icmf task add`)",
    "loss_fn": "few-shot examples of the fused tasks to score candidates on: define the tasks with "
    "examples in the catalog (`icmf task add`)",
    "icm_inputs_cache": "an engine.fusion.icm.inputs.IcmInputsCache",
    "grams": "each task's input Gram matrices ({task: {module: G}}): define the fused tasks with "
    "examples in the catalog (`icmf task add`), they are computed from them on first use",
}
