"""The segmentation head of Pinheiro & Collobert (CVPR 2015), Table 1.

Four unpadded 3x3 convolutions on top of the pretrained features (1024, 768, 512, K
channels, ReLU after the first three, dropout 0.5). Being unpadded, the head shrinks the
feature map by 8 cells in each direction: it needs at least 9x9 feature cells.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["DEFAULT_HEAD_WIDTHS", "MILHead"]

DEFAULT_HEAD_WIDTHS: tuple[int, int, int] = (1024, 768, 512)


class MILHead(nn.Module):
    """Features ``[B, C, H, W]`` -> class score maps ``[B, K, H - 2*margin, W - 2*margin]``."""

    kernel_size = 3

    def __init__(
        self,
        in_chs: int,
        num_classes: int,
        widths: Sequence[int] = DEFAULT_HEAD_WIDTHS,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not widths or any(w < 1 for w in widths):
            raise ValueError(f"head widths must be positive integers, got {list(widths)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.widths = tuple(int(w) for w in widths)
        self.num_classes = num_classes
        layers: list[nn.Module] = []
        chs = in_chs
        for width in self.widths:
            layers += [nn.Conv2d(chs, width, self.kernel_size), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            chs = width
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(chs, num_classes, self.kernel_size)
        nn.init.zeros_(self.classifier.bias)

    @property
    def margin(self) -> int:
        """Feature cells lost on each side by the unpadded convolutions."""
        return (len(self.widths) + 1) * (self.kernel_size // 2)

    @property
    def min_cells(self) -> int:
        """Smallest feature map side that still yields one score cell."""
        return 2 * self.margin + 1

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h, w = features.shape[-2:]
        if min(h, w) < self.min_cells:
            raise ValueError(
                f"feature map {h}x{w} is smaller than the {self.min_cells}x{self.min_cells} "
                "cells the unpadded head needs; use a larger input (or upscale it)"
            )
        return self.classifier(self.body(features))
