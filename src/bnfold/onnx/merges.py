"""Branch merges in ONNX files: the core's merge rounds (:mod:`bnfold.core.merge_rounds`) plan on the
adapter's translation, and :class:`OnnxMerges` writes each merge into the graph (the merged ``Conv`` takes the
sum's output name; the block's other nodes go, and the initializers nobody reads any more).
"""

from __future__ import annotations

import dataclasses

import onnx
from onnx import helper

from ..core import pipeline
from ..core.graph import LAYER, NORM, OP, Geometry, Graph
from ..core.merge import Merge
from ..report import FOLDED, NormEntry
from .adapter import OnnxBackend, OnnxWeights, Translation, _label, attribute, display_name, to_graph


def annotate(model: onnx.ModelProto, translation: Translation) -> dict[int, onnx.NodeProto]:
    """Give the translated graph what merging needs, in place: each Gemm's geometry, none for a layer whose
    bias is a separate Add (sums and products are linear combinations already: see ``arithmetic_facts``).

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
        elif core.kind == OP and len(labels.get(core.label, [])) == 1:
            nodes[core.index] = labels[core.label][0]
    return nodes


class OnnxMerges:
    """An ONNX model as merge rounds see it (:class:`~bnfold.core.merge_rounds.MergeTarget`): ``model`` (a copy the
    caller owns, folded already) is rewritten in place; ``folded_norms`` gathers the report entries of the
    norms each round folds again, ``notes`` what the writes noted."""

    def __init__(self, model: onnx.ModelProto, model_name: str) -> None:
        self.model = model
        self.model_name = model_name
        self.folded_norms: dict[str, NormEntry] = {}
        self.notes: list[str] = []

    def translate(self) -> Graph:
        self.translation = to_graph(self.model)
        self.access = OnnxWeights(self.model, self.translation)
        self.nodes = annotate(self.model, self.translation)
        return self.translation.graph

    def start(self, merges: list[Merge]) -> None:
        pass

    def name(self, index: int) -> str:
        return self.translation.graph.nodes[index].label

    def blocked(self, merge: Merge) -> str | None:
        """Why the merged layer cannot take the root's output name with the removed nodes gone (a removed
        value read by a node outside the block, or a graph output), or None. Finds the tensors of a split's
        kept terms, as the tree's ops read them, for :meth:`rewrite`."""
        if merge.into not in self.translation.layers:
            return f"'{merge.into}' is not a Conv"
        nodes, tensors = self.nodes, self.access.tensors
        missing = [self.name(i) for i in (*merge.removed, merge.root) if i not in nodes]
        if missing:
            return f"bnfold cannot tell which node {missing[0]} is (two nodes share that name)"
        removed = {id(nodes[i]) for i in merge.removed}
        inside = [nodes[i] for i in merge.removed if nodes[i] is not nodes[merge.root]]
        outputs = [name for node in inside for name in node.output if name]
        outputs.append(self.access.layers[merge.into].node.output[0])
        for name in outputs:
            if name in tensors.graph_outputs:
                return f"'{name}', inside the block, is also a graph output"
            for reader in tensors.readers.get(name, []):
                if id(reader) not in removed:
                    return f"'{name}', inside the block, is also read by {_label(reader)}"
        read = {name for index in merge.removed for name in nodes[index].input if name}
        self.kept = []
        for index in merge.kept:
            found = [name for name, at in self.translation.node_of.items() if at == index and name in read]
            if len(found) != 1:
                return "bnfold cannot tell which tensors the terms left after the merge are"
            self.kept.append(found[0])
        return None

    def rewrite(self, merge: Merge) -> tuple[str, ...]:
        """The merged layer computes the sum (it takes the root's output name); for a split, new ``Add``
        nodes at the root's place add the kept terms to its output and write the root's output. The tree's
        nodes go."""
        access, tensors = self.access, self.access.tensors
        into, root = access.layers[merge.into].node, self.nodes[merge.root]
        for index in merge.removed:
            node = self.nodes[index]
            access.removed_nodes.add(id(node))
            access.stale.update(n for n in (*node.input, *node.output) if n and n != root.output[0])
            for name in filter(None, node.input):
                tensors.readers[name] = [r for r in tensors.readers.get(name, []) if r is not node]
        if not self.kept:
            old = into.output[0]
            into.output[0] = root.output[0]
            tensors.producer[root.output[0]] = into
            tensors.readers.pop(old, None)
            access.stale.add(old)
        else:
            added: list[onnx.NodeProto] = []
            current = into.output[0]
            for i, name in enumerate(self.kept):
                last = i == len(self.kept) - 1
                output = root.output[0] if last else access.new_name(f"{root.output[0]}_partial")
                name_of_add = access.new_name(display_name(root))
                add = helper.make_node("Add", [current, name], [output], name=name_of_add)
                tensors.readers[current] = [*tensors.readers.get(current, []), add]
                tensors.readers[name] = [*tensors.readers.get(name, []), add]
                tensors.producer[output] = add
                added.append(add)
                current = output
            at = next(i for i, node in enumerate(tensors.nodes) if node is root)
            tensors.nodes[at:at] = added  # where the root was: after every term it read
        return tuple(self.name(index) for index in merge.kept)

    def commit(self) -> None:
        self.access.finish()
        self.notes.extend(dict.fromkeys(self.access.notes))

    def fold_again(self) -> bool:
        _, entries = pipeline.refold(OnnxBackend(self.model, self.model_name))
        folds = {name: entry for name, entry in entries.items() if entry.status == FOLDED}
        self.folded_norms.update(folds)
        return bool(folds)
