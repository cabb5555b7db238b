"""Learning-rate schedule of meta-training (pure Python; stateless, so a resumed run needs no
scheduler state: the rate is a function of the step alone)."""

from __future__ import annotations

import math

from engine.meta.config import TrainSection


def warmup_steps(train: TrainSection) -> int:
    """``train.warmup_steps``, or by default 5 % of the run, at most 100 steps."""
    if train.warmup_steps is not None:
        return train.warmup_steps
    return min(100, train.steps // 20)


def learning_rate(step: int, train: TrainSection) -> float:
    """The rate of optimiser step ``step`` (1-based).

    ``constant``: ``train.lr`` throughout. ``cosine``: a linear warm-up from ``lr / warmup`` to
    ``lr`` over the warm-up steps, then a half cosine down to ``min_lr_ratio x lr`` at the last step,
    so the last step's model (the artifact) is not taken at full rate, where a run can be mid-spike.
    """
    if train.lr_schedule == "constant":
        return train.lr
    warmup = warmup_steps(train)
    if step <= warmup:
        return train.lr * step / warmup
    # 0 at the first step after the warm-up (the full rate), 1 at the last (the floor)
    progress = min(1.0, (step - warmup - 1) / max(1, train.steps - warmup - 1))
    floor = train.min_lr_ratio
    return train.lr * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))
