"""The lab's one LoRA training loop, shared by both suites."""

from __future__ import annotations

from collections.abc import Callable

import torch


def run_training(
    peft_model,
    index: torch.Tensor,
    steps: int,
    checkpoints: list[int],
    seed: int,
    lr: float,
    batch_size: int,
    on_checkpoint: Callable[[int], None],
    batch_loss: Callable[[torch.Tensor], torch.Tensor],
    warmup: int = 0,
) -> None:
    """AdamW on the trainable parameters over rows ``index``: linear warm-up over ``warmup`` steps,
    then a constant learning rate (checkpoints along the run are comparable snapshots); batches
    drawn without replacement epoch by epoch; ``batch_loss(rows [b])`` gives the scalar loss;
    ``on_checkpoint(step)`` at each listed step, in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup)))
    batch_size = min(batch_size, len(index))
    order: list[int] = []
    peft_model.train()
    for step in range(1, steps + 1):
        if len(order) < batch_size:
            order.extend(index[torch.randperm(len(index), generator=generator)].tolist())
        rows, order = torch.tensor(order[:batch_size]), order[batch_size:]
        loss = batch_loss(rows)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step in checkpoints:
            peft_model.eval()
            on_checkpoint(step)
            peft_model.train()
    peft_model.eval()
