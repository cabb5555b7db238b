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
