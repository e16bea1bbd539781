"""The one place that knows the folding formulas.

In eval mode a batch norm is a per-channel affine map::

    y = s * x + t        s = gamma / sqrt(var + eps)        t = beta - mean * s

A linear layer (convolution, transposed convolution, fully connected, ONNX Gemm/MatMul) that *produces* the
norm's input absorbs it along its output channels (the forward fold)::

    W' = W * s   (per output channel)          b' = s * b + t

A linear layer that *consumes* the norm's output absorbs it along its input channels (the backward fold; exact
for fully connected layers and for convolutions whose padding does not insert zeros)::

    W' = W * s   (per input channel)           b' = b + sum_{c, k} W[o, c, k] * t[c]

The functions here are pure array math and import neither torch nor numpy: they only use operators and methods
that ``torch.Tensor`` and ``numpy.ndarray`` share (``*``, ``+``, ``**``, ``reshape``, ``sum``), so the PyTorch
engine and the ONNX backend compute exactly the same thing. Callers choose the precision: the scale and shift are
meant to be computed in float64 (see :func:`bn_scale_shift`), weights multiplied in at least float32.

Weight layouts: two channel axes, 0 and 1, possibly grouped: ``Conv`` ``(out, in / groups, *kernel)``,
``ConvTranspose`` ``(in, out / groups, *kernel)``, ``Linear`` ``(out, in)``, ONNX ``MatMul``'s B ``(in, out)``. Axis
0 holds its channels in full, axis 1 those of one group (which one follows from the position along axis 0):
:func:`scale_channels` hides that difference.
"""

from __future__ import annotations

from typing import Any, TypeVar

Array = TypeVar("Array", bound=Any)
"""A ``torch.Tensor`` or a ``numpy.ndarray``; the functions return the same kind they are given."""


def bn_scale_shift(
    mean: Array, var: Array, eps: float, gamma: Array | None = None, beta: Array | None = None
) -> tuple[Array, Array]:
    """Return ``(s, t)`` such that ``batch_norm(x) == s * x + t`` per channel, in eval mode.

    A missing ``gamma`` / ``beta`` (``affine=False``) means ones / zeros. Pass float64 arrays: the subtraction
    ``beta - mean * s`` loses digits in float32 when ``mean`` is large against ``beta``.
    """
    scale = (var + eps) ** -0.5
    if gamma is not None:
        scale = scale * gamma
    shift = -mean * scale
    if beta is not None:
        shift = shift + beta
    return scale, shift


def _channel_layout(weight: Array, scale: Array, axis: int, groups: int) -> tuple[tuple[int, ...], Array]:
    """``weight``'s shape with axis 1 split by group where ``axis`` is 1, and ``scale`` shaped to multiply it."""
    if axis == 0:
        return tuple(weight.shape), scale.reshape((weight.shape[0],) + (1,) * (len(weight.shape) - 1))
    if axis != 1:
        raise ValueError(f"channel axis must be 0 or 1, got {axis}")
    rows, per_group = weight.shape[0], weight.shape[1]
    if rows % groups or scale.shape[0] != groups * per_group:
        raise ValueError(
            f"weight of shape {tuple(weight.shape)} with groups={groups} does not have {scale.shape[0]} channels on axis 1"
        )
    kernel = tuple(weight.shape[2:])
    return (groups, rows // groups, per_group) + kernel, scale.reshape((groups, 1, per_group) + (1,) * len(kernel))


def scale_channels(weight: Array, scale: Array, axis: int, groups: int = 1) -> Array:
    """Multiply ``weight`` by ``scale`` along channel ``axis`` (0 or 1) of a grouped layout; out of place.

    ``scale`` has one entry per channel the axis stands for: ``weight.shape[0]`` for axis 0, and
    ``groups * weight.shape[1]`` for axis 1 (axis 1 holds one group's share of them).
    """
    shape, factors = _channel_layout(weight, scale, axis, groups)
    return (weight.reshape(shape) * factors).reshape(tuple(weight.shape))


def scale_channels_in_place(weight: Array, scale: Array, axis: int, groups: int = 1) -> None:
    """:func:`scale_channels` written into ``weight`` itself, which must be contiguous (the reshape is then a view).

    The same products as :func:`scale_channels` (bit for bit), without allocating a second weight: for a large
    model most of a fold's time is that allocation.
    """
    shape, factors = _channel_layout(weight, scale, axis, groups)
    grouped = weight.reshape(shape)
    grouped *= factors


def forward_bias(bias: Array | None, scale: Array, shift: Array) -> Array:
    """Bias after folding ``y = s * layer(x) + t`` into the producing layer: ``s * b + t`` (``b = 0`` if absent)."""
    if bias is None:
        return shift
    return bias * scale + shift


def backward_bias(weight: Array, bias: Array | None, shift: Array, in_axis: int, groups: int = 1) -> Array:
    """Bias after folding ``x -> x + t`` (per input channel) into the consuming layer: ``b + sum W * t``.

    The sum runs over input channels and kernel positions, which is exact only when every output sees the whole
    kernel window of real (not zero-padded) inputs. The result has one entry per output channel, in the order
    of the layer's output channels.
    """
    contribution = scale_channels(weight, shift, in_axis, groups)
    out_axis = 1 - in_axis
    if out_axis == 0:
        per_output = contribution.sum(tuple(range(1, len(weight.shape))))
    else:
        # Output channels sit on axis 1, one group's share at a time: out = g * per_group + j.
        rows, per_group = weight.shape[0], weight.shape[1]
        kernel_axes = tuple(range(3, len(weight.shape) + 1))
        grouped = contribution.reshape((groups, rows // groups, per_group) + tuple(weight.shape[2:]))
        per_output = grouped.sum((1,) + kernel_axes).reshape((groups * per_group,))
    if bias is None:
        return per_output
    return bias + per_output
