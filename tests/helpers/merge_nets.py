"""Small networks of re-parameterisable blocks, and blocks that must not merge, for the ``merge_branches`` tests.

The module, TorchScript, ``.pt2`` and ONNX merge tests build the same networks, so that each format is checked on
the blocks the module API is checked on.
"""

from __future__ import annotations

import torch
from torch import nn


def conv_bn(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out))


class RepBlock(nn.Module):
    """RepVGG / MobileOne: 3x3 + 1x1 (+ BN(x) when the shapes allow), then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.kxk = conv_bn(c_in, c_out, 3, stride, groups)
        self.scale = conv_bn(c_in, c_out, 1, stride, groups)
        self.identity = nn.BatchNorm2d(c_in) if c_in == c_out and stride == 1 else None
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = 0 if self.identity is None else self.identity(x)
        out = self.scale(x)
        out += self.kxk(x)
        return self.act(out + identity)


class RepDw(nn.Module):
    """RepViT's token mixer: BN(dw3x3(x) + dw1x1(x) + x); the norm after the sum folds once the sum is one conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = conv_bn(channels, channels, 3, groups=channels)
        self.conv1 = nn.Conv2d(channels, channels, 1, groups=channels)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x) + self.conv1(x) + x)


def net() -> nn.Module:
    # the ReLU after RepDw keeps its norm from folding backward into the classifier
    return nn.Sequential(RepBlock(3, 8, stride=2), RepBlock(8, 8), RepBlock(8, 8, groups=8), RepDw(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


class Residual(nn.Module):
    """``dw3(x) + dw1(x) + bn(x)`` plus a residual of the block input (RepGhost's second ghost module)."""

    def __init__(self, shortcut: bool) -> None:
        super().__init__()
        self.primary = nn.Conv2d(4, 8, 1)
        self.dw3, self.dw1 = conv_bn(8, 8, 3, groups=8), conv_bn(8, 8, 1, groups=8)
        self.bn = nn.BatchNorm2d(8)
        self.shortcut = conv_bn(4, 8, 1) if shortcut else None

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        x = self.primary(y)
        out = self.dw3(x) + self.dw1(x) + self.bn(x)
        out += self.shortcut(y) if self.shortcut is not None else y.repeat(1, 2, 1, 1)
        return torch.relu(out)


class Differences(nn.Module):
    """Every way of writing a difference, a negation and a scale the module adapter reads."""

    def __init__(self, overwrite_input: bool = False) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.gamma = nn.Parameter(torch.randn(1, 4, 1, 1))
        self.register_buffer("beta", torch.randn(4, 1, 1))
        self.overwrite_input = overwrite_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(x)
        first = torch.sub(self.a(x), self.b(x)).mul_(self.gamma)  # (a - b) * gamma, in place on its own difference
        second = torch.rsub(self.bn(x), -self.c(x)) * 0.5  # (-c - bn) * 0.5
        third = x.mul_(self.beta) if self.overwrite_input else x * self.beta  # x * beta
        return first - second + third


class Unmergeable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.c, self.d = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.positions = nn.Parameter(torch.randn(4, 8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x) + self.b(x) * torch.sigmoid(x)  # a gate computed from the input
        return self.c(y) + self.d(y) * self.positions  # a scale per position, not per channel


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return (y + y) + self.b(x)
