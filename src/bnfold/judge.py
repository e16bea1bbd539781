"""The one rule that judges a fold, in every format: is the difference what rounding the folded weights explains?

A fold replaces each touched weight ``w`` by a product rounded to the weight's dtype, so a correct fold moves the
model's outputs by what *one rounding step of the touched weights* does to them, and no more. That is measured on
the model itself, on the same inputs, in the same runtime (onnxruntime has no float64 kernels for most ops, so a
float64 truth is not available in every format; this needs none)::

    error  E = max |F - O|               F: folded outputs, O: the original's
    floor  N = max |P - O|               P: the original's outputs with every tensor the fold touched (the layer's
                                            weight and bias, the norm's statistics and affine) moved one step of
                                            its dtype (its next representable value, up or down, seeded)
    allowance A = FLOOR_FACTOR * N + eps * max |O|

and the fold is accepted when ``E <= A``, or when ``E / max|O|`` is within the fixed relative tolerance of the
dtype (:data:`bnfold.verification.TOLERANCES`), which is what bnfold accepted before. That relative error is taken
against the output's largest magnitude, not element by element: element-wise relative errors explode where the
original is near zero, which says nothing about the fold.

Why it is right on trained models: a detector's sigmoid map driven to 1e-5 everywhere (random inputs saturate
it) shrinks the fold's error and the floor alike, by the slope of the sigmoid, so ``E / A`` stays near its usual
value where the relative error ``E / max|O|`` measures only rounding. Why it still refuses a wrong fold: a scale off
by 1e-3 on one channel is thousands of rounding steps, so ``E`` is thousands of times ``N`` (``FLOOR_FACTOR`` is 4).
The floor is measured between the original and a perturbed original, never against the folded model, so a wrong
fold cannot widen its own allowance.

No torch here (numpy, imported when outputs are compared): each format flattens its outputs to ``{path:
value}`` for :func:`compare`, and every format's check answers with one :class:`VerificationResult`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

FLOOR_FACTOR = 4.0
"""How many noise floors a correct fold may differ by. The floor is one draw of the rounding pattern, while the
fold rounds every touched weight by up to half a step; across the test zoo and the trained files of
``benchmarks/real_files.py`` the ratio error / floor stays below 1.5."""

PERTURB_SEED = 1234
"""Seed of the up / down choice of each perturbed value (the floor is reproducible run to run)."""


@dataclass(frozen=True)
class OutputError:
    """One output's judgement: its error, the allowance it is held to, and its relative error (for the tolerance).

    ``path``: the output's place in a PyTorch output structure (``"[0]"``, ``"['boxes']"``, ``""`` for a lone
    tensor) or the name of an ONNX output.
    """

    path: str
    max_abs: float  # max |F - O|
    relative: float  # max_abs / max |O|
    shape: tuple[int, ...]
    allowance: float | None = None  # FLOOR_FACTOR * floor + one rounding of the output; None without a floor
    floor: float | None = None  # max |P - O|

    def within(self, tolerance: float) -> bool:
        """Whether the output passes: within the fixed relative ``tolerance``, or within its allowance."""
        return self.relative <= tolerance or (self.allowance is not None and self.max_abs <= self.allowance)

    def describe(self, tolerance: float) -> str:
        """``"error 2.1e-07 against allowance 9.5e-07 (relative 0.0135, tolerance 1e-04)"``."""
        against = f" against allowance {self.allowance:.3g}" if self.allowance is not None else ""
        return f"error {self.max_abs:.3g}{against} (relative {self.relative:.3g}, tolerance {tolerance:g})"


def output_error(error: float, scale: float, eps: float, floor: float | None, path: str = "",
                 shape: tuple[int, ...] = ()) -> OutputError:
    """Judge one output (it passes when :meth:`OutputError.within` the tolerance).

    Args:
        error: ``max |F - O|``, the folded model's largest difference from the original.
        scale: ``max |O|``, the original output's largest magnitude.
        eps: the machine epsilon of the output's dtype (one rounding of the output is ``eps * scale``).
        floor: ``max |P - O|`` (see the module docstring), or ``None`` when it was not measured.

    NaN anywhere fails: a NaN error passes nothing, a NaN floor allows only one rounding of the output.
    """
    relative = error / scale if scale > 0 else (0.0 if error == 0 else math.inf)
    allowance = None
    if floor is not None:
        allowance = FLOOR_FACTOR * floor + eps * scale if math.isfinite(floor) else eps * scale
    return OutputError(path, error, relative, shape, allowance, floor)


def not_comparable(where: str, size: int, nan_original: int, nan_folded: int, same_infinities: bool) -> str | None:
    """Why output ``where`` (of ``size`` values) cannot be compared, or ``None``.

    A NaN carries no value to compare, so an output holding NaN (in either model) leaves the check undecided, never
    passed: two all-NaN outputs "differ by 0" only because NaN is skipped. An infinity is a value: the same
    infinity (same sign) at the same places in both outputs counts as equal, and the finite rest is compared.
    """
    if nan_original:
        return (f"{where} of the original model holds NaN ({nan_original} of {size} values) on these inputs, so the "
                "outputs are not finite and the check could not be made; check the model (weights, norm statistics) "
                "and the inputs")
    if nan_folded:
        return f"{where} of the folded model holds NaN ({nan_folded} of {size} values) where the original's is a number"
    if not same_infinities:
        return f"{where} is infinite at different places (or with different signs) in the original and the folded model"
    return None


Numbers = Callable[[Any], "tuple[Any, float | None] | None"]  # how a format reads an output (see compare)


def numpy_numbers(value: Any) -> tuple[Any, float | None]:
    """An ONNX output as :func:`compare` reads it: complex as (real, imaginary) pairs (both parts judged); a float dtype
    numpy does not know (``ml_dtypes``' bfloat16) is compared by value with eps 0, so without a floor."""
    import numpy as np

    array = np.asarray(value)
    if array.dtype.kind in "biu":
        return array, None
    if array.dtype.kind == "c":
        return np.stack([array.real, array.imag], axis=-1).astype(np.float64), float(np.finfo(array.dtype).eps)
    return array.astype(np.float64), float(np.finfo(array.dtype).eps) if array.dtype.kind == "f" else 0.0


def compare(original: dict[str, Any], candidate: dict[str, Any], tolerance: float,
            perturbed: dict[str, Any] | None = None, numbers: Numbers = numpy_numbers) -> VerificationResult:
    """Judge every output of the original against the candidate's, in every format.

    Args:
        original / candidate / perturbed: the outputs of the original, of the folded model and of the perturbed
            original (the noise floor, when measured), flat by path (PyTorch) or name (ONNX).
        numbers: how the format reads an output (:func:`numpy_numbers`): ``None`` for a value that is no array
            (compared with ``==``); for an array ``(values, eps)``. With ``eps`` ``None`` the output is compared
            exactly: its error is the number of differing values, its relative error 1 when there is one. Otherwise
            ``values`` is float64 and ``eps`` the machine epsilon of the output's dtype; an output with ``eps`` 0 gets
            no floor.

    Shapes that differ are problems; NaN, or unmatched infinities, make an output not comparable
    (:func:`not_comparable`); the rest is judged over the original's finite places (:func:`output_error`).
    """
    import numpy as np

    result = VerificationResult([], tolerance)
    for path, value in original.items():
        where = output_label(path)
        if path not in candidate:
            result.problems.append(f"{where} is missing in the folded model")
            continue
        mine, theirs = numbers(value), numbers(candidate[path])
        if mine is None:
            if value != candidate[path]:
                result.problems.append(f"{where} differs: {value!r} vs {candidate[path]!r}")
            continue
        a, eps = mine
        if theirs is None or theirs[0].shape != a.shape:
            shown = list(theirs[0].shape) if theirs is not None else [type(candidate[path])]
            result.problems.append(f"{where} has shape {list(a.shape)} vs {shown}")
            continue
        if eps is None:
            mismatches = int((a != theirs[0]).sum())
            result.outputs.append(OutputError(path, float(mismatches), float(mismatches > 0), tuple(a.shape)))
            continue
        b, infinite = np.asarray(theirs[0], dtype=np.float64), np.isinf(a)
        problem = not_comparable(where, a.size, int(np.isnan(a).sum()), int(np.isnan(b).sum()),
                                 np.array_equal(infinite, np.isinf(b)) and np.array_equal(a[infinite], b[infinite]))
        if problem:
            result.not_finite.append(problem)
            continue
        finite = ~infinite
        error = float(np.max(np.abs(a[finite] - b[finite]))) if finite.any() else 0.0
        scale = float(np.max(np.abs(a[finite]))) if finite.any() else 0.0
        floor = largest_difference(a, perturbed[path], numbers) if eps and perturbed and path in perturbed else None
        result.outputs.append(output_error(error, scale, eps, floor, path, tuple(a.shape)))
    return result


def largest_difference(values: Any, other: Any, numbers: Numbers = numpy_numbers) -> float | None:
    """``max |P - O|`` between the float64 ``values`` of an output and ``other`` (the perturbed original's output, or
    the original's own on a second run), over the places finite in both; ``None`` when the two cannot be compared
    (no array, another shape, no finite place)."""
    import numpy as np

    read = numbers(other)
    if read is None or read[0].shape != values.shape:
        return None
    p = np.asarray(read[0], dtype=np.float64)
    finite = np.isfinite(values) & np.isfinite(p)
    return float(np.max(np.abs(values[finite] - p[finite]))) if finite.any() else None


def output_label(path: str) -> str:
    """How messages name an output: ``output [0]``, ``output ['boxes']`` (a place in a PyTorch output structure),
    ``output 'logits'`` (an ONNX output's name), ``output (tensor)`` (a PyTorch model's one tensor)."""
    if not path:
        return "output (tensor)"
    return f"output {path}" if path[0] in "[." else f"output '{path}'"


def describe_inputs(shapes: dict[str, Any] | None, label: str | None = None, batches: int = 1) -> str:
    """``" on x: 1x3x224x224 (photographs, 2 batches)"``: what a check ran on, to end a phrase ("" when unknown)."""
    shown = ", ".join(f"{name or 'input'}: {'x'.join(map(str, shape))}" for name, shape in (shapes or {}).items())
    detail = f" ({label}{f', {batches} batches' if batches > 1 else ''})" if label else ""
    return f"{f' on {shown}' if shown else ''}{detail}"


@dataclass
class VerificationResult:
    """What a check of folded outputs against the original's found, in every format (``bnfold.verify``, the check of
    ``bnfold.fold`` and of a written file, ``bnfold.onnx.verify``); :meth:`to_dict` is the same plain data for all.

    Attributes:
        outputs: the worst error of each output (by path or name) over every batch compared.
        tolerance: the relative tolerance each output was held to (it also passes within its allowance).
        problems: structural differences (missing outputs, other shapes or types), each naming its output.
        not_finite: outputs holding NaN (or unmatched infinities): no error is known, no verdict possible.
        undecided: why no verdict is possible: the original differs from itself run to run.
        batches: how many input batches were compared.
        samples / agreement: how many classifier samples were compared for top-1 agreement (``bnfold.verify`` with
            ``data``), and the fraction where both models predict the same class.
        accuracy_original / accuracy_folded: top-1 accuracy of each model when ``data`` carries labels.
        inputs / input_shapes: what the inputs were (``"photographs"``, ``"given inputs"``...) and their shapes.
        perturbed_tensors: how many tensors the noise floor moved (those the fold touched).
        rounding_check: the float64 second opinion (:func:`bnfold.verification.explained_by_rounding`), asked when
            outputs are beyond both the tolerance and the allowance; when asked, it decides :attr:`passed`.
    """

    outputs: list[OutputError]
    tolerance: float
    problems: list[str] = field(default_factory=list)
    not_finite: list[str] = field(default_factory=list)
    undecided: str | None = None
    batches: int = 1
    samples: int = 0
    agreement: float | None = None
    accuracy_original: float | None = None
    accuracy_folded: float | None = None
    inputs: str | None = None
    input_shapes: dict[str, list[int]] | None = None
    perturbed_tensors: int | None = None
    rounding_check: VerificationResult | None = None

    @property
    def passed(self) -> bool:
        if self.rounding_check is not None:
            return self.rounding_check.passed
        return self.judged and not self.problems and all(e.within(self.tolerance) for e in self.outputs)

    @property
    def judged(self) -> bool:
        """Whether a verdict was possible: ``False`` when an output is NaN (or inf unmatched), so no error is known,
        or when the original's own outputs vary from run to run as much as the fold's."""
        return not self.not_finite and self.undecided is None

    @property
    def max_abs(self) -> float:
        return max((e.max_abs for e in self.outputs), default=0.0)

    @property
    def max_relative(self) -> float:
        return max((e.relative for e in self.outputs), default=0.0)

    def _rank(self, error: OutputError) -> tuple[bool, float]:
        return not error.within(self.tolerance), error.relative  # a failing output first, then the larger error

    def _worst(self) -> OutputError | None:
        return max(self.outputs, key=self._rank, default=None)

    @property
    def worst_output(self) -> str | None:
        """The path (or name) of the worst output: the first that fails, else the largest relative error."""
        worst = self._worst()
        return worst.path if worst is not None else None

    def describe(self) -> str:
        """The worst output's ``error X against allowance Y (relative r, tolerance t)``."""
        worst = self._worst()
        return worst.describe(self.tolerance) if worst is not None else "no floating outputs"

    def worst(self) -> str:
        """One line for messages: the first problem, or why no verdict is possible, or the worst output's error
        (saying, when it fails its allowance, that rounding the folded weights does not explain it)."""
        reasons = [*self.problems, *self.not_finite, *filter(None, [self.undecided])]
        worst = self._worst()
        if reasons or worst is None:
            return reasons[0] if reasons else self.describe()
        beyond = not worst.within(self.tolerance) and worst.allowance is not None
        return (f"{output_label(worst.path)}: {self.describe()}"
                f"{', more than rounding the folded weights explains' if beyond else ''}")

    def absorb(self, other: VerificationResult) -> None:
        """Take in the comparison of another batch: per output the worse error (a failing one first), every problem
        once, and the second opinions (:attr:`rounding_check`) of both, worst per output. A batch that fails without
        a second opinion leaves none: the outputs' verdict stands (an opinion on another batch cannot pass it)."""
        mine, theirs = self.rounding_check, other.rounding_check
        unexplained = (mine is None and not self.passed) or (theirs is None and not other.passed)
        if mine is not None and theirs is not None:
            mine.absorb(theirs)
        self.rounding_check = None if unexplained else mine if mine is not None else theirs
        worst = {e.path: e for e in self.outputs}
        for error in other.outputs:  # on a tie, the first batch's
            worst[error.path] = max(worst.get(error.path, error), error, key=self._rank)
        self.outputs = list(worst.values())
        self.problems.extend(p for p in other.problems if p not in self.problems)
        self.not_finite.extend(p for p in other.not_finite if p not in self.not_finite)
        self.undecided = self.undecided or other.undecided

    def check_run_to_run(self, first: dict[str, Any], again: dict[str, Any], numbers: Numbers = numpy_numbers) -> None:
        """Mark the result undecided where the original's own run-to-run difference, between its outputs ``first``
        and ``again`` (flat as for :func:`compare`) on the same inputs and random state, swamps the check.

        A model that draws random numbers bnfold cannot replay (another generator, a runtime op without a seed) gives
        different outputs on every run. That difference is in the fold's error and in the noise floor alike, so where
        it reaches a tenth of either, neither says anything about the fold. Asked only for outputs beyond the fixed
        tolerance (the verdict then rests on the floor); a deterministic model's run-to-run difference is 0.
        """
        for error in self.outputs:
            mine = numbers(first[error.path]) if error.relative > self.tolerance and error.path in again else None
            run = largest_difference(mine[0], again[error.path], numbers) if mine and mine[1] else None
            if run and 10 * run >= min(error.max_abs, error.floor if error.floor is not None else math.inf):
                self.undecided = (
                    f"the original model's own outputs differ from run to run on the same inputs and random state (by "
                    f"{run:.3g}, against a fold difference of {error.max_abs:.3g}): it draws random numbers bnfold "
                    "cannot replay, so the check cannot judge the fold")
                return

    def to_dict(self) -> dict[str, Any]:
        """Plain data, ready for JSON: ``FoldReport.verification``, ``bnfold verify --json``."""
        return {
            "passed": self.passed,
            "tolerance": self.tolerance,
            "max_abs": self.max_abs,
            "max_relative": self.max_relative,
            "judged": self.describe() if self.outputs else None,
            "worst_output": self.worst_output,
            "outputs": [{**asdict(e), "shape": list(e.shape), "passed": e.within(self.tolerance)}
                        for e in self.outputs],
            "problems": list(self.problems),
            "not_finite": list(self.not_finite),
            "undecided": self.undecided,
            "batches": self.batches,
            "samples": self.samples,
            "top1_agreement": self.agreement,
            "accuracy_original": self.accuracy_original,
            "accuracy_folded": self.accuracy_folded,
            "inputs": self.inputs,
            "input_shapes": self.input_shapes,
            "perturbed_tensors": self.perturbed_tensors,
            "rounding_check": self.rounding_check.to_dict() if self.rounding_check is not None else None,
        }

    def __str__(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED" if self.judged else "NOT POSSIBLE"
        lines = [f"verification {verdict}: max relative error {self.max_relative:.3g} (tolerance {self.tolerance:g}), "
                 f"max abs {self.max_abs:.3g}, over {self.batches} batch(es)"]
        inputs = describe_inputs(self.input_shapes, self.inputs)
        if inputs:
            lines.append(f"  compared{inputs}")
        lines.extend(f"  {output_label(e.path)} {list(e.shape)}: {e.describe(self.tolerance)}"
                     for e in self.outputs)
        if self.samples:
            lines.append(f"  top-1 agreement {self.agreement:.2%} over {self.samples} samples")
        if self.accuracy_original is not None:
            lines.append(f"  top-1 accuracy: original {self.accuracy_original:.2%}, folded {self.accuracy_folded:.2%}")
        lines.extend(f"  problem: {p}" for p in (*self.problems, *self.not_finite, *filter(None, [self.undecided])))
        return "\n".join(lines)
