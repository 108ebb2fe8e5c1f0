"""A small CNN digit classifier, used only to evaluate generated samples (accuracy, Frechet distance).

``features(x)`` is the penultimate layer (``feature_dim`` values after a ReLU) the Frechet distance uses;
``forward(x) = head(features(x))`` gives logits over the 10 digits.
"""
from __future__ import annotations

import torch
from torch import nn


class DigitsClassifier(nn.Module):
    def __init__(self, channels: int = 32, feature_dim: int = 32, num_classes: int = 10):
        super().__init__()
        self.config = {"channels": channels, "feature_dim": feature_dim, "num_classes": num_classes}
        c = channels
        self.body = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(),
            nn.Flatten(),
            nn.Linear(2 * c * 16, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
