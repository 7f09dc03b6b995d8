"""Networks. Every model takes ``input_shape`` (C, H, W) and ``num_classes`` and its ``forward``
returns the logits: the last layer's pre-activation output that the upper-bound score needs."""

from __future__ import annotations

from collections.abc import Sequence
from math import prod

from torch import Tensor, nn


class MLP(nn.Module):
    """Fully connected ReLU network on flattened inputs."""

    def __init__(self, input_shape: Sequence[int], num_classes: int,
                 hidden_sizes: Sequence[int] = (256, 256)):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = prod(input_shape)
        for h in hidden_sizes:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class CNN(nn.Module):
    """Small convolutional network: [conv3x3 - ReLU - maxpool2] per entry of ``channels``, then
    one hidden fully connected layer. No BatchNorm, so train and eval outputs agree."""

    def __init__(self, input_shape: Sequence[int], num_classes: int,
                 channels: Sequence[int] = (32, 64), hidden_size: int = 128):
        super().__init__()
        c, h, w = input_shape
        layers: list[nn.Module] = []
        for out in channels:
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c, h, w = out, h // 2, w // 2
        if h < 1 or w < 1:
            raise ValueError(f"input {tuple(input_shape)} is too small for {len(channels)} pooling stages")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c * h * w, hidden_size), nn.ReLU(), nn.Linear(hidden_size, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))
