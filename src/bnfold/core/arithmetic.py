"""What counts as a linear combination: one rule for the ``add`` / ``sub`` / ``mul`` / ``div`` of every format.

The adapters state what they read (:class:`~bnfold.core.graph.Operand`s, ``alpha``, the output's shape); the core
decides (:func:`linear_combination`): a broadcast is no sum of branches, nor is a product that changes the tensor's
shape a scale of it, and an all-zero constant added where it changes no shape is the number 0 (the ``identity = 0``
of a block without an identity branch). What only the format can know (an in-place form overwriting a tensor others
read, a constant it cannot evaluate) stays the adapter's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .graph import Operand, OpFacts

Shape = tuple[Any, ...]
"""A shape as an adapter knows it: a dimension that is not an ``int`` is unknown (a symbolic batch size)."""

OTHER = OpFacts("other")


def _stretches(shape: Shape, target: Shape) -> bool:
    """Whether broadcasting a tensor of ``shape`` against ``target`` makes a larger result: it has more axes, or
    more than one element on an axis where ``target`` has one (sizes that differ otherwise are no broadcast but a
    shape error of the model's own, left to the planners' reasons)."""
    return len(shape) > len(target) or any(
        isinstance(a, int) and isinstance(b, int) and a != 1 and b == 1
        for a, b in zip(shape, target[len(target) - len(shape):], strict=True)
    )


def _fits(shape: Shape, target: Shape) -> bool:
    """Whether a constant of ``shape`` broadcasts into ``target`` without changing it (adding 0 is then no op)."""
    return len(shape) <= len(target) and all(
        not isinstance(a, int) or not isinstance(b, int) or a in (1, b)
        for a, b in zip(shape, target[len(target) - len(shape):], strict=True)
    )


def linear_combination(kind: str, operands: Sequence[Operand], *, alpha: object = 1,
                       shape: Shape | None = None) -> OpFacts:
    """The core's facts of an ``add`` / ``sub`` / ``mul`` / ``div`` whose operands an adapter read (in the order the
    op combines them; ``-x`` is ``x * -1``, ``rsub`` the subtraction it computes), or ``other`` (see the module).

    ``shape``: the op's output shape, where known; without it the shape of a computed operand stands for it.
    Computed operands come back without their shape (the planners read shapes from the graph's nodes).
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        return OTHER
    computed = [o for o in operands if o.constant is None and o.number is None]
    target = shape if shape is not None else next((o.shape for o in computed if o.shape is not None), None)
    checked = computed if kind in ("add", "sub") else computed if len(computed) == 1 else []
    if target is not None and checked:
        if any(o.shape is not None and (_stretches(o.shape, target) or _stretches(target, o.shape)) for o in checked):
            return OTHER
        if any(o.constant is not None and o.shape is not None and _stretches(o.shape, target) for o in operands):
            return OTHER
    stated = []
    for operand in operands:
        if operand.constant is None and operand.number is None:
            operand = Operand(input=operand.input)
        elif operand.zero and kind in ("add", "sub") and target is not None and operand.shape is not None \
                and _fits(operand.shape, target):
            operand = Operand(number=0.0)
        elif operand.zero:
            operand = Operand(input=operand.input, constant=operand.constant, shape=operand.shape)
        stated.append(operand)
    if kind in ("mul", "div"):
        return OpFacts(kind, {"operands": tuple(stated)})
    scalars = tuple(o.number for o in stated if o.number is not None)
    return OpFacts(kind, {"alpha": alpha, "scalars": scalars, "operands": tuple(stated)})
