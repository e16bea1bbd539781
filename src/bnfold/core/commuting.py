"""Which operations a per-channel affine map ``y = s * x + t`` passes through unchanged, and on which axis it comes out.

A norm separated from its layer only by such operations still folds: ``op(s * x + t) == s * op(x) + t`` per channel.
Each kind's rule is in :func:`passage` or the function below it dispatches to: means and pools over
non-channel axes must average real inputs only (no counted zero padding); ``upsample`` weighs inputs by weights
that sum to 1; ``max_pool`` needs ``s >= 0``; ``pad`` must copy values of the channel (reflect, replicate, circular);
``reshape`` / ``squeeze`` / ``permute`` move the channel axis, or spread it over features (:class:`Passage`
``outer`` / ``inner``), which only a backward fold can absorb.

**Affine steps.** An ``add`` / ``sub`` / ``mul`` / ``div`` of the tensor with numbers or per-channel constants is
itself a per-channel affine map (:class:`AffineStep`): it stays in the model, and the norm is folded *through* it
(:func:`bnfold.core.apply.routed`). Pure and torch-free.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from .graph import CONSTANT, OP, ZERO_PADDED_BORDER, Node, Operand


@dataclass(frozen=True)
class Passage:
    """An affine map on the input's channels comes out on channel ``axis`` of the output (spread as ``outer`` /
    ``inner`` say); ``needs_non_negative_scale``: exact only when every scale ``s >= 0`` (max pooling)."""

    axis: int
    needs_non_negative_scale: bool = False
    outer: int = 1
    inner: int = 1


_COMMUTING_KINDS = frozenset(
    {"identity", "dropout", "avg_pool", "adaptive_avg_pool", "max_pool", "upsample", "mean", "reshape", "permute", "transpose",
     "pad", "squeeze", "unsqueeze"}
)
_LAYOUT_KINDS = frozenset({"identity", "dropout", "reshape", "permute", "transpose", "squeeze", "unsqueeze"})
RANK_KEEPING = frozenset({"identity", "dropout", "avg_pool", "adaptive_avg_pool", "max_pool", "upsample", "pad",
                          "permute", "transpose"})
"""The kinds whose output has as many axes as their input: the rank of a tensor of unknown shape after them."""
"""Ops that a map spread over features (``outer`` / ``inner`` > 1) still passes: they only move values."""


def may_commute(node: Node) -> bool:
    """Whether ``node`` is of a kind that can commute with a per-channel affine (exactness is :func:`passage`'s job)."""
    return node.kind == OP and node.op is not None and node.op.kind in _COMMUTING_KINDS


def passage(
    node: Node, in_shape: Sequence[int] | None, axis: int, layout: tuple[int, int] = (1, 1), rank: int | None = None
) -> Passage | str:
    """How an affine map on channel ``axis`` of ``node``'s (single) input passes through it, or why it does not.

    ``in_shape``: the input's shape when known (else ``rank`` may be); ``layout``: ``(outer, inner)`` of a map
    already spread over the features of ``axis``, ``(1, 1)`` for one channel per index.
    """
    if len(node.inputs) != 1:
        return f"{node.label} combines {len(node.inputs)} tensors"
    if node.op is None or node.op.kind not in _COMMUTING_KINDS:
        return f"{node.label} does not commute with a per-channel affine map"
    kind, attributes = node.op.kind, node.op.attributes
    rank = len(in_shape) if in_shape is not None else rank
    channel_axis = axis if axis >= 0 else None if rank is None else axis % rank
    if layout != (1, 1) and kind not in _LAYOUT_KINDS:
        return f"{node.label} acts on features that a reshape before it made of several channels' values"
    if kind == "reshape":
        return _reshape(node, in_shape, channel_axis, layout)
    if kind in ("squeeze", "unsqueeze"):
        return _squeeze(node, in_shape, channel_axis, rank, layout)
    if kind in ("permute", "transpose"):
        return _permute(node, channel_axis, rank, layout)
    if kind == "identity" or (kind == "dropout" and attributes.get("training") is False):
        return Passage(axis, False, *layout)
    if kind == "dropout":
        return f"{node.label} is applied with training=True"
    if kind in ("adaptive_avg_pool", "upsample"):
        return _spatial(node, axis, channel_axis)
    if kind == "avg_pool":
        return _avg_pool(node, axis, channel_axis)
    if kind == "max_pool":
        if attributes.get("return_indices"):
            return f"{node.label} also returns indices"
        spatial = _spatial(node, axis, channel_axis)
        return Passage(spatial.axis, True) if isinstance(spatial, Passage) else spatial
    if kind == "mean":
        return _mean(node, axis, channel_axis, rank)
    return _pad(node, axis, channel_axis)


def _spatial(node: Node, axis: int, channel_axis: int | None) -> Passage | str:
    """Pooling / upsampling act on the dimensions after (batch, channels); channels must be axis 1."""
    if channel_axis != 1:
        return f"{node.label} works on spatial dimensions, but the channels are on axis {axis}"
    return Passage(1)


def _avg_pool(node: Node, axis: int, channel_axis: int | None) -> Passage | str:
    assert node.op is not None
    attributes = node.op.attributes
    divisor = attributes.get("divisor_override")
    if divisor is not None:
        return f"{node.label} divides by divisor_override={divisor}, not by the number of values averaged"
    padding = attributes.get("padding", (0,))
    if attributes.get("count_include_pad", True) and any(p != 0 for p in padding):
        shown = padding[0] if len(padding) == 1 else tuple(padding)
        return (
            f"{node.label} counts its zero padding in the mean (count_include_pad=True, padding={shown}): "
            f"{ZERO_PADDED_BORDER}"
        )
    return _spatial(node, axis, channel_axis)


def _pad(node: Node, axis: int, channel_axis: int | None) -> Passage | str:
    assert node.op is not None
    mode = node.op.attributes.get("mode", "constant")
    if mode not in ("reflect", "replicate", "circular"):
        return f"{node.label} pads with {mode} values, which the shift would not reach"
    padded = node.op.attributes.get("padded_axes")
    if padded is None or channel_axis is None:
        return f"{node.label} pads axes bnfold cannot read"
    if channel_axis in padded:
        return f"{node.label} pads the channel axis"
    return Passage(axis)


def _mean(node: Node, axis: int, channel_axis: int | None, rank: int | None) -> Passage | str:
    assert node.op is not None
    dims = node.op.attributes.get("dims")
    keepdim = bool(node.op.attributes.get("keepdim", False))
    if dims is None or rank is None or channel_axis is None:
        return f"{node.label} may average over the channels (pass example_inputs so bnfold can see the shapes)"
    if not all(isinstance(d, int) for d in dims):
        return f"{node.label} has dimensions bnfold cannot read"
    normalised = [d % rank for d in dims]
    if channel_axis in normalised:
        return f"{node.label} averages over the channel axis"
    return Passage(channel_axis if keepdim else channel_axis - sum(d < channel_axis for d in normalised))


def _reshape(
    node: Node, in_shape: Sequence[int] | None, channel_axis: int | None, layout: tuple[int, int] = (1, 1)
) -> Passage | str:
    """A row-major reshape does not move values in memory order: element ``i`` (flat index) of the input is element
    ``i`` of the output. Channel ``c`` owns the elements with ``(i // P) % C == c``, ``P`` being ``inner`` times the
    number of elements after the channel axis. Output axis ``k`` (``n`` long, ``T`` elements after it) holds the
    channels alone when ``T`` divides ``P`` and ``(P / T) * C`` divides ``n``: then index ``j`` of that axis
    belongs to channel ``(j // (P / T)) % C``, a layout ``(n / ((P / T) * C), P / T)``. An axis of exactly ``C``
    (the channels kept as they are) is preferred; else the last axis that qualifies (where features are read)."""
    out_shape = node.shape
    if in_shape is None or out_shape is None or channel_axis is None:
        return (
            f"{node.label} reshapes its input; pass example_inputs so bnfold can check that every channel keeps "
            f"its own values"
        )
    outer, inner = layout
    channels = in_shape[channel_axis] // (outer * inner)
    period = inner * math.prod(in_shape[channel_axis + 1 :])
    found: list[Passage] = []
    for out_axis, size in enumerate(out_shape):
        trailing = math.prod(out_shape[out_axis + 1 :])
        if period % trailing:
            continue
        new_inner = period // trailing
        if size % (new_inner * channels):
            continue
        new_outer = size // (new_inner * channels)
        if (new_outer, new_inner) == (1, 1):
            return Passage(out_axis)
        found.append(Passage(out_axis, False, new_outer, new_inner))
    if found and channels > 1:
        return found[-1]
    return (
        f"{node.label} reshapes {tuple(in_shape)} to {tuple(out_shape)}, which mixes the values of different channels "
        f"along one axis"
    )


def _squeeze(
    node: Node, in_shape: Sequence[int] | None, channel_axis: int | None, rank: int | None, layout: tuple[int, int]
) -> Passage | str:
    """``squeeze`` / ``unsqueeze`` with their ``dims`` given: decided from the axes; without, from the shapes."""
    assert node.op is not None
    dims = node.op.attributes.get("dims")
    if dims is not None and not all(isinstance(d, int) for d in dims):
        dims = None
    if dims is None or channel_axis is None:
        if in_shape is None or node.shape is None:
            return (f"{node.label} {node.op.kind}es axes bnfold cannot read; pass example_inputs so bnfold can check "
                    f"that the channel axis stays")
        return _reshape(node, in_shape, channel_axis, layout)
    if any(d < 0 for d in dims) and rank is None:
        return _reshape(node, in_shape, channel_axis, layout)
    if node.op.kind == "squeeze":
        removed = {d % rank if rank is not None else d for d in dims}
        if in_shape is not None:  # torch skips an axis whose size is not 1; ONNX would fail on it
            removed = {d for d in removed if in_shape[d] == 1}
        if channel_axis in removed:
            return f"{node.label} removes the channel axis"
        return Passage(channel_axis - sum(d < channel_axis for d in removed), False, *layout)
    out_rank = None if rank is None else rank + len(dims)
    position = channel_axis
    for inserted in sorted(d % out_rank if out_rank is not None else d for d in dims):
        if inserted <= position:
            position += 1
    return Passage(position, False, *layout)


def _permute(node: Node, channel_axis: int | None, rank: int | None, layout: tuple[int, int]) -> Passage | str:
    assert node.op is not None
    if channel_axis is None or rank is None:
        return f"{node.label} moves axes; pass example_inputs so bnfold can follow the channel axis"
    if node.op.kind == "permute":
        order = [int(d) % rank for d in node.op.attributes["order"]]
        return Passage(order.index(channel_axis), False, *layout)
    first, second = (int(d) % rank for d in node.op.attributes["dims"])
    moved = {first: second, second: first}.get(channel_axis, channel_axis)
    return Passage(moved, False, *layout)


# ------------------------------------------------------------------------------------------ affine steps

ARITHMETIC_KINDS = frozenset({"add", "sub", "mul", "div"})


@dataclass(frozen=True)
class Value:
    """``number * prod(constants) / prod(divisors)``: one value per channel, or a single value, read from stored
    constants (by the name the format's weight access reads them with) when the fold is applied.

    ``shapes``: the stored shapes of ``constants`` then ``divisors``, for the planner's per-channel check.
    """

    number: float = 1.0
    constants: tuple[str, ...] = ()
    divisors: tuple[str, ...] = ()
    shapes: tuple[tuple[int, ...], ...] = ()

    def times(self, other: Value) -> Value:
        return Value(self.number * other.number, self.constants + other.constants, self.divisors + other.divisors,
                     self.shapes[: len(self.constants)] + other.shapes[: len(other.constants)]
                     + self.shapes[len(self.constants):] + other.shapes[len(other.constants):])

    def named(self) -> list[tuple[str, tuple[int, ...]]]:
        return list(zip(self.constants + self.divisors, self.shapes, strict=True))


@dataclass(frozen=True)
class AffineStep:
    """An op of the model that computes ``y = a * x + b`` per channel: ``scale`` is ``a`` (None: 1), ``shift``
    ``b`` (None: 0). ``label`` names the op for reasons."""

    label: str
    scale: Value | None = None
    shift: Value | None = None

    def named(self) -> list[tuple[str, tuple[int, ...]]]:
        return [*(self.scale.named() if self.scale else []), *(self.shift.named() if self.shift else [])]


def _operand_value(operand: Operand) -> Value | str:
    if operand.number is not None:
        return Value(float(operand.number))
    if operand.constant is None:
        return "an operand bnfold cannot read"
    if operand.shape is None:
        return f"'{operand.constant}' of unknown shape"
    return Value(1.0, (operand.constant,), (), (tuple(operand.shape),))


def affine_step(node: Node, nodes: Sequence[Node]) -> tuple[int, AffineStep] | str | None:
    """``node`` as a per-channel affine step: the index of the node whose tensor it transforms, and the step; the
    reason it is no such step (it combines computed tensors, divides by the tensor, ...); or None when it is no
    ``add`` / ``sub`` / ``mul`` / ``div`` at all. Whether each constant holds one value per channel is the
    planner's check (it knows the channel axis): see :func:`constant_problem`."""
    if node.kind != OP or node.op is None or node.op.kind not in ARITHMETIC_KINDS:
        return None
    kind, attributes = node.op.kind, node.op.attributes
    operands: tuple[Operand, ...] | None = attributes.get("operands")
    if operands is None:
        return f"{node.label} combines {len(node.inputs)} tensors"

    def computed(operand: Operand) -> bool:
        return (operand.constant is None and operand.number is None and operand.input is not None
                and 0 <= operand.input < len(node.inputs) and nodes[node.inputs[operand.input]].kind != CONSTANT)

    tensors = [i for i, operand in enumerate(operands) if computed(operand)]
    if len(tensors) != 1:
        return f"{node.label} combines {len(tensors)} computed tensors" if tensors else None
    position = tensors[0]
    data = node.inputs[operands[position].input or 0]
    values: list[Value] = []
    for i, operand in enumerate(operands):
        if i == position:
            continue
        value = _operand_value(operand)
        if isinstance(value, str):
            return f"{node.label} reads {value}"
        values.append(value)
    alpha = attributes.get("alpha", 1)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        return f"{node.label} has a factor alpha bnfold cannot read"
    if kind in ("add", "sub"):
        if len(operands) != 2:
            return f"{node.label} has {len(operands)} operands"
        sign = -1.0 if kind == "sub" else 1.0
        if position == 0:  # x + alpha * c, x - alpha * c
            return data, AffineStep(node.label, None, Value(sign * float(alpha)).times(values[0]))
        return data, AffineStep(node.label, Value(sign * float(alpha)), values[0])  # c + alpha * x, c - alpha * x
    if kind == "div":
        if len(operands) != 2 or position != 0:
            return f"{node.label} divides by the tensor, which is not an affine map of it"
        divisor = values[0]
        if divisor.number == 0:
            return f"{node.label} divides by 0"
        return data, AffineStep(node.label, Value(1.0 / divisor.number, (), divisor.constants, divisor.shapes))
    return data, AffineStep(node.label, functools.reduce(Value.times, values, Value()), None)


def constant_problem(
    step: AffineStep, rank: int | None, axis: int, channels: int, layout: tuple[int, int] = (1, 1)
) -> str | None:
    """Why a constant of ``step`` is not one value per channel (or one value) of a tensor of ``rank`` axes whose
    channels are on ``axis``, or None. Constants broadcast from the right, as in every format; one with more axes
    than the tensor would change its shape."""
    for name, shape in step.named():
        where = f"{step.label} reads '{name}' of shape {tuple(shape)}"
        varying = [i for i, size in enumerate(shape) if size != 1]
        if rank is not None and len(shape) > rank:
            return f"{where}, more axes than the tensor it acts on"
        if not varying:
            continue
        if layout != (1, 1):
            return f"{where}, which varies over features a reshape made of several channels' values"
        if len(varying) > 1:
            return f"{where}, which varies over positions, not only over channels"
        if rank is None and axis < 0:  # the channels counted from the end: the constant's axes align from the end
            if varying[0] - len(shape) != axis or shape[varying[0]] != channels:
                return f"{where}, which is not one value per channel ({channels} channels on axis {axis})"
            continue
        if rank is None:
            return f"{where}; pass example_inputs so bnfold can check that it holds one value per channel"
        aligned = rank - len(shape) + varying[0]
        if aligned != axis % rank or shape[varying[0]] != channels:
            return (f"{where}, which varies along axis {aligned} of the {rank}-D tensor, not one value per channel "
                    f"({channels} channels on axis {axis % rank})")
    return None
