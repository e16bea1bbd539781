"""bnfold for ONNX: fold inference BatchNormalization nodes into neighbouring Conv, ConvTranspose, Gemm and MatMul.

The same affine math as the PyTorch engine (:mod:`bnfold.affine`), applied to initializers; works without torch
(onnx and numpy, plus onnxruntime for verification).

>>> from bnfold import onnx as bnfold_onnx
>>> result = bnfold_onnx.fold("resnet18.onnx")          # verified in onnxruntime against the original
>>> result.report.print()                                 # what folded into what, and why anything stayed
>>> result.save("resnet18-folded.onnx")

Rules: a norm folds *forward* into the node producing its input (Conv 1-3D with groups, ConvTranspose, Gemm,
2-D MatMul, MatMul + constant Add) when that output feeds nothing else; otherwise *backward* into the nodes reading
its output when all of them can take it exactly (Gemm, 2-D MatMul, Conv without padding). Anything else stays,
with the reason in the report.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..errors import InvalidInputError, VerificationError
from ..report import FoldReport
from .adapter import fold_graph
from .io import load, read, save
from .verification import TOLERANCES, default_tolerance, verify

__all__ = ["OnnxFoldResult", "TOLERANCES", "default_tolerance", "fold", "load", "plan", "save", "verify"]


@dataclass
class OnnxFoldResult:
    """The folded model, its report, and whether the source stored its tensors as external data."""

    model: onnx.ModelProto
    report: FoldReport
    external_data: bool = False

    def save(self, path: str | os.PathLike[str], *, force: bool = False) -> None:
        """Save the folded model (with external data beside it when the source had it)."""
        save(self.model, path, force=force, external_data=True if self.external_data else None)


def _resolve(model_or_path: Any) -> tuple[onnx.ModelProto, str, bool]:
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path, model_or_path.graph.name or "model", False
    if isinstance(model_or_path, (str, os.PathLike)):
        model, external = read(model_or_path)
        return model, Path(model_or_path).name, external
    raise InvalidInputError(
        f"expected an onnx.ModelProto or the path of an .onnx file, got {type(model_or_path).__name__}"
    )


def plan(model_or_path: onnx.ModelProto | str | os.PathLike[str]) -> FoldReport:
    """Dry run: what :func:`fold` would fold into what, and why anything would stay (``applied=False``)."""
    model, name, _ = _resolve(model_or_path)
    return fold_graph(model, name, applied=False)[1]


def fold(
    model_or_path: onnx.ModelProto | str | os.PathLike[str],
    *,
    verify: bool = True,
    tolerance: float | None = None,
    inputs: dict[str, np.ndarray] | None = None,
    seed: int = 0,
) -> OnnxFoldResult:
    """Fold every foldable BatchNormalization of a copy of the model (the caller's ModelProto is not modified).

    Args:
        verify: run the original and the folded model in onnxruntime and compare (``report.verification``).
        tolerance: relative tolerance for the comparison; by default from the outputs' dtype.
        inputs, seed: inputs for the comparison by name; the others are random with ``seed``.

    Raises:
        InvalidInputError: the model cannot be read (see :func:`load`).
        VerificationError: the folded model's outputs differ by more than the tolerance.
    """
    model, name, external = _resolve(model_or_path)
    folded, report = fold_graph(model, name, applied=True)
    if verify and report.folded:
        result = _verify(model, folded, inputs=inputs, seed=seed, tolerance=tolerance)
        report.verification = result
        if not result["passed"]:
            worst = result["worst_output"]
            raise VerificationError(
                f"{name}: folded output '{worst}' differs from the original by {result['max_relative']:.3g} "
                f"(relative; max abs {result['outputs'][worst]['max_abs']:.3g}), above the tolerance "
                f"{result['tolerance']:g}; pass a larger tolerance if the model is badly conditioned, or report it"
            )
    return OnnxFoldResult(folded, report, external)


_verify = verify
