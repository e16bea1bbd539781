"""bnfold: fold Batch Normalization into neighbouring conv / linear layers, losslessly, in every format.

>>> import torch, torchvision, bnfold
>>> model = torchvision.models.resnet50().eval()
>>> folded = bnfold.fold(model)                # a ResNet again, 53 BN layers fewer
>>> print(bnfold.report_for(folded))           # what was folded into what, and why anything was left
>>> bnfold.save(folded, "resnet50-folded.pt")  # staged, read back, never over a file the fold read

The same call folds a ``torch.jit.ScriptModule``, a ``torch.export.ExportedProgram``, an ``onnx.ModelProto`` or the
path of any of their files, and returns the same kind (:mod:`bnfold.api`).
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .errors import (
    BnfoldError,
    CaptureError,
    InvalidInputError,
    NonFiniteOutputError,
    NonFiniteStatisticsError,
    TrainingModeError,
    VerificationError,
)
from .report import FoldReport, MergeEntry, NormEntry

if TYPE_CHECKING:
    from .api import fold, plan, report_for, save
    from .bench import BenchmarkResult, benchmark
    from .judge import VerificationResult
    from .layers import (
        DEFAULT_REGISTRY,
        LayerRegistry,
        LinearLayerRule,
        NormRule,
        NormStatistics,
        register_layer,
        register_norm,
    )
    from .verification import verify

# Modules are imported on first use, so that `bnfold.onnx` and `bnfold.fold` of an ONNX model (and `bnfold.affine`,
# `bnfold.report`) work on a machine without PyTorch; `bnfold.api` imports PyTorch only for a PyTorch model.
_LAZY = {
    name: module
    for module, names in {
        "api": ("fold", "plan", "report_for", "save"),
        "verification": ("verify",),
        "judge": ("VerificationResult",),
        "bench": ("benchmark", "BenchmarkResult"),
        "layers": ("DEFAULT_REGISTRY", "LayerRegistry", "LinearLayerRule", "NormRule", "NormStatistics",
                   "register_layer", "register_norm"),
    }.items()
    for name in names
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        try:
            module = import_module(f".{_LAZY[name]}", __name__)
        except ModuleNotFoundError as error:
            if (error.name or "").split(".")[0] != "torch":
                raise
            raise ModuleNotFoundError(
                f"bnfold.{name} works on PyTorch models and needs PyTorch, which is not installed: "
                "pip install 'bnfold[torch]' (bnfold.onnx folds ONNX files without it)", name="torch"
            ) from error
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bnfold' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "DEFAULT_REGISTRY",
    "BnfoldError",
    "CaptureError",
    "FoldReport",
    "InvalidInputError",
    "LayerRegistry",
    "LinearLayerRule",
    "NonFiniteOutputError",
    "NonFiniteStatisticsError",
    "MergeEntry",
    "NormEntry",
    "NormRule",
    "NormStatistics",
    "TrainingModeError",
    "VerificationError",
    "VerificationResult",
    "BenchmarkResult",
    "benchmark",
    "verify",
    "fold",
    "plan",
    "register_layer",
    "register_norm",
    "report_for",
    "save",
]
