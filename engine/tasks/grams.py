"""Gram matrices of the inputs of a model's LoRA-adapted linears (RegMean's statistics).

For each module of the host's layout, ``G = X^T X / n`` over every token position ``x`` that
reaches the module when the task model runs on a batch (the RegMean reference's ``compute_gram``:
forward hooks, all positions of the batch, mean over them). The model is the host's base with the
given LoRA factors substituted (``None``: the bare base).
"""

from __future__ import annotations

import torch

from engine.tasks.base import Batch
from engine.tasks.functional import Factors, LoraHost


@torch.no_grad()
def input_grams(host: LoraHost, batch: Batch, factors: Factors | None = None) -> dict[str, torch.Tensor]:
    """``{module: G [d_in, d_in]}`` (float64) of the inputs of every layout module on ``batch``."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def recorder(name: str):
        def hook(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]

        return hook

    peft_model = host.model.base_model.model
    handles = [
        peft_model.get_submodule(spec.name).register_forward_hook(recorder(spec.name))
        for spec in host.layout.modules
    ]
    try:
        host.loss(factors, batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: sums[name] / counts[name] for name in sums}
