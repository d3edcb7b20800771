"""One CIFAR ResNet-18 expert, with torchvision's parameter names.

A 3x3 stride-1 stem and no max-pool (the CIFAR variant), four stages of two basic blocks
with widths ``w, 2w, 4w, 8w``, global average pooling and a linear head. The state_dict keys
are torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer2.0.downsample.0``, ``fc``),
so a torchvision ``resnet18`` with a 3x3 stride-1 ``conv1`` and ``maxpool = Identity`` loads
into it and back.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["BasicBlock", "ResNet18", "STAGE_STRIDES", "stage_widths"]

STAGE_STRIDES = (1, 2, 2, 2)
BLOCKS_PER_STAGE = 2


def stage_widths(width: int) -> tuple[int, int, int, int]:
    return (width, 2 * width, 4 * width, 8 * width)


def _check_width(width) -> int:
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive int (64 is the real model), got {width!r}")
    return width


def _check_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return num_classes


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNet18(nn.Module):
    """CIFAR ResNet-18: ``forward(x [B,3,H,W]) -> logits [B,num_classes]``.

    ``x`` is the already-normalized image (normalization lives in the mixture).
    """

    def __init__(self, num_classes: int = 10, width: int = 64):
        super().__init__()
        self.num_classes = _check_classes(num_classes)
        self.width = _check_width(width)
        widths = stage_widths(width)
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        in_planes = width
        for i, (planes, stride) in enumerate(zip(widths, STAGE_STRIDES)):
            blocks = []
            for j in range(BLOCKS_PER_STAGE):
                blocks.append(BasicBlock(in_planes, planes, stride if j == 0 else 1))
                in_planes = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected input [B,3,H,W], got shape {tuple(x.shape)}")
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.fc(out)
