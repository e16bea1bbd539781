"""bnfold: fold Batch Normalization into neighbouring conv / linear layers, losslessly, on any PyTorch model.

>>> import torch, torchvision, bnfold
>>> model = torchvision.models.resnet50().eval()
>>> folded = bnfold.fold(model)                # a ResNet again, 53 BN layers fewer
>>> print(bnfold.report_for(folded))           # what was folded into what, and why anything was left
"""

from .engine import fold, plan, report_for
from .errors import (
    BnfoldError,
    CaptureError,
    InvalidInputError,
    NonFiniteStatisticsError,
    TrainingModeError,
    VerificationError,
)
from .layers import DEFAULT_REGISTRY, LayerRegistry, LinearLayerRule, NormRule, NormStatistics, register_layer, register_norm
from .report import FoldReport, NormEntry

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_REGISTRY",
    "BnfoldError",
    "CaptureError",
    "FoldReport",
    "InvalidInputError",
    "LayerRegistry",
    "LinearLayerRule",
    "NonFiniteStatisticsError",
    "NormEntry",
    "NormRule",
    "NormStatistics",
    "TrainingModeError",
    "VerificationError",
    "fold",
    "plan",
    "register_layer",
    "register_norm",
    "report_for",
]
