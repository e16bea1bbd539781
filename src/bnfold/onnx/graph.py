"""Who feeds whom in an ONNX graph, and which tensors are constants.

The planner asks three kinds of question of a graph: which node produces a tensor, which nodes (and graph outputs)
read it, and whether a tensor is a constant it may rewrite. :class:`GraphIndex` answers them from one scan of the
top-level graph. Names read from inside subgraphs (the bodies of ``If``/``Loop``/``Scan``) count as readers too,
so a tensor a subgraph uses is never treated as private to one node.

An initializer that is also listed among the graph inputs is *not* a constant: ONNX lets the caller override it at
run time, so folding it in would change what the model computes.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

FLOAT_TYPES = frozenset(
    {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
)
SUBGRAPH = "<subgraph>"
"""Stands in, among a tensor's readers, for every use of it inside a subgraph."""


def display_name(node: onnx.NodeProto) -> str:
    """A node's name, or, for the many exporters that leave names empty, its kind and first output."""
    return node.name or f"{node.op_type}:{node.output[0] if node.output else '?'}"


def attribute(node: onnx.NodeProto, name: str, default: object = None) -> object:
    """The value of attribute ``name`` of ``node`` (ints, floats, strings decoded), or ``default``."""
    for attr in node.attribute:
        if attr.name == name:
            value = onnx.helper.get_attribute_value(attr)
            return value.decode() if isinstance(value, bytes) else value
    return default


def set_attribute(node: onnx.NodeProto, name: str, value: object) -> None:
    """Set (replace or add) attribute ``name`` of ``node``."""
    for i, attr in enumerate(node.attribute):
        if attr.name == name:
            del node.attribute[i]
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))


def _subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name read anywhere inside ``graph`` (recursively), including its own locals."""
    names: set[str] = set()
    for node in graph.node:
        names.update(n for n in node.input if n)
        for attr in node.attribute:
            for sub in _attribute_graphs(attr):
                names |= _subgraph_reads(sub)
    names.update(o.name for o in graph.output)
    return names


def _attribute_graphs(attr: onnx.AttributeProto) -> list[onnx.GraphProto]:
    if attr.type == onnx.AttributeProto.GRAPH:
        return [attr.g]
    if attr.type == onnx.AttributeProto.GRAPHS:
        return list(attr.graphs)
    return []


@dataclass
class GraphIndex:
    """Producers, readers and constants of one top-level ONNX graph, as it is now (rebuild after a rewrite)."""

    graph: onnx.GraphProto
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    """The graph's nodes in order; every node the index hands out is one of these objects (compare with ``is``)."""
    producer: dict[str, onnx.NodeProto] = field(default_factory=dict)
    readers: dict[str, list[onnx.NodeProto | str]] = field(default_factory=lambda: defaultdict(list))
    initializers: dict[str, onnx.TensorProto] = field(default_factory=dict)
    constant_nodes: dict[str, onnx.NodeProto] = field(default_factory=dict)
    identities: dict[str, onnx.NodeProto] = field(default_factory=dict)
    """Identity nodes by output: the TorchScript exporter shares equal parameters through them."""
    graph_inputs: set[str] = field(default_factory=set)
    graph_outputs: set[str] = field(default_factory=set)
    subgraph_norms: int = 0

    @classmethod
    def build(cls, graph: onnx.GraphProto) -> GraphIndex:
        index = cls(graph=graph, nodes=list(graph.node))
        index.initializers = {t.name: t for t in graph.initializer}
        index.graph_inputs = {i.name for i in graph.input}
        index.graph_outputs = {o.name for o in graph.output}
        for node in index.nodes:
            for name in node.output:
                if name:
                    index.producer[name] = node
            for name in node.input:
                if name:
                    index.readers[name].append(node)
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                index.constant_nodes[node.output[0]] = node
            if node.op_type == "Identity" and node.domain in ("", "ai.onnx") and node.input and node.input[0]:
                index.identities[node.output[0]] = node
            for attr in node.attribute:
                for sub in _attribute_graphs(attr):
                    for name in _subgraph_reads(sub):
                        index.readers[name].append(SUBGRAPH)
                    index.subgraph_norms += _count_norms(sub)
        return index

    def readers_of(self, name: str) -> list[onnx.NodeProto | str]:
        """Every use of ``name``: a node once per input slot it fills, :data:`SUBGRAPH` for uses in subgraphs."""
        return list(self.readers.get(name, []))

    def source(self, name: str) -> str:
        """``name`` with Identity nodes looked through: the tensor whose value ``name`` carries."""
        seen = 0
        while name in self.identities and seen < len(self.identities):
            name = self.identities[name].input[0]
            seen += 1
        return name

    def is_constant(self, name: str) -> bool:
        """True for an initializer the caller cannot override, or a ``Constant`` node's tensor (through Identity)."""
        name = self.source(name)
        if name in self.initializers:
            return name not in self.graph_inputs
        node = self.constant_nodes.get(name)
        return node is not None and attribute(node, "value") is not None

    def constant_kind(self, name: str) -> str:
        """How a non-constant tensor comes about, in words for a reason: 'a graph input', 'computed by ...'."""
        name = self.source(name)
        if name in self.graph_inputs:
            return "a graph input (the caller can change it at run time)"
        if name in self.producer:
            node = self.producer[name]
            return f"computed by {node.op_type} node '{display_name(node)}'"
        return "not defined in the graph"

    def tensor(self, name: str) -> onnx.TensorProto:
        """The TensorProto of constant ``name`` (initializer or ``Constant`` value, through Identity nodes)."""
        name = self.source(name)
        if name in self.initializers:
            return self.initializers[name]
        value = attribute(self.constant_nodes[name], "value")
        if not isinstance(value, onnx.TensorProto):
            raise KeyError(name)
        return value

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of constant ``name``, without converting its data."""
        return tuple(self.tensor(name).dims)

    def dtype(self, name: str) -> int:
        """ONNX element type of constant ``name``."""
        return self.tensor(name).data_type

    def array(self, name: str) -> np.ndarray:
        """Value of constant ``name`` as a numpy array, in float64 for float tensors (the precision folding uses)."""
        array = numpy_helper.to_array(self.tensor(name))
        if self.dtype(name) in FLOAT_TYPES:
            return array.astype(np.float64)
        return array


def _count_norms(graph: onnx.GraphProto) -> int:
    count = 0
    for node in graph.node:
        if node.op_type == "BatchNormalization":
            count += 1
        for attr in node.attribute:
            for sub in _attribute_graphs(attr):
                count += _count_norms(sub)
    return count


def float_parameter_count(graph: onnx.GraphProto) -> int:
    """Total elements of the float initializers: the ONNX counterpart of a module's parameter count."""
    total = 0
    for tensor in graph.initializer:
        if tensor.data_type in FLOAT_TYPES:
            total += int(np.prod(tensor.dims, dtype=np.int64))
    return total


def tensor_ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Rank of every top-level tensor whose rank ONNX shape inference can tell (inputs, outputs, value_info)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # shape inference is a convenience here; without it MatMul folds are left with a reason
        inferred = model
    ranks: dict[str, int] = {}
    graph = inferred.graph
    for info in list(graph.value_info) + list(graph.input) + list(graph.output):
        tensor_type = info.type.tensor_type
        if info.type.HasField("tensor_type") and tensor_type.HasField("shape"):
            ranks[info.name] = len(tensor_type.shape.dim)
    for tensor in graph.initializer:
        ranks[tensor.name] = len(tensor.dims)
    return ranks
