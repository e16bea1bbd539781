"""Branch merges in ONNX files: the core's :class:`~bnfold.core.merge.MergePlan` written into an ONNX graph.

The adapter (:mod:`bnfold.onnx.adapter`) translates the graph for folding; this module adds what merging needs on
top of that translation (whose facts hold each ``Conv``'s geometry), the geometry of each ``Gemm`` with ``transB=1`` (a
fully connected layer), and the ``Add`` nodes as the core's ``add`` kind, then lets the core plan and compute (the same
:func:`~bnfold.core.merge.plan_merges` and :func:`~bnfold.core.apply.merge_one` as for an ``nn.Module``), and
rewrites the graph: the merged ``Conv`` takes the sum's output name, the additions, the other branches' Conv and
BatchNormalization nodes and the identities between are removed, and initializers nobody reads any more are
dropped. Works without torch, like the rest of the ONNX backend.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import onnx
from onnx import helper

from ..core.apply import MergeOverflow, merge_one
from ..core.graph import LAYER, NORM, OP, Geometry, Graph, OpFacts
from ..core.merge import Merge, MergeRefusal, plan_merges
from ..report import MergeEntry, NormEntry, record_merges
from .adapter import ONNX_DOMAINS, OnnxWeights, Translation, _label, attribute, display_name, to_graph
from .adapter import arithmetic_facts as adapter_arithmetic_facts

MAX_ROUNDS = 4
"""Merges and folds alternate at most this often (see :mod:`bnfold.backends.module_merges`)."""


_ARITHMETIC = {"Add": "add", "Sub": "sub", "Mul": "mul", "Neg": "mul"}
"""ONNX ops the merge planner reads as linear combinations, and their core kinds (``Neg`` is ``x * -1``)."""


def arithmetic_facts(node: onnx.NodeProto, translation: Translation) -> OpFacts | None:
    """An ``Add`` / ``Sub`` / ``Mul`` / ``Neg`` in the core's terms (:func:`bnfold.onnx.adapter.arithmetic_facts`)."""
    return adapter_arithmetic_facts(node, translation.tensors, translation.node_of)


def annotate(model: onnx.ModelProto, translation: Translation) -> dict[int, onnx.NodeProto]:
    """Give the translated graph what merging needs, in place: each Gemm's geometry (none for a layer whose bias is
    a separate Add), each Add / Sub / Mul / Neg its kind and operands (:func:`arithmetic_facts`).

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
            if found[0].op_type in _ARITHMETIC and found[0].domain in ONNX_DOMAINS:
                core.op = arithmetic_facts(found[0], translation) or core.op
    return nodes


def _rewrite(model: onnx.ModelProto, access: OnnxWeights, merge: Merge, graph: Graph,
             nodes: dict[int, onnx.NodeProto]) -> str | None:
    """Make the merged layer compute the sum: it takes the root's output name, the removed nodes go. Returns why
    that is not possible (a removed value read by a node outside the block), or None once done."""
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
        output = root.output[0] if i == len(kept) - 1 else access._unique(f"{root.output[0]}_partial")
        add = helper.make_node("Add", [current, name], [output], name=access._unique(display_name(root)))
        tensors.readers[current] = [*tensors.readers.get(current, []), add]
        tensors.readers[name] = [*tensors.readers.get(name, []), add]
        tensors.producer[output] = add
        added.append(add)
        current = output
    at = next(i for i, node in enumerate(tensors.nodes) if node is root)
    tensors.nodes[at:at] = added  # where the root was: after every term it read


@dataclass
class OnnxMergeRound:
    """One round of :func:`merge_once`: the merges made (named by their sum's node), the labels of each one's kept
    terms, the blocks left, notes, and whether a split left terms another round may merge."""

    merges: list[Merge] = field(default_factory=list)
    kept: list[tuple[str, ...]] = field(default_factory=list)
    refusals: list[MergeRefusal] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    again: bool = False


def merge_once(model: onnx.ModelProto) -> OnnxMergeRound:
    """One round on ``model`` (a copy the caller owns, folded already): plan, compute, rewrite in place."""
    translation = to_graph(model)
    nodes = annotate(model, translation)
    plan = plan_merges(translation.graph, split_sums=True)
    graph = translation.graph

    def name_of(index: int) -> str:
        return graph.nodes[index].label

    done = OnnxMergeRound(refusals=[dataclasses.replace(r, block=name_of(r.root)) for r in plan.refusals],
                          again=plan.again)
    refusals = done.refusals
    access = OnnxWeights(model, translation)
    for merge in plan.merges:
        if merge.into not in translation.layers:
            refusals.append(MergeRefusal(name_of(merge.root), merge.root, f"'{merge.into}' is not a Conv"))
            continue
        blocked = _rewrite(model, access, merge, graph, nodes)
        kept = _kept_tensors(merge, translation, nodes) if merge.kept else []
        if blocked is None and kept is None:
            blocked = "bnfold cannot tell which tensors the terms left after the merge are"
        if blocked is None:
            try:
                merge_one(merge, access)
            except MergeOverflow as overflow:
                blocked = str(overflow)
        if blocked is not None:
            refusals.append(MergeRefusal(name_of(merge.root), merge.root, blocked))
            continue
        assert kept is not None
        _apply_rewrite(access, merge, nodes, kept)
        done.merges.append(dataclasses.replace(merge, block=name_of(merge.root)))
        done.kept.append(tuple(name_of(index) for index in merge.kept))
    if done.merges:
        access.finish()
    done.notes = list(dict.fromkeys(access.notes))
    return done


@dataclass
class OnnxMergeOutcome:
    """What :func:`merge_rounds` did to the model it was handed."""

    model: onnx.ModelProto
    entries: list[MergeEntry] = field(default_factory=list)
    absorbed_norms: dict[str, str] = field(default_factory=dict)
    folded_norms: dict[str, NormEntry] = field(default_factory=dict)  # folded in a later round
    notes: list[str] = field(default_factory=list)


def merge_rounds(model: onnx.ModelProto,
                 fold_again: Callable[[onnx.ModelProto], tuple[onnx.ModelProto, dict[str, NormEntry]]]
                 ) -> OnnxMergeOutcome:
    """Merge the summed branches of ``model`` (folded, owned by the caller), fold what that made foldable
    (``fold_again(model)`` returns the folded model and the report entries of the norms it folded), and repeat while
    anything changes."""
    outcome = OnnxMergeOutcome(model)
    left: list[MergeEntry] = []
    for _ in range(MAX_ROUNDS):
        done = merge_once(outcome.model)
        outcome.notes.extend(done.notes)
        left = record_merges(zip(done.merges, done.kept, strict=True), done.refusals, outcome.entries,
                             outcome.absorbed_norms)
        if not done.merges:
            break
        outcome.model, folds = fold_again(outcome.model)
        outcome.folded_norms.update(folds)
        if not folds and not done.again:
            break
    outcome.entries.extend(left)
    return outcome
