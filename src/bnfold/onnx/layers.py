"""What each ONNX linear node kind can absorb, and along which weight axis: the one table of node knowledge.

One small :class:`LinearKind` per op type, each with a hook for its output and its input channel axis (the
weight layouts are listed in :mod:`bnfold.affine`). Adding a node kind means adding one entry to :data:`KINDS`.

* ``Conv``           W ``(out, in/group, *k)``   out axis 0, in axis 1, grouped
* ``ConvTranspose``  W ``(in, out/group, *k)``   out axis 1, in axis 0, grouped
* ``Gemm``           B ``(K, N)``, or ``(N, K)`` with ``transB=1``: out axis 1 (0 when transposed)
* ``MatMul``         B ``(K, N)`` constant and 2-D: out axis 1, in axis 0
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from .graph import attribute


@dataclass(frozen=True)
class LinearKind:
    """How one op type stores its weight and bias."""

    op_type: str
    bias_slot: int | None
    """Input index of the bias, or None when the op has no bias input (MatMul becomes a Gemm to get one)."""
    backward: bool
    """Whether a per-channel affine on the input folds exactly into it (given the node's own checks)."""

    weight_slot: int = 1

    def groups(self, node: onnx.NodeProto) -> int:
        if self.op_type in ("Conv", "ConvTranspose"):
            return int(attribute(node, "group", 1))  # type: ignore[arg-type]
        return 1

    def out_axis(self, node: onnx.NodeProto) -> int:
        if self.op_type == "Conv":
            return 0
        if self.op_type == "Gemm":
            return 0 if attribute(node, "transB", 0) else 1
        return 1  # ConvTranspose, MatMul

    def in_axis(self, node: onnx.NodeProto) -> int:
        return 1 - self.out_axis(node)

    def channels(self, node: onnx.NodeProto, weight_shape: tuple[int, ...], axis: int) -> int:
        """Channels the weight's ``axis`` stands for: axis 1 of a grouped layout holds one group's share."""
        if len(weight_shape) < 2:
            return -1
        if axis == 0:
            return weight_shape[0]
        return self.groups(node) * weight_shape[1]


KINDS: dict[str, LinearKind] = {
    kind.op_type: kind
    for kind in (
        LinearKind("Conv", bias_slot=2, backward=True),
        LinearKind("ConvTranspose", bias_slot=2, backward=False),
        LinearKind("Gemm", bias_slot=2, backward=True),
        LinearKind("MatMul", bias_slot=None, backward=True),
    )
}
"""Node kinds a BatchNormalization can fold into, by op type (default ONNX domain only)."""

ONNX_DOMAINS = ("", "ai.onnx")


def kind_of(node: onnx.NodeProto) -> LinearKind | None:
    """The :class:`LinearKind` of ``node``, or None when bnfold does not know how to fold into it."""
    if node.domain not in ONNX_DOMAINS:
        return None
    return KINDS.get(node.op_type)
