"""A plain convolutional network without residual connections, for `specs/digits_measure.yaml`.

A `factory` for pnc: `build(num_classes, in_chans, widths)` returns an `nn.Module`; pnc passes `num_classes` and
`in_chans` from the dataset and the spec's `kwargs`. The model declares its blocks (`pnc_blocks`), so that
`measure.layers: blocks` taps each conv block like a ResNet's residual blocks.
"""
from __future__ import annotations

import torch
from torch import nn


class PlainCNN(nn.Module):
    def __init__(self, num_classes: int, in_chans: int, widths: list[int]):
        super().__init__()
        blocks, c = [], in_chans
        for i, w in enumerate(widths):
            blocks.append(nn.Sequential(nn.Conv2d(c, w, 3, stride=2 if i and i % 2 == 0 else 1, padding=1, bias=False),
                                        nn.BatchNorm2d(w), nn.ReLU(inplace=True)))
            c = w
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        self.pnc_blocks = [f"features.{i}" for i in range(len(widths))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def build(num_classes: int, in_chans: int = 3, widths: tuple[int, ...] = (16, 16, 32, 32, 64, 64)) -> nn.Module:
    torch.manual_seed(0)  # the untrained control is the same network every time
    return PlainCNN(num_classes, in_chans, list(widths))
