"""Deterministic feature extractors: convolutional for images, fully connected for tables."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class CNNBackbone(nn.Module):
    """Convolutional blocks with batch norm, then global average pooling.

    Each block is ``convs_per_block`` times (3x3 convolution, batch norm, ReLU) followed by
    2x2 max pooling, so an input of side ``H`` leaves the last block at ``H / 2**len(widths)``
    (floored, and never below 1 because pooling stops once the map is 1x1). Global average
    pooling then makes the output independent of the input size, so the same class serves
    32x32 CIFAR images and larger scans.

    Parameters
    ----------
    in_channels : int
        Channels of the input images (3 for RGB, 1 for grayscale).
    widths : sequence of int
        Output channels of each block. The feature dimension is ``widths[-1]``.
    convs_per_block : int
        Convolutions in each block.
    dropout : float
        Dropout probability applied to the pooled features during training.

    Shapes
    ------
    ``(batch, in_channels, H, W)`` in, ``(batch, widths[-1])`` out.
    """

    def __init__(
        self,
        in_channels: int = 3,
        widths: Sequence[int] = (32, 64, 128),
        convs_per_block: int = 2,
        dropout: float = 0.0,
    ):
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be at least 1, got {in_channels}")
        if not widths or any(int(w) < 1 for w in widths):
            raise ValueError(f"widths must be a non-empty list of positive ints, got {widths}")
        if convs_per_block < 1:
            raise ValueError(f"convs_per_block must be at least 1, got {convs_per_block}")
        self.in_channels = int(in_channels)
        self.widths = tuple(int(w) for w in widths)
        self.convs_per_block = int(convs_per_block)
        self.out_features = self.widths[-1]

        layers: list[nn.Module] = []
        channels = self.in_channels
        for width in self.widths:
            for _ in range(self.convs_per_block):
                layers += [
                    nn.Conv2d(channels, width, kernel_size=3, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                ]
                channels = width
            layers.append(_PoolIfLarger())
        self.blocks = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise ValueError(
                f"expected images of shape (batch, {self.in_channels}, H, W), "
                f"got {tuple(images.shape)}"
            )
        features = self.pool(self.blocks(images)).flatten(1)
        return self.dropout(features)


class MLPBackbone(nn.Module):
    """Fully connected layers with ReLU, the feature extractor for tabular inputs.

    Parameters
    ----------
    in_features : int
        Columns of the input table.
    widths : sequence of int
        Output size of each hidden layer. The feature dimension is ``widths[-1]``.

    Shapes
    ------
    ``(batch, in_features)`` in, ``(batch, widths[-1])`` out.
    """

    def __init__(self, in_features: int, widths: Sequence[int] = (32, 64, 128)):
        super().__init__()
        if in_features < 1:
            raise ValueError(f"in_features must be at least 1, got {in_features}")
        if not widths or any(int(w) < 1 for w in widths):
            raise ValueError(f"widths must be a non-empty list of positive ints, got {widths}")
        self.in_features = int(in_features)
        self.widths = tuple(int(w) for w in widths)
        self.out_features = self.widths[-1]
        layers: list[nn.Module] = []
        size = self.in_features
        for width in self.widths:
            layers += [nn.Linear(size, width), nn.ReLU()]
            size = width
        self.layers = nn.Sequential(*layers)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.dim() != 2 or inputs.shape[1] != self.in_features:
            raise ValueError(
                f"expected inputs of shape (batch, {self.in_features}), got {tuple(inputs.shape)}"
            )
        return self.layers(inputs)


class _PoolIfLarger(nn.Module):
    """2x2 max pooling that leaves maps of side 1 unchanged (for 8x8 digits)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < 2:
            return x
        return nn.functional.max_pool2d(x, 2)


def is_frozen(module: nn.Module) -> bool:
    """Return True when the module has parameters and none of them requires a gradient."""
    params = list(module.parameters())
    return bool(params) and not any(p.requires_grad for p in params)


def freeze(module: nn.Module) -> nn.Module:
    """Stop gradients for every parameter of ``module`` and return it."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module
