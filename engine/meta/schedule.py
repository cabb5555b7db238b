"""Step control of meta-training, pure Python: the learning-rate schedule (stateless, so a resumed
run needs no scheduler state: the rate is a function of the step alone) and the spike guard."""

from __future__ import annotations

import collections
import math

import numpy as np

from engine.meta.config import TrainSection

SPIKE_WINDOW, SPIKE_WARMUP = 100, 20  # applied losses the spike guard compares with; when it starts


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


class SpikeGuard:
    """Decides whether to apply an episode's update: not when its loss is non-finite, nor when it
    exceeds ``factor`` x the median of the last ``SPIKE_WINDOW`` applied losses (once
    ``SPIKE_WARMUP`` are known), so an outlier episode's gradient (e.g. of an adapter the model
    maps to a huge code) never reaches AdamW's moments. Workers must feed it the same losses
    (their mean) so that they skip the same steps."""

    def __init__(self, factor: float | None):
        self.factor = factor
        self.recent: collections.deque[float] = collections.deque(maxlen=SPIKE_WINDOW)

    def accept(self, loss: float) -> bool:
        if not math.isfinite(loss):
            return False
        warm = self.factor is not None and len(self.recent) >= SPIKE_WARMUP
        if warm and loss > self.factor * float(np.median(self.recent)):
            return False
        self.recent.append(loss)
        return True
