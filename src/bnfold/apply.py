"""Folding arithmetic for the graph folders that still hold tensors themselves (TorchScript, torch.export).

Transitional: both call :func:`forward_folded`, which is the core's arithmetic (:mod:`bnfold.core.apply`) on one
layer; module trees and ONNX graphs go through :func:`bnfold.core.apply.apply_plan`.
"""

from __future__ import annotations

import torch

from .backends.modules import TorchNumerics
from .core.apply import LayerTensors, Statistics, folded_forward, scale_shift
from .layers import NormStatistics


def forward_folded(
    weight: torch.Tensor, bias: torch.Tensor | None, statistics: NormStatistics, out_axis: int, groups: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """New ``(weight, bias)`` of a layer that absorbed the norm ``statistics`` on its output, in the weight's dtype."""
    numerics = TorchNumerics()
    stats = Statistics(statistics.mean, statistics.var, statistics.eps, statistics.gamma, statistics.beta)
    scale, shift = scale_shift(stats, numerics)
    return folded_forward(LayerTensors(weight, bias, out_axis, groups), scale.to(weight.device), shift.to(weight.device), numerics)
