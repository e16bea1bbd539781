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
dtype (:data:`bnfold.verification.TOLERANCES`), which is what bnfold accepted before.

Why it is right on trained models: a detector's sigmoid map driven to 1e-5 everywhere (random inputs saturate
it) shrinks the fold's error and the floor alike, by the slope of the sigmoid, so ``E / A`` stays near its usual
value where the relative error ``E / max|O|`` measures only rounding. Why it still refuses a wrong fold: a scale off
by 1e-3 on one channel is thousands of rounding steps, so ``E`` is thousands of times ``N`` (``FLOOR_FACTOR`` is 4).
The floor is measured between the original and a perturbed original, never against the folded model, so a wrong
fold cannot widen its own allowance.

This module is plain Python (no torch, no numpy): each format reduces its outputs to the numbers above and asks
:func:`verdict`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FLOOR_FACTOR = 4.0
"""How many noise floors a correct fold may differ by. The floor is one draw of the rounding pattern, while the
fold rounds every touched weight by up to half a step; across the test zoo and the trained files of
``benchmarks/real_files.py`` the ratio error / floor stays below 1.5."""

PERTURB_SEED = 1234
"""Seed of the up / down choice of each perturbed value (the floor is reproducible run to run)."""


@dataclass(frozen=True)
class Verdict:
    """One output's judgement: its error, the allowance it is held to, and the relative error beside the tolerance."""

    error: float  # max |F - O|
    relative: float  # error / max |O|
    allowance: float | None  # FLOOR_FACTOR * floor + one rounding of the output; None when no floor was measured
    floor: float | None  # max |P - O|
    tolerance: float
    passed: bool

    @property
    def ratio(self) -> float | None:
        """``error / allowance`` (pass <= 1), or ``None`` without a floor."""
        if self.allowance is None:
            return None
        if self.allowance > 0:
            return self.error / self.allowance
        return 0.0 if self.error == 0 else math.inf

    def describe(self) -> str:
        """``"error 2.1e-07 against allowance 9.5e-07 (relative 0.0135, tolerance 1e-04)"``."""
        if self.allowance is None:
            return f"error {self.error:.3g} (relative {self.relative:.3g}, tolerance {self.tolerance:g})"
        return (f"error {self.error:.3g} against allowance {self.allowance:.3g} (relative {self.relative:.3g}, "
                f"tolerance {self.tolerance:g})")


def verdict(error: float, scale: float, eps: float, tolerance: float, floor: float | None) -> Verdict:
    """Judge one output.

    Args:
        error: ``max |F - O|``, the folded model's largest difference from the original.
        scale: ``max |O|``, the original output's largest magnitude.
        eps: the machine epsilon of the output's dtype (one rounding of the output is ``eps * scale``).
        tolerance: the fixed relative tolerance (the dtype's default, or the user's).
        floor: ``max |P - O|`` (see the module docstring), or ``None`` when it was not measured.

    NaN anywhere fails: a NaN error or floor allows nothing.
    """
    relative = error / scale if scale > 0 else (0.0 if error == 0 else math.inf)
    passed = relative <= tolerance
    allowance = None
    if floor is not None:
        allowance = FLOOR_FACTOR * floor + eps * scale if math.isfinite(floor) else eps * scale
        passed = passed or error <= allowance
    return Verdict(error, relative, allowance, floor, tolerance, bool(passed))


def undecided(run_to_run: float, error: float, floor: float | None) -> bool:
    """Whether the original's own run-to-run difference (same inputs, same random state) swamps the check.

    A model that draws random numbers bnfold cannot replay (another generator, a runtime op without a seed) gives
    different outputs on every run. That difference is in the fold's error and in the noise floor alike, so where
    it reaches a tenth of either, neither says anything about the fold. Asked only for outputs beyond the fixed
    tolerance (the verdict then rests on the floor); a deterministic model's run-to-run difference is 0.
    """
    if run_to_run <= 0:
        return False
    return 10 * run_to_run >= min(error, floor if floor is not None else math.inf)


UNDECIDED = ("the original model's own outputs differ from run to run on the same inputs and random state (by "
             "{run:.3g}, against a fold difference of {error:.3g}): it draws random numbers bnfold cannot replay, so "
             "the check cannot judge the fold")


PERTURBED = "the original with every tensor the fold touched moved one rounding step"
