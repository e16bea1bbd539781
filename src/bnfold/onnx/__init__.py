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

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..errors import InvalidInputError, VerificationError
from ..report import FOLDED, MERGE, MERGED, FoldReport, NormEntry
from .adapter import float_parameter_count, fold_graph
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
    merge_branches: bool = False,
) -> OnnxFoldResult:
    """Fold every foldable BatchNormalization of a copy of the model (the caller's ModelProto is not modified).

    With ``merge_branches=True``, summed parallel branches of one input (RepVGG / MobileOne / RepViT blocks) are
    then merged into one Conv, as :func:`bnfold.fold` does for an ``nn.Module`` (:mod:`bnfold.core.merge` says
    when that is exact); ``report.merges`` lists every block merged or left, with the reason.

    Args:
        verify: run the original and the folded model in onnxruntime and compare (``report.verification``).
        tolerance: relative tolerance for the comparison; by default from the outputs' dtype.
        inputs, seed: inputs for the comparison by name; the others are random with ``seed``.
        merge_branches: also merge summed parallel branches into one Conv.

    Raises:
        InvalidInputError: the model cannot be read (see :func:`load`).
        VerificationError: the folded model's outputs differ by more than the tolerance.
    """
    model, name, external = _resolve(model_or_path)
    folded, report = fold_graph(model, name, applied=True)
    if merge_branches:
        folded = _merge(folded, name, report)
    if verify and (report.folded or any(m.status == MERGED for m in report.merges)):
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


def _merge(folded: onnx.ModelProto, name: str, report: FoldReport) -> onnx.ModelProto:
    """Merge the branches of ``folded`` (owned here), folding what each round makes foldable; update ``report``."""
    from .merges import merge_rounds

    def fold_again(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, NormEntry]]:
        again, again_report = fold_graph(model, name, applied=True)
        return again, {entry.name: entry for entry in again_report.folded}

    outcome = merge_rounds(folded, fold_again)
    report.entries = [
        dataclasses.replace(e, status=FOLDED, into=(outcome.absorbed_norms[e.name],), direction=MERGE, reason=None)
        if e.name in outcome.absorbed_norms
        else dataclasses.replace(outcome.folded_norms[e.name], kind=e.kind, channels=e.channels)
        if e.name in outcome.folded_norms
        else e
        for e in report.entries
    ]
    report.merges = outcome.entries
    report.notes.extend(n for n in outcome.notes if n not in report.notes)
    report.parameters_after = float_parameter_count(outcome.model.graph)
    return outcome.model


_verify = verify
