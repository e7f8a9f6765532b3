"""Model zoo. Every builder takes the dataset's input shape (C, H, W) and class count."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class LeNet300(nn.Module):
    """LeNet-300-100: a 784-300-100-10 MLP on flattened images."""

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        c, h, w = in_shape
        self.fc1 = nn.Linear(c * h * w, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x):
        x = torch.relu(self.fc1(x.flatten(1)))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


class LeNet5(nn.Module):
    """LeNet-5: conv 6 (5x5, pad 2) - pool - conv 16 (5x5) - pool - fc 120 - 84 - classes.

    ReLU runs after max-pooling, not before: max and ReLU commute, so outputs and gradients are the
    same bits (tests/test_models.py), and ReLU and its backward touch a quarter of the elements
    (`perf limit` times both orders; docs/scaling.md)."""

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        c, h, w = in_shape
        self.conv1 = nn.Conv2d(c, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.pool = nn.MaxPool2d(2)
        flat = 16 * ((h // 2 - 4) // 2) * ((w // 2 - 4) // 2)
        self.fc1 = nn.Linear(flat, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x):
        x = torch.relu(self.pool(self.conv1(x)))
        x = torch.relu(self.pool(self.conv2(x)))
        x = torch.relu(self.fc1(x.flatten(1)))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


VGG_CONFIGS = {
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """CIFAR VGG with BatchNorm: 3x3 convs, five max-pools, global average pool, one linear layer.
    The global pool makes the same net work on 64x64 inputs."""

    def __init__(self, config: list, in_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_shape[0]
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1, bias=False), nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
                channels = item
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 with the CIFAR stem (3x3 conv, stride 1, no max-pool); global pool for any size."""

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_shape[0], 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        blocks, cin = [], 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(self.pool(self.layers(x)).flatten(1))


MODELS: dict[str, Callable[[tuple[int, int, int], int], nn.Module]] = {
    "lenet300": LeNet300,
    "lenet5": LeNet5,
    "vgg16": lambda shape, classes: VGG(VGG_CONFIGS["vgg16"], shape, classes),
    "vgg19": lambda shape, classes: VGG(VGG_CONFIGS["vgg19"], shape, classes),
    "resnet18": ResNet18,
}

#: Models with convolutions, which use channels_last on CUDA.
CONV_MODELS = {"lenet5", "vgg16", "vgg19", "resnet18"}


def build(arch: str, in_shape: tuple[int, int, int], num_classes: int, seed: int | None = None) -> nn.Module:
    """Build ``arch``; with ``seed`` the initial weights depend only on it."""
    if arch not in MODELS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of: {', '.join(MODELS)}")
    if seed is None:
        return MODELS[arch](tuple(in_shape), num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[arch](tuple(in_shape), num_classes)
