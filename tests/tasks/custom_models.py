"""A custom ``nn.Module`` classifier for the ``custom`` task kind (imported by factory path)."""

from __future__ import annotations

import torch
from torch import nn


class TinyMLP(nn.Module):
    """``x [n, d_in] -> logits [n, num_labels]`` through two hidden layers."""

    def __init__(self, d_in: int = 4, hidden: int = 8, num_labels: int = 3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, num_labels)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc2(torch.relu(self.fc1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def tiny_mlp(**kwargs) -> TinyMLP:
    return TinyMLP(**kwargs)


# One body, one head per task: the common multi-task classification setup (the factory takes the
# task). Examples: ``input`` [4] floats; labels per task below.
TASK_CLASSES = {"sign": 2, "argmax": 4, "parity": 2}


class MultiHeadMLP(nn.Module):
    """``x [n, d_in] -> logits [n, C_task]``: a shared body (``fc1``, ``fc2``) and the task's head."""

    def __init__(self, task: str, d_in: int = 4, hidden: int = 16):
        super().__init__()
        # The body is built first, so under one seed it is the same whatever the task.
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, TASK_CLASSES[task])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def multi_head_mlp(task: str, **kwargs) -> MultiHeadMLP:
    return MultiHeadMLP(task, **kwargs)


def multi_head_label(task: str, x: list[float]) -> int:
    """The label of ``x`` for ``task`` (what the examples files hold)."""
    if task == "sign":
        return int(x[0] + x[1] > 0)
    if task == "argmax":
        return max(range(len(x)), key=lambda i: x[i])
    return int(sum(v > 0 for v in x) % 2)
