"""Carry out one planned fold on the graph: rewrite initializers, rewire tensors, remove the norm node.

All arithmetic happens in float64 through :mod:`bnfold.affine` and is rounded once, when the result is stored in
the dtype of the tensor it replaces (float32, float64, float16 or bfloat16).

Tensors are rewritten in place only when the node being folded is their sole reader. A weight shared with another
node (or a ``Constant`` node's value) is copied into a new initializer for this node, which keeps the fold exact;
the copy is reported in a note, because the model grows by its size.

A fold whose new weight or bias does not fit its dtype (a scale of 3e5 stored in float16, whose largest value is
65504) raises :class:`FoldOverflow` before anything is written; the pipeline leaves that norm with the reason.

Forward folds keep the norm's output name (the producer, or the bias Add after a MatMul, takes it over), so graph
outputs and downstream readers see the same name; backward folds point the consumers at the norm's input.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..affine import backward_bias, bn_scale_shift, forward_bias, scale_channels
from .graph import SUBGRAPH, GraphIndex, attribute, display_name, set_attribute
from .layers import KINDS
from .planner import BackwardFold, ForwardFold

Write = tuple[onnx.NodeProto, int, np.ndarray, int, str]
"""One planned store: ``(node, input slot, float64 value, ONNX data type, role)``."""


class FoldOverflow(Exception):
    """A fold would store a value its tensor's dtype cannot hold (inf / NaN); nothing was written."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _stored(value: np.ndarray, data_type: int) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        return value.astype(helper.tensor_dtype_to_np_dtype(data_type))


def check_range(writes: list[Write], old_values: list[np.ndarray | None]) -> None:
    """Raise :class:`FoldOverflow` if a write would hold inf / NaN where the value it replaces was finite."""
    for (_, _, value, data_type, role), old in zip(writes, old_values, strict=True):
        stored = _stored(value, data_type).astype(np.float64)
        bad = ~np.isfinite(stored)
        if old is not None and old.shape == stored.shape:
            bad &= np.isfinite(old)
        if bad.any():
            name = helper.tensor_dtype_to_string(data_type).removeprefix("TensorProto.").lower()
            peak = float(np.nanmax(np.abs(value))) if value.size else float("nan")
            largest = float(np.finfo(np.float32).max) if name == "bfloat16" else float(
                np.finfo(helper.tensor_dtype_to_np_dtype(data_type)).max
            )
            raise FoldOverflow(
                f"folding would overflow {name}: the folded {role} reaches {peak:.1e}, beyond the largest {name} "
                f"({largest:.1e}); the model computes this norm in a wider range than its layer can store"
            )


