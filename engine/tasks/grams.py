"""Gram matrices of the inputs of a model's LoRA-adapted linears (RegMean's statistics).

For each module of the host's layout, ``G = X^T X / n`` over the token positions ``x`` that reach
the module when the task model runs on a batch (the RegMean reference's ``compute_gram``: forward
hooks, mean over positions). Padding positions (``attention_mask == 0``) are left out, so a Gram
matrix depends on the examples only, never on how they were batched: sums over any split of the
examples into batches add up to the same statistics. The model is the host's base with the given
LoRA factors substituted (``None``: the bare base).
"""

from __future__ import annotations

import torch

from engine.tasks.base import Batch
from engine.tasks.functional import Factors, LoraHost


@torch.no_grad()
def input_gram_sums(
    host: LoraHost, batch: Batch, factors: Factors | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """``({module: X^T X [d_in, d_in]} float64, {module: n})`` over the real (unpadded) positions
    of ``batch``: the additive parts of :func:`input_grams`."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    mask = batch.get("attention_mask")

    def recorder(name: str):
        def hook(module, args, output):
            x = args[0].detach()
            if mask is not None and x.shape[:-1] == mask.shape:
                x = x[mask.to(x.device).bool()]  # [positions, d_in], padding dropped
            x = x.reshape(-1, x.shape[-1]).double()
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
    return sums, counts


def input_grams(host: LoraHost, batch: Batch, factors: Factors | None = None) -> dict[str, torch.Tensor]:
    """``{module: G [d_in, d_in]}`` (float64) of the inputs of every layout module on ``batch``."""
    sums, counts = input_gram_sums(host, batch, factors)
    return {name: sums[name] / counts[name] for name in sums}
