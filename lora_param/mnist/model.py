"""The tutorial's MLP: 784 -> 1000 -> 2000 -> 10 with ReLU."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class MLP(nn.Module):
    """Three linear layers (2,807,010 parameters with the default sizes).

    Args:
        hidden1: Width of the first hidden layer.
        hidden2: Width of the second hidden layer.
    """

    def __init__(self, hidden1: int = 1000, hidden2: int = 2000) -> None:
        super().__init__()
        self.linear1 = nn.Linear(28 * 28, hidden1)
        self.linear2 = nn.Linear(hidden1, hidden2)
        self.linear3 = nn.Linear(hidden2, 10)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        """Logits (N, 10) for images (N, 784) or (N, 1, 28, 28)."""
        x = x.reshape(-1, 28 * 28)
        x = self.relu(self.linear1(x))
        x = self.relu(self.linear2(x))
        return self.linear3(x)


LINEAR_LAYERS = ("linear1", "linear2", "linear3")


def build_model(seed: int = 0, device: torch.device | str = "cpu") -> MLP:
    """A freshly initialised MLP; the same seed gives the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MLP()
    return model.to(device)