class Rewriter:
    """Applies folds to one graph; collects notes and the names of tensors that disappeared."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.notes: list[str] = []
        self.removed: set[str] = set()
        self.candidates: set[str] = set()
        """Tensors a fold stopped reading; :meth:`cleanup` drops those nobody reads any more."""
        self._names: set[str] | None = None

    # -- names -------------------------------------------------------------------------------------------------
    def _taken(self) -> set[str]:
        if self._names is None:
            graph = self.graph
            names = {t.name for t in graph.initializer} | {i.name for i in graph.input}
            names |= {o.name for o in graph.output} | {v.name for v in graph.value_info}
            for node in graph.node:
                names.update(node.output)
                names.update(node.input)
            self._names = names
        return self._names

    def unique(self, base: str) -> str:
        taken = self._taken()
        name, n = f"{base}_bnfold", 1
        while name in taken:
            n += 1
            name = f"{base}_bnfold{n}"
        taken.add(name)
        return name

    # -- tensors -----------------------------------------------------------------------------------------------
    def write(
        self, index: GraphIndex, node: onnx.NodeProto, slot: int, value: np.ndarray, data_type: int, role: str
    ) -> None:
        """Store ``value`` (float64) as input ``slot`` of ``node``, rounded once to ``data_type``.

        Rewrites the existing initializer when ``node`` is its only reader; otherwise (shared, a Constant node's
        value, or no tensor yet) adds a new initializer and points the slot at it.
        """
        array = _stored(value, data_type)
        old = node.input[slot] if len(node.input) > slot else ""
        if old and old in index.initializers and self._sole_reader(index, old, node):
            index.initializers[old].CopyFrom(numpy_helper.from_array(array, old))
            return
        if old:
            self.candidates.add(old)
        name = self.unique(old or f"{display_name(node).replace(':', '_')}_{role}")
        self.graph.initializer.append(numpy_helper.from_array(array, name))
        while len(node.input) <= slot:
            node.input.append("")
        node.input[slot] = name
        if old and old in index.identities:
            self.notes.append(
                f"{role} '{old}' of '{display_name(node)}' is an Identity of '{index.source(old)}' (an exporter "
                f"sharing equal parameters); '{display_name(node)}' got its own initializer '{name}'"
            )
        elif old and index.source(old) in index.constant_nodes:
            self.notes.append(
                f"{role} '{old}' of '{display_name(node)}' came from a Constant node; its folded value is the "
                f"initializer '{name}' ({array.size:,} values, now counted among the parameters)"
            )
        elif old and old in index.initializers:
            others = sorted(
                {
                    "a subgraph" if r is SUBGRAPH else f"'{display_name(r)}'"
                    for r in index.readers_of(old)
                    if r is not node
                }
            )
            shared = ", ".join(others) or "a graph output"
            self.notes.append(
                f"{role} '{old}' of '{display_name(node)}' is shared with {shared}; '{display_name(node)}' got its own "
                f"copy '{name}' so the fold stays exact (the model grows by {array.size:,} values)"
            )

    @staticmethod
    def _sole_reader(index: GraphIndex, name: str, node: onnx.NodeProto) -> bool:
        readers = index.readers_of(name)
        return len(readers) == 1 and readers[0] is node and name not in index.graph_outputs

    # -- folds -------------------------------------------------------------------------------------------------
    @staticmethod
    def _commit_checked(index: GraphIndex, writes: list[Write]) -> None:
        """Check every planned store against its dtype's range (:func:`check_range`) before any is made."""
        old_values = []
        for node, slot, _, _, _ in writes:
            name = node.input[slot] if len(node.input) > slot else ""
            old_values.append(index.array(name) if name and index.is_constant(name) else None)
        check_range(writes, old_values)

    def forward(self, index: GraphIndex, fold: ForwardFold) -> None:
        """``y = s * layer(x) + t``  ->  ``W' = W * s`` (output channels), ``b' = s * b + t``.

        Raises :class:`FoldOverflow`, with the graph untouched, when a new tensor does not fit its dtype.
        """
        scale, shift = norm_affine(index, fold.norm)
        node = fold.producer
        kind = KINDS[node.op_type]
        weight_name = node.input[kind.weight_slot]
        weight = index.array(weight_name)
        weight_type = index.dtype(weight_name)
        folded = scale_channels(weight, scale, kind.out_axis(node), kind.groups(node))
        writes: list[Write] = [(node, kind.weight_slot, folded, weight_type, "weight")]
        reset_beta = False
        if node.op_type == "MatMul" and fold.bias_add is not None:
            add = fold.bias_add
            slot = 1 if add.input[0] == node.output[0] else 0
            bias = index.array(add.input[slot])
            writes.append((add, slot, forward_bias(bias, scale, shift), index.dtype(add.input[slot]), "bias"))
        elif node.op_type == "MatMul":
            writes.append((node, 2, shift, weight_type, "bias"))
        else:
            bias_name = node.input[2] if len(node.input) > 2 else ""
            bias = index.array(bias_name) if bias_name else None
            bias_type = index.dtype(bias_name) if bias_name else weight_type
            if node.op_type == "Gemm":
                beta = float(attribute(node, "beta", 1.0))  # type: ignore[arg-type]
                if bias is not None:
                    bias = bias * beta
                reset_beta = beta != 1.0  # the folded C carries beta (and a C added now must not be scaled by it)
            writes.append((node, 2, forward_bias(bias, scale, shift), bias_type, "bias"))
        self._commit_checked(index, writes)
        if node.op_type == "MatMul" and fold.bias_add is None:
            node.op_type = "Gemm"  # a 2-D MatMul is a Gemm without bias; the Gemm gives the shift a place
        if reset_beta:
            set_attribute(node, "beta", 1.0)
        for write in writes:
            self.write(index, *write)
        last = fold.bias_add if fold.bias_add is not None else node
        self.removed.add(last.output[0])
        last.output[0] = fold.norm.output[0]
        self._remove_norm(index, fold.norm)

    def backward(self, index: GraphIndex, fold: BackwardFold) -> None:
        """``layer(s * x + t)``  ->  ``W' = W * s`` (input channels), ``b' = b + sum W * t``.

        Raises :class:`FoldOverflow`, with the graph untouched, when a new tensor does not fit its dtype.
        """
        scale, shift = norm_affine(index, fold.norm)
        writes: list[Write] = []
        gemms: list[tuple[onnx.NodeProto, bool]] = []
        for node in fold.consumers:
            kind = KINDS[node.op_type]
            weight_name = node.input[kind.weight_slot]
            weight = index.array(weight_name)
            weight_type = index.dtype(weight_name)
            in_axis, groups = kind.in_axis(node), kind.groups(node)
            folded = scale_channels(weight, scale, in_axis, groups)
            bias_name = node.input[2] if len(node.input) > 2 else ""
            bias = index.array(bias_name) if bias_name else None
            bias_type = index.dtype(bias_name) if bias_name else weight_type
            if node.op_type in ("MatMul", "Gemm"):
                alpha = float(attribute(node, "alpha", 1.0))  # type: ignore[arg-type]
                beta = float(attribute(node, "beta", 1.0))  # type: ignore[arg-type]
                new_bias = backward_bias(weight, None, shift, in_axis) * alpha
                if bias is not None:
                    new_bias = bias * beta + new_bias
                gemms.append((node, beta != 1.0))
            else:
                new_bias = backward_bias(weight, bias, shift, in_axis, groups)
            writes.append((node, kind.weight_slot, folded, weight_type, "weight"))
            writes.append((node, 2, new_bias, bias_type, "bias"))
        self._commit_checked(index, writes)
        for node, reset_beta in gemms:
            node.op_type = "Gemm"
            if reset_beta:
                set_attribute(node, "beta", 1.0)
        for write in writes:
            self.write(index, *write)
        for node in fold.consumers:
            node.input[0] = fold.norm.input[0]
        self.removed.add(fold.norm.output[0])
        self._remove_norm(index, fold.norm)

    def _remove_norm(self, index: GraphIndex, norm: onnx.NodeProto) -> None:
        self.candidates.update(n for n in norm.input[1:] if n)
        position = next(i for i, node in enumerate(index.nodes) if node is norm)
        del self.graph.node[position]
        self._names = None

    # -- cleanup -----------------------------------------------------------------------------------------------
    def cleanup(self) -> None:
        """Drop the tensors folds stopped reading (initializers, outputs of Constant and Identity nodes) that
        nobody reads any more, then value_info of tensors that no longer exist."""
        candidates = set(self.candidates)
        while candidates:
            index = GraphIndex.build(self.graph)
            unused = {n for n in candidates if not index.readers_of(n) and n not in index.graph_outputs}
            unused -= index.graph_inputs
            candidates = set()
            for i in reversed(range(len(self.graph.initializer))):
                if self.graph.initializer[i].name in unused:
                    self.removed.add(self.graph.initializer[i].name)
                    del self.graph.initializer[i]
            for i in reversed(range(len(self.graph.node))):
                node = self.graph.node[i]
                if node.op_type in ("Constant", "Identity") and node.output[0] in unused:
                    self.removed.add(node.output[0])
                    candidates.update(n for n in node.input if n)
                    del self.graph.node[i]
        alive = {n for node in self.graph.node for n in node.output} | {i.name for i in self.graph.input}
        alive |= {t.name for t in self.graph.initializer}
        for i in reversed(range(len(self.graph.value_info))):
            name = self.graph.value_info[i].name
            if name in self.removed and name not in alive:
                del self.graph.value_info[i]
        self._names = None


def norm_affine(index: GraphIndex, norm: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray]:
    """The norm's ``(s, t)`` in float64: ``s = gamma / sqrt(var + eps)``, ``t = beta - mean * s``."""
    gamma, beta, mean, var = (index.array(name) for name in norm.input[1:5])
    eps = float(attribute(norm, "epsilon", 1e-5))  # type: ignore[arg-type]
    return bn_scale_shift(mean, var, eps, gamma, beta)
