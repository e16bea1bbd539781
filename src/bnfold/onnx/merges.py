"""Branch merges in ONNX files: the core's merge rounds (:mod:`bnfold.core.merge_rounds`) plan on the adapter's
translation, and :class:`OnnxMerges` writes each merge into the graph (the merged ``Conv`` takes the sum's output
name; the block's other nodes go, and so do the initializers nobody reads any more). Works without torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import onnx
from onnx import helper

from ..core.graph import LAYER, NORM, OP, Geometry, Graph
from ..core.merge import Merge
from ..report import NormEntry
from .adapter import OnnxWeights, Translation, _label, attribute, display_name, to_graph


def annotate(model: onnx.ModelProto, translation: Translation) -> dict[int, onnx.NodeProto]:
    """Give the translated graph what merging needs, in place: each Gemm's geometry (none for a layer whose bias is
    a separate Add; the additions, subtractions and products are the core's linear combinations already:
    :func:`bnfold.onnx.adapter.arithmetic_facts`).

    Returns the ONNX node of every core node a merge may remove or rewrite (layers, norms, ops), by core index.
    Ops are found by their label, which names the node; a name two nodes share leaves both as they were.
    """
    graph = translation.graph
    labels: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        labels.setdefault(_label(node), []).append(node)
    nodes: dict[int, onnx.NodeProto] = {}
    for core in graph.nodes:
        if core.kind == LAYER and core.unit in translation.layers:
            layer = translation.layers[core.unit]
            nodes[core.index] = layer.node
            unit = graph.units[core.unit]
            if layer.node.op_type == "Gemm" and unit.layer is not None and attribute(layer.node, "transB", 0) \
                    and not attribute(layer.node, "transA", 0):
                unit.layer = dataclasses.replace(unit.layer, geometry=Geometry())  # (out, in) weights, like Linear
            elif layer.bias_add is not None and unit.layer is not None:  # a bias the rewrite would not move
                unit.layer = dataclasses.replace(unit.layer, geometry=None)
        elif core.kind == NORM and core.unit in translation.norms:
            nodes[core.index] = translation.norms[core.unit]
        elif core.kind == OP:
            found = labels.get(core.label, [])
            if len(found) != 1:
                continue
            nodes[core.index] = found[0]
    return nodes


def _rewrite_problem(access: OnnxWeights, merge: Merge, graph: Graph, nodes: dict[int, onnx.NodeProto]) -> str | None:
    """Why the merged layer cannot take the root's output name with the removed nodes gone (a removed value read by a
    node outside the block, or a graph output), or None."""
    missing = [graph.nodes[i].label for i in (*merge.removed, merge.root) if i not in nodes]
    if missing:
        return f"bnfold cannot tell which node {missing[0]} is (two nodes share that name)"
    into = access.layers[merge.into].node
    removed = {id(nodes[i]) for i in merge.removed}
    root = nodes[merge.root]
    tensors = access.tensors
    outputs = [name for i in merge.removed for name in nodes[i].output if name and nodes[i] is not root]
    outputs.append(into.output[0])
    for name in outputs:
        if name in tensors.graph_outputs:
            return f"'{name}', inside the block, is also a graph output"
        for reader in tensors.readers.get(name, []):
            if id(reader) not in removed:
                return f"'{name}', inside the block, is also read by {_label(reader)}"
    return None


def _kept_tensors(merge: Merge, translation: Translation, nodes: dict[int, onnx.NodeProto]) -> list[str] | None:
    """The tensor names of a split's kept terms, as the tree's ops read them; None if one cannot be found."""
    read = {name for index in merge.removed if index in nodes for name in nodes[index].input if name}
    names = []
    for index in merge.kept:
        found = [name for name, producer in translation.node_of.items() if producer == index and name in read]
        if len(found) != 1:
            return None
        names.append(found[0])
    return names


def _apply_rewrite(access: OnnxWeights, merge: Merge, nodes: dict[int, onnx.NodeProto], kept: list[str]) -> None:
    """The merged layer computes the sum (it takes the root's output name); for a split, new ``Add`` nodes at the
    root's place add the kept terms to its output and write the root's output. The tree's nodes go."""
    into = access.layers[merge.into].node
    root = nodes[merge.root]
    tensors = access.tensors
    for index in merge.removed:
        node = nodes[index]
        access.removed_nodes.add(id(node))
        access.stale.update(n for n in (*node.input, *node.output) if n and n != root.output[0])
        for name in node.input:
            if name:
                tensors.readers[name] = [r for r in tensors.readers.get(name, []) if r is not node]
    if not kept:
        old = into.output[0]
        into.output[0] = root.output[0]
        tensors.producer[root.output[0]] = into
        tensors.readers.pop(old, None)
        access.stale.add(old)
        return
    added: list[onnx.NodeProto] = []
    current = into.output[0]
    for i, name in enumerate(kept):
        output = root.output[0] if i == len(kept) - 1 else access.names.new(f"{root.output[0]}_partial")
        add = helper.make_node("Add", [current, name], [output], name=access.names.new(display_name(root)))
        tensors.readers[current] = [*tensors.readers.get(current, []), add]
        tensors.readers[name] = [*tensors.readers.get(name, []), add]
        tensors.producer[output] = add
        added.append(add)
        current = output
    at = next(i for i, node in enumerate(tensors.nodes) if node is root)
    tensors.nodes[at:at] = added  # where the root was: after every term it read


class OnnxMerges:
    """An ONNX model as merge rounds see it (:class:`~bnfold.core.merge_rounds.MergeTarget`): ``model`` (a copy the
    caller owns, folded already) is rewritten in place; ``fold_again(model)`` returns the folded model and the report
    entries of the norms it folded, gathered in ``folded_norms``; ``notes`` gathers what the writes noted."""

    def __init__(self, model: onnx.ModelProto,
                 fold_again: Callable[[onnx.ModelProto], tuple[onnx.ModelProto, dict[str, NormEntry]]]) -> None:
        self.model = model
        self._fold_again = fold_again
        self.folded_norms: dict[str, NormEntry] = {}
        self.notes: list[str] = []

    def translate(self) -> Graph:
        self.translation = to_graph(self.model)
        self.nodes = annotate(self.model, self.translation)
        self.access = OnnxWeights(self.model, self.translation)
        return self.translation.graph

    def start(self, merges: list[Merge]) -> None:
        pass

    def name(self, index: int) -> str:
        return self.translation.graph.nodes[index].label

    def blocked(self, merge: Merge) -> str | None:
        if merge.into not in self.translation.layers:
            return f"'{merge.into}' is not a Conv"
        blocked = _rewrite_problem(self.access, merge, self.translation.graph, self.nodes)
        self.kept = _kept_tensors(merge, self.translation, self.nodes) if merge.kept else []
        if blocked is None and self.kept is None:
            return "bnfold cannot tell which tensors the terms left after the merge are"
        return blocked

    def rewrite(self, merge: Merge) -> tuple[str, ...]:
        assert self.kept is not None  # checked by blocked()
        _apply_rewrite(self.access, merge, self.nodes, self.kept)
        return tuple(self.name(index) for index in merge.kept)

    def commit(self) -> None:
        self.access.finish()
        self.notes.extend(dict.fromkeys(self.access.notes))

    def fold_again(self) -> bool:
        self.model, folds = self._fold_again(self.model)
        self.folded_norms.update(folds)
        return bool(folds)
