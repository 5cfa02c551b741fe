"""Small models the pruning tests share."""

from __future__ import annotations

import torch
from torch import nn


class TwoConvBN(nn.Module):
    """conv1 (2→4) + BN + ReLU, conv2 (4→3) + BN, mean pool, Linear: conv1's channels are prunable."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 3, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(self.bn2(self.conv2(x)).mean((2, 3)))
