"""Which operations a per-channel affine map ``y = s * x + t`` passes through unchanged.

A norm separated from its layer only by such operations still folds: ``op(s * x + t) == s * op(x) + t`` per channel,
so the layer can absorb the map on one side of ``op`` as well as on the other. The operations (:class:`OpFacts`
kinds), and when each is exact:

* ``identity``, and ``dropout`` in eval (``training=False``);
* ``avg_pool``, ``adaptive_avg_pool`` and ``mean`` over non-channel axes: a mean of ``s * x + t`` is
  ``s * mean(x) + t`` as long as every term of the mean is a real input; average pooling that counts zero padding
  in its divisor (``count_include_pad`` with padding) or has a ``divisor_override`` is not exact;
* ``upsample`` in every mode: each output is a weighted sum of inputs with weights that sum to 1;
* ``max_pool`` when every scale ``s >= 0``: ``max(s * x + t) == s * max(x) + t`` only then;
* ``pad`` that copies values (``reflect``, ``replicate``, ``circular``) and does not pad the channel axis: every
  output is one of the inputs of its own channel;
* ``reshape`` that keeps every channel's values in one channel, and ``permute`` / ``transpose``, which move the
  channel axis. A row-major reshape keeps channel ``c`` at output axis ``k`` when ``out[k] == in[c_axis]`` and the
  dimensions after the channel hold the same number of elements before and after; that needs shapes.

Pure and torch-free: it answers, for one node, "does a per-channel affine on channel axis ``a`` of the input pass
through, and on which axis does it come out".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .graph import OP, Node


@dataclass(frozen=True)
class Passage:
    """An affine map on channel ``axis`` of the input comes out on channel ``axis`` of the output.

    ``needs_non_negative_scale``: exact only when every scale ``s >= 0`` (max pooling).
    """

    axis: int
    needs_non_negative_scale: bool = False


_COMMUTING_KINDS = frozenset(
    {"identity", "dropout", "avg_pool", "adaptive_avg_pool", "max_pool", "upsample", "mean", "reshape", "permute", "transpose",
     "pad"}
)


def may_commute(node: Node) -> bool:
    """Whether ``node`` is of a kind that can commute with a per-channel affine (exactness is :func:`passage`'s job)."""
    return node.kind == OP and node.op is not None and node.op.kind in _COMMUTING_KINDS


def _normalise(axis: int, rank: int | None) -> int | None:
    if axis >= 0:
        return axis
    return None if rank is None else axis % rank


def passage(node: Node, in_shape: Sequence[int] | None, axis: int) -> Passage | str:
    """How an affine map on channel ``axis`` of ``node``'s (single) input passes through it, or why it does not.

    ``in_shape`` is the input's shape when known, else ``None``; ``node.shape`` the output's.
    """
    if len(node.inputs) != 1:
        return f"{node.label} combines {len(node.inputs)} tensors"
    if node.op is None or node.op.kind not in _COMMUTING_KINDS:
        return f"{node.label} does not commute with a per-channel affine map"
    kind, attributes = node.op.kind, node.op.attributes
    rank = None if in_shape is None else len(in_shape)
    channel_axis = _normalise(axis, rank)
    if kind == "identity":
        return Passage(axis)
    if kind == "dropout":
        return Passage(axis) if attributes.get("training") is False else f"{node.label} is applied with training=True"
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
    if kind == "reshape":
        return _reshape(node, in_shape, channel_axis)
    if kind == "pad":
        return _pad(node, axis, channel_axis)
    return _permute(node, channel_axis, rank)


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
            f"{node.label} counts its zero padding in the mean (count_include_pad=True, padding={shown}): the border "
            f"outputs would see the shift where the original saw zeros"
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


def _reshape(node: Node, in_shape: Sequence[int] | None, channel_axis: int | None) -> Passage | str:
    out_shape = node.shape
    if in_shape is None or out_shape is None or channel_axis is None:
        return (
            f"{node.label} reshapes its input; pass example_inputs so bnfold can check that every channel keeps "
            f"its own values"
        )
    channels = in_shape[channel_axis]
    trailing = math.prod(in_shape[channel_axis + 1 :])
    for out_axis, size in enumerate(out_shape):
        if size == channels and math.prod(out_shape[out_axis + 1 :]) == trailing:
            return Passage(out_axis)
    return (
        f"{node.label} reshapes {tuple(in_shape)} to {tuple(out_shape)}, which mixes the values of different channels "
        f"along one axis"
    )


def _permute(node: Node, channel_axis: int | None, rank: int | None) -> Passage | str:
    assert node.op is not None
    if channel_axis is None or rank is None:
        return f"{node.label} moves axes; pass example_inputs so bnfold can follow the channel axis"
    if node.op.kind == "permute":
        order = [int(d) % rank for d in node.op.attributes["order"]]
        return Passage(order.index(channel_axis))
    first, second = (int(d) % rank for d in node.op.attributes["dims"])
    if channel_axis == first:
        return Passage(second)
    if channel_axis == second:
        return Passage(first)
    return Passage(channel_axis)
