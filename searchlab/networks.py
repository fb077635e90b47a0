"""searchlab's built-in networks, entries of the `model` group like any network of a user's.

Each takes `input_shape` (one sample's shape) and `num_outputs` (classes, or regression targets) from searchlab, and
its architecture and regularization from the YAML. L1 is not here: it is a loss setting of the module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn


class MLP(nn.Sequential):
    """`depth` hidden layers of `width` units, each Linear (+ BatchNorm1d) + ReLU (+ Dropout), then a linear layer."""

    def __init__(self, input_shape: Sequence[int], num_outputs: int, width: int = 256, depth: int = 2,
                 dropout: float = 0.0, batch_norm: bool = False) -> None:
        layers: list[nn.Module] = [nn.Flatten()]
        width_in = math.prod(input_shape)
        for _ in range(depth):
            layers.append(nn.Linear(width_in, width))
            if batch_norm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width_in = width
        layers.append(nn.Linear(width_in, num_outputs))
        super().__init__(*layers)


class CNN(nn.Sequential):
    """`depth` blocks of 3x3 conv (`width` channels, doubled per block) (+ BatchNorm2d) + ReLU + 2x2 max-pool while
    the image is larger than 2x2; then global average pooling (+ Dropout) and a linear layer."""

    def __init__(self, input_shape: Sequence[int], num_outputs: int, width: int = 32, depth: int = 2,
                 dropout: float = 0.0, batch_norm: bool = False) -> None:
        if len(input_shape) != 3:
            raise ValueError(f"needs image-shaped samples (C, H, W), but this data's samples have shape "
                             f"{tuple(input_shape)}; use model=mlp, or a network of your own for this shape")
        channels, size, _ = input_shape
        layers: list[nn.Module] = []
        for block in range(depth):
            out = width * 2**block
            layers.append(nn.Conv2d(channels, out, kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU())
            if size > 2:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            channels = out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(channels, num_outputs))
        super().__init__(*layers)
