"""Networks. Every model takes ``input_shape`` (C, H, W) and ``num_classes`` and its ``forward``
returns the logits: the last layer's pre-activation output that the upper-bound score needs."""

from __future__ import annotations

from collections.abc import Sequence
from math import prod
from pathlib import Path

import torch
from torch import Tensor, nn


class MLP(nn.Module):
    """Fully connected ReLU network on flattened inputs."""

    def __init__(
        self, input_shape: Sequence[int], num_classes: int, hidden_sizes: Sequence[int] = (256, 256)
    ):
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

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (32, 64),
        hidden_size: int = 128,
    ):
        super().__init__()
        c, h, w = input_shape
        layers: list[nn.Module] = []
        for out in channels:
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c, h, w = out, h // 2, w // 2
        if h < 1 or w < 1:
            raise ValueError(
                f"input {tuple(input_shape)} is too small for {len(channels)} pooling stages"
            )
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c * h * w, hidden_size),
            nn.ReLU(),
            nn.Linear(hidden_size, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


# ------------------------------------------------------------------ the paper's networks
class _WideBlock(nn.Module):
    """Pre-activation residual block of a wide ResNet (BN-ReLU-conv twice, projection shortcut
    when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float):
        super().__init__()
        self.bn1, self.conv1 = (
            nn.BatchNorm2d(c_in),
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
        )
        self.bn2, self.conv2 = nn.BatchNorm2d(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.shortcut = (
            nn.Conv2d(c_in, c_out, 1, stride, bias=False) if stride != 1 or c_in != c_out else None
        )

    def forward(self, x: Tensor) -> Tensor:
        o = torch.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(self.dropout(torch.relu(self.bn2(y))))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    """WRN-depth-k of Zagoruyko & Komodakis (2016); WRN-28-2 is the paper's CIFAR network.
    depth = 6n + 4 with n blocks per stage; stage widths 16k, 32k, 64k."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        depth: int = 28,
        widen_factor: int = 2,
        dropout: float = 0.0,
    ):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4 (10, 16, 22, 28, ...), got {depth}")
        n, widths = (depth - 4) // 6, [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        layers: list[nn.Module] = [nn.Conv2d(input_shape[0], widths[0], 3, 1, 1, bias=False)]
        for stage in range(3):
            for i in range(n):
                c_in = widths[stage] if i == 0 else widths[stage + 1]
                layers.append(
                    _WideBlock(c_in, widths[stage + 1], 2 if i == 0 and stage else 1, dropout)
                )
        layers += [nn.BatchNorm2d(widths[3]), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class TorchvisionResNet(nn.Module):
    """A torchvision ResNet for fine-tuning, with a new ``num_classes`` head (``fc``).

    ``weights``: None (random init), ``imagenet`` (torchvision's IMAGENET1K_V1 file, taken from
    the torch hub cache when it is there: nothing is downloaded during training) or a path to a
    state-dict file. ``freeze``: ``none`` or ``backbone`` (train only the new head). Grey
    images (``input_shape`` (1, H, W)) reach the RGB network as three equal channels.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        arch: str = "resnet50",
        weights: str | None = "imagenet",
        freeze: str = "none",
    ):
        super().__init__()
        import torchvision

        if arch not in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"):
            raise ValueError(
                f"model.arch={arch!r} is not a torchvision ResNet (resnet18 ... resnet152)"
            )
        if freeze not in ("none", "backbone"):
            raise ValueError(f"model.freeze must be none or backbone, got {freeze!r}")
        self.net = getattr(torchvision.models, arch)(weights=None)
        if weights is not None:
            self.net.load_state_dict(
                torch.load(_pretrained_file(arch, weights), map_location="cpu", weights_only=True)
            )
        self.net.fc = nn.Linear(self.net.fc.in_features, num_classes)
        self.grey = input_shape[0] == 1
        if freeze == "backbone":
            for name, p in self.net.named_parameters():
                p.requires_grad_(name.startswith("fc."))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.expand(-1, 3, -1, -1) if self.grey else x)


def _pretrained_file(arch: str, weights: str) -> Path:
    """The local file of pretrained weights: a path, or torchvision's ImageNet file in the hub cache."""
    if weights != "imagenet":
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model.weights={weights}: no such file")
        return path
    import torchvision

    enum = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.url).name
    if not path.is_file():
        raise FileNotFoundError(
            f"ImageNet weights for {arch} are not in {path.parent}. Fetch them once (needs internet): "
            f"python -c \"import torchvision; torchvision.models.{arch}(weights='IMAGENET1K_V1')\" "
            f"or set model.weights=/path/to/{arch}.pth (or model.weights=null for random init)"
        )
    return path


class LSTMClassifier(nn.Module):
    """LSTM over a sequence (n, L, features) -> logits from the last hidden state; the paper's
    model for pixel-by-pixel MNIST (input_shape = (784, 1))."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        hidden_size: int = 128,
        num_layers: int = 1,
    ):
        super().__init__()
        if len(input_shape) != 2:
            raise ValueError(
                f"LSTMClassifier needs sequence inputs (L, features), got {tuple(input_shape)}: "
                "use dataset=pixel_mnist"
            )
        self.lstm = nn.LSTM(input_shape[1], hidden_size, num_layers, batch_first=True)
        self.classifier = nn.Linear(hidden_size, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        # The recurrence stays in the weights' dtype (float32) under bf16 autocast: rounding the
        # hidden state at each of 784 steps compounds, and oneDNN (the CPU) has no bf16 LSTM for
        # every shape. A float64 model runs in float64.
        with torch.autocast(x.device.type, enabled=False):
            out, _ = self.lstm(x.to(self.lstm.weight_ih_l0.dtype))
        return self.classifier(out[:, -1])
