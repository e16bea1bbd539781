"""What the TorchScript and torch.export adapters both know of ATen ops: the op names they map to the core's
vocabulary (each adapter adds the names only its graphs have, and prefixes TorchScript's with ``aten::``), a
padding op's facts, and a layer's :class:`~bnfold.core.graph.Geometry` from its arguments."""

from __future__ import annotations

from typing import Any

from ..core.graph import Geometry, OpFacts
from .modules import conv_geometry

# Linear layers: ATen op name -> how its weight is laid out (each adapter adds its generic convolution,
# "convolution": read its ``transposed`` argument).
LAYERS: dict[str, str] = {
    **dict.fromkeys(("conv1d", "conv2d", "conv3d"), "conv"),
    **dict.fromkeys(("conv_transpose1d", "conv_transpose2d", "conv_transpose3d"), "conv_transpose"),
    "linear": "linear",
}

# Every other op the core can reason about: ATen op name -> OpFacts kind.
OP_KINDS: dict[str, str] = {
    **dict.fromkeys(("contiguous", "clone", "detach", "alias"), "identity"),
    **dict.fromkeys(("dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout"), "dropout"),
    **dict.fromkeys(("avg_pool1d", "avg_pool2d", "avg_pool3d"), "avg_pool"),
    **dict.fromkeys(("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "_adaptive_avg_pool2d",
                     "_adaptive_avg_pool3d"), "adaptive_avg_pool"),
    **dict.fromkeys(("max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices",
                     "max_pool3d_with_indices", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d"),
                    "max_pool"),
    "mean": "mean",
    **dict.fromkeys(("view", "reshape", "flatten", "unflatten"), "reshape"),
    "permute": "permute",
    **dict.fromkeys(("transpose", "swapaxes", "swapdims"), "transpose"),
    **dict.fromkeys(("cat", "concat", "concatenate"), "concat"),
    **dict.fromkeys(("pad", "constant_pad_nd", "reflection_pad1d", "reflection_pad2d", "reflection_pad3d",
                     "replication_pad1d", "replication_pad2d", "replication_pad3d", "_pad_circular"), "pad"),
}

# Linear combinations: ATen op name -> the core's kind. ``rsub(x, y)`` is ``y - x``; ``neg(x)`` is ``x * -1``.
ARITHMETIC: dict[str, str] = {
    **dict.fromkeys(("add", "add_"), "add"),
    **dict.fromkeys(("sub", "sub_", "subtract", "rsub"), "sub"),
    **dict.fromkeys(("mul", "mul_", "multiply", "neg", "neg_", "negative"), "mul"),
    **dict.fromkeys(("div", "divide", "true_divide"), "div"),
}


def op_kind(table: dict[str, str], name: str) -> str | None:
    """The kind of op ``name`` in ``table``; upsampling ops (``upsample_*``, ``_upsample_*``) by their name."""
    if name in table:
        return table[name]
    return "upsample" if name.removeprefix("aten::").startswith(("upsample_", "_upsample_")) else None


_PAD_MODES = {"reflection": "reflect", "replication": "replicate", "constant": "constant", "_pad_circular": "circular"}


def aten_pad_facts(name: str, mode: Any, widths: Any, rank: int | None) -> OpFacts:
    """An ATen padding op of a TorchScript or torch.export graph (``pad``, ``constant_pad_nd``,
    ``reflection_pad2d``, ...) in the core's terms: ``mode`` is ``pad``'s own (the others say it in their name),
    ``widths`` F.pad's list ((before, after) pairs from the last axis backwards) of an input of ``rank`` axes."""
    if name != "pad":
        mode = next(m for prefix, m in _PAD_MODES.items() if name.startswith(prefix))
    padded: tuple[int, ...] | None = None
    if rank is not None and isinstance(widths, (tuple, list)) and len(widths) % 2 == 0 \
            and all(isinstance(w, int) for w in widths):
        padded = tuple(rank - 1 - i for i in range(len(widths) // 2) if widths[2 * i] or widths[2 * i + 1])
    return OpFacts("pad", {"mode": mode, "padded_axes": padded})


def _ints(value: Any) -> tuple[int, ...]:
    """An ATen ``int[]`` argument as a tuple (a single value: a 1-tuple; ``None``: empty)."""
    if isinstance(value, (tuple, list)):
        return tuple(int(v) if isinstance(v, int) else v for v in value)
    return () if value is None else (value,)


def _per_axis(value: Any, rank: int, default: int) -> tuple[int, ...] | None:
    """An ATen ``int[n]`` argument as one int per spatial axis (a single value stands for every axis), or None
    when it is not plain integers."""
    values = _ints(value) or (default,)
    if len(values) == 1:
        values = values * rank
    if len(values) != rank or not all(isinstance(v, int) for v in values):
        return None
    return tuple(int(v) for v in values)


def layer_geometry(weight_shape: tuple[int, ...], stride: Any, padding: Any, dilation: Any, groups: int,
                   transposed: bool) -> Geometry | None:
    """Where an ATen convolution's kernel reads its input, from its arguments (what
    :func:`~bnfold.backends.modules.geometry` reads off a module), or ``None`` when one is not plain integers.

    ATen convolutions pad with zeros: a module's other padding modes are an explicit pad op before the call.
    """
    kernel = tuple(int(k) for k in weight_shape[2:])
    return conv_geometry(kernel, _per_axis(stride, len(kernel), 1),
                         padding if padding in ("valid", "same") else _per_axis(padding, len(kernel), 0),
                         _per_axis(dilation, len(kernel), 1), groups, transposed=transposed)
