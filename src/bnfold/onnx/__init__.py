"""bnfold for ONNX: fold inference BatchNormalization nodes into neighbouring Conv, ConvTranspose, Gemm and MatMul.

The same plan (:mod:`bnfold.core.plan`) and affine math (:mod:`bnfold.affine`) as every format, applied to
initializers; works without torch (onnx and numpy, plus onnxruntime for verification).

>>> from bnfold import onnx as bnfold_onnx
>>> result = bnfold_onnx.fold("resnet18.onnx")          # verified in onnxruntime against the original
>>> result.report.print()                                 # what folded into what, and why anything stayed
>>> result.save("resnet18-folded.onnx")
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..core import pipeline
from ..errors import InvalidInputError, VerificationError
from ..report import MERGED, FoldReport
from .adapter import float_parameter_count, fold_graph
from .io import load, read, save
from .verification import TOLERANCES, default_tolerance, example_inputs, session, verify
from .verification import verify as _verify  # fold() has a parameter named verify

__all__ = ["OnnxFoldResult", "TOLERANCES", "default_tolerance", "fold", "load", "plan", "save", "verify"]


@dataclass
class OnnxFoldResult:
    """The folded model, its report, and what is needed to write it safely.

    Attributes:
        model: the folded ``onnx.ModelProto``.
        report: what was folded into what, and why anything stayed (with ``verification`` when checked).
        external_data: the source stored its tensors as external data (so :meth:`save` does too).
        sources: every file the model was read from (the graph and its external data files): :meth:`save` never
            writes over one of them.
        original: the model before folding, kept when the fold was verified, so that :meth:`save` can check the
            written file against it in the same way (``tolerance``, ``inputs``, ``seed``: those of the fold's check).
    """

    model: onnx.ModelProto
    report: FoldReport
    external_data: bool = False
    sources: tuple[Path, ...] = ()
    original: onnx.ModelProto | str | None = field(default=None, repr=False)  # what the fold was verified against
    tolerance: float | None = None
    inputs: dict[str, np.ndarray] | list[dict[str, np.ndarray]] | None = field(default=None, repr=False)
    seed: int = 0
    input_shape: Sequence[int] | dict[str, Sequence[int]] | None = None

    def save(self, path: str | os.PathLike[str], *, force: bool = False) -> dict[str, Any] | None:
        """Save the folded model (with external data beside it when the source had it), checked before it lands.

        Never over a file the model was read from (``force`` or not). The staged file is opened by its path in
        onnxruntime, with its data file beside it under its final name, exactly as a user's
        ``InferenceSession(path)`` opens it: a file that does not load is never renamed into place. When the fold
        was verified, the staged file is also compared with the original, on the same inputs and with the same
        tolerance as the fold's own check.

        Returns:
            The comparison of the written file with the original (:func:`verify`'s result as plain data,
            ``to_dict()``), or ``None`` when the fold was not verified.

        Raises:
            InvalidInputError: ``path`` is a source file, exists without ``force``, or cannot be written.
            VerificationError: the written file does not load in onnxruntime, or does not reproduce the
                original's outputs (nothing is written).
        """
        checked: dict[str, Any] = {}

        def read_back(staged: Path) -> None:
            try:  # opened by its path, as the user will open the written file
                session(staged)
            except Exception as error:
                first = (str(error).strip().splitlines() or [type(error).__name__])[0]
                raise VerificationError(
                    f"onnxruntime cannot open the ONNX file bnfold wrote for {Path(path).name} ({first}); "
                    "nothing was written: please report it"
                ) from error
            if self.original is None:
                return
            # The inputs the fold was judged on (same seed, same sizes), without searching the sizes again.
            shape = self.input_shape
            if shape is None and self.inputs is None:
                shape = dict((self.report.verification or {}).get("input_shapes") or {}) or None
            result = _verify(self.original, staged, inputs=self.inputs, seed=self.seed, tolerance=self.tolerance,
                             input_shape=shape)
            checked.update(result.to_dict())
            if not result.passed:
                raise VerificationError(
                    f"the written ONNX file does not reproduce the original's outputs ({result.worst()}); nothing "
                    "was written"
                )

        # None: io.save decides from the model's size, and refuses the files it will write if one is a source.
        save(self.model, path, force=force, external_data=self.external_data or None, check=read_back,
             sources=self.sources)
        return checked or None


def _resolve(model_or_path: Any) -> tuple[onnx.ModelProto, str, tuple[Path, ...]]:
    """The model, its name, and the files it was read from (none for a ModelProto in memory)."""
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path, model_or_path.graph.name or "model", ()
    if isinstance(model_or_path, (str, os.PathLike)):
        model, data_files = read(model_or_path)
        return model, Path(model_or_path).name, (Path(model_or_path), *data_files)
    raise InvalidInputError(
        f"expected an onnx.ModelProto or the path of an .onnx file, got {type(model_or_path).__name__}"
    )


def plan(model_or_path: onnx.ModelProto | str | os.PathLike[str], *, merge_branches: bool = False) -> FoldReport:
    """Dry run: what :func:`fold` would fold into what, and why anything would stay (``applied=False``).

    With ``merge_branches=True`` also which blocks of summed branches would merge (every format's preview,
    :func:`bnfold.core.pipeline.merge_preview`: a copy folded and merged, unverified; no file is written).
    """
    if merge_branches:
        return pipeline.merge_preview(fold(model_or_path, verify=False, merge_branches=True).report)
    model, name, _ = _resolve(model_or_path)
    return fold_graph(model, name, applied=False)[1]


def fold(
    model_or_path: onnx.ModelProto | str | os.PathLike[str],
    *,
    verify: bool = True,
    tolerance: float | None = None,
    inputs: dict[str, np.ndarray] | list[dict[str, np.ndarray]] | None = None,
    seed: int = 0,
    input_shape: Sequence[int] | dict[str, Sequence[int]] | None = None,
    merge_branches: bool = False,
) -> OnnxFoldResult:
    """Fold every foldable BatchNormalization of a copy of the model (the caller's ModelProto is not modified).

    With ``merge_branches=True``, summed parallel branches of one input (RepVGG / MobileOne / RepViT blocks) are
    then merged into one Conv, as :func:`bnfold.fold` does for an ``nn.Module`` (:mod:`bnfold.core.merge` says
    when that is exact); ``report.merges`` lists every block merged or left, with the reason.

    Args:
        verify: run the original and the folded model in onnxruntime and compare (``report.verification``).
        tolerance, inputs, seed, input_shape: those of that comparison, as for :func:`verify`.

    Raises:
        InvalidInputError: the model cannot be read (see :func:`load`), or ``input_shape`` does not fit it.
        OriginalRunError: the original does not run on the inputs (nothing to judge the fold against).
        VerificationError: the folded model's outputs differ by more than rounding its weights explains (and than
            the tolerance), see :mod:`bnfold.judge`; or the original's own outputs vary from run to run.
    """
    model, name, sources = _resolve(model_or_path)
    if input_shape is not None:
        example_inputs(model, seed, input_shape, photographs=False)  # a shape that does not fit: say so first
    # A model read here (it has sources) belongs to nobody else: fold it in place, and verify against its file
    # (onnxruntime reads it itself) instead of keeping a copy of every weight. A caller's ModelProto is copied.
    folded, report = fold_graph(model, name, applied=True, copy=not sources)
    if merge_branches:
        folded = _merge(folded, name, report)
    original: onnx.ModelProto | str = os.fspath(model_or_path) if sources else model
    checked = verify and bool(report.folded or any(m.status == MERGED for m in report.merges))
    if checked:
        result = _verify(original, folded, inputs=inputs, seed=seed, tolerance=tolerance, input_shape=input_shape)
        report.verification = result.to_dict()
        if not result.passed:
            raise VerificationError(f"{name}: the folded model is refused: {result.worst()}")
    return OnnxFoldResult(folded, report, external_data=len(sources) > 1, sources=sources,
                          original=original if checked else None, tolerance=tolerance, inputs=inputs, seed=seed,
                          input_shape=input_shape)


def _merge(folded: onnx.ModelProto, name: str, report: FoldReport) -> onnx.ModelProto:
    """Merge the branches of ``folded`` (owned here), folding what each round makes foldable; update ``report``."""
    from ..core.merge_rounds import merge_rounds
    from .merges import OnnxMerges

    merges = OnnxMerges(folded, name)
    outcome = merge_rounds(merges)
    report.absorb_merged_norms(outcome.absorbed_norms, merges.folded_norms)
    report.merges = outcome.entries
    report.notes.extend(n for n in merges.notes if n not in report.notes)
    report.parameters_after = float_parameter_count(outcome.model.graph)
    return outcome.model
