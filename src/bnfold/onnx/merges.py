"""Branch merges in ONNX files: the core's :class:`~bnfold.core.merge.MergePlan` written into an ONNX graph.

The adapter (:mod:`bnfold.onnx.adapter`) translates the graph for folding; this module adds what merging needs on
top of that translation, the geometry of each ``Conv`` (kernel, strides, pads, dilations, group, ``auto_pad``) and
``Gemm`` with ``transB=1`` (a fully connected layer), and the ``Add`` nodes as the core's ``add`` kind, then lets the core plan and compute (the same
:func:`~bnfold.core.merge.plan_merges` and :func:`~bnfold.core.apply.merge_one` as for an ``nn.Module``), and
rewrites the graph: the merged ``Conv`` takes the sum's output name, the additions, the other branches' Conv and
BatchNormalization nodes and the identities between are removed, and initializers nobody reads any more are
dropped. Works without torch, like the rest of the ONNX backend.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..core.apply import MergeOverflow, merge_one
from ..core.graph import LAYER, NORM, OP, Geometry, Graph, OpFacts
from ..core.merge import Merge, MergeRefusal, plan_merges
from ..report import LEFT, MERGED, MergeEntry, NormEntry
from .adapter import ONNX_DOMAINS, OnnxWeights, Translation, _label, attribute, to_graph

MAX_ROUNDS = 4
"""Merges and folds alternate at most this often (see :mod:`bnfold.backends.module_merges`)."""


def conv_geometry(node: onnx.NodeProto, weight_shape: tuple[int, ...], input_shape: tuple[int, ...] | None
                  ) -> Geometry | None:
    """The geometry of a ``Conv`` node, or ``None`` when it cannot be known (``auto_pad=SAME_*`` on an input of
    unknown shape)."""
    kernel = tuple(int(k) for k in weight_shape[2:])
    rank = len(kernel)
    strides = tuple(int(s) for s in (attribute(node, "strides") or [1] * rank))
    dilations = tuple(int(d) for d in (attribute(node, "dilations") or [1] * rank))
    auto_pad = str(attribute(node, "auto_pad", "NOTSET"))
    if auto_pad in ("NOTSET", ""):
        pads = [int(p) for p in (attribute(node, "pads") or [0] * (2 * rank))]
        padding = tuple((pads[i], pads[i + rank]) for i in range(rank))
    elif auto_pad == "VALID":
        padding = tuple((0, 0) for _ in kernel)
    else:
        if input_shape is None or len(input_shape) != rank + 2:
            return None
        pairs = []
        for size, k, s, d in zip(input_shape[2:], kernel, strides, dilations, strict=True):
            total = max((math.ceil(size / s) - 1) * s + d * (k - 1) + 1 - size, 0)
            small, large = total // 2, total - total // 2
            pairs.append((small, large) if auto_pad == "SAME_UPPER" else (large, small))
        padding = tuple(pairs)
    return Geometry(kernel, strides, padding, dilations, int(attribute(node, "group", 1)), "zeros", False)


def _add_facts(node: onnx.NodeProto, translation: Translation) -> OpFacts:
    """An ``Add`` as the core's ``add``: constant operands are scalars (0 when all their values are 0)."""
    scalars: list[object] = []
    for name in node.input:
        if translation.tensors.is_static(name):
            value = translation.tensors.value(name)
            scalars.append(0 if value is not None and not np.any(value) else f"'{name}'")
    return OpFacts("add", {"alpha": 1, "scalars": tuple(scalars)})


def annotate(model: onnx.ModelProto, translation: Translation) -> dict[int, onnx.NodeProto]:
    """Give the translated graph what merging needs, in place: each Conv's geometry, each Add the kind ``add``.

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
            elif layer.node.op_type == "Conv" and unit.layer is not None and layer.bias_add is None:
                shape = translation.shapes.get(layer.node.input[1])
                value = translation.tensors.value(layer.node.input[1]) if shape is None else None
                shape = shape if shape is not None else (None if value is None else tuple(value.shape))
                if shape is not None:
                    geometry = conv_geometry(layer.node, tuple(shape), translation.shapes.get(layer.node.input[0]))
                    unit.layer = dataclasses.replace(unit.layer, geometry=geometry)
        elif core.kind == NORM and core.unit in translation.norms:
            nodes[core.index] = translation.norms[core.unit]
        elif core.kind == OP:
            found = labels.get(core.label, [])
            if len(found) != 1:
                continue
            nodes[core.index] = found[0]
            if found[0].op_type == "Add" and found[0].domain in ONNX_DOMAINS:
                core.op = _add_facts(found[0], translation)
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


def _apply_rewrite(access: OnnxWeights, merge: Merge, nodes: dict[int, onnx.NodeProto]) -> None:
    into = access.layers[merge.into].node
    root = nodes[merge.root]
    tensors = access.tensors
    old = into.output[0]
    into.output[0] = root.output[0]
    tensors.producer[root.output[0]] = into
    tensors.readers.pop(old, None)
    access.stale.add(old)
    for index in merge.removed:
        node = nodes[index]
        access.removed_nodes.add(id(node))
        access.stale.update(n for n in (*node.input, *node.output) if n and n != root.output[0])
        for name in node.input:
            if name:
                tensors.readers[name] = [r for r in tensors.readers.get(name, []) if r is not node]


def merge_once(model: onnx.ModelProto) -> tuple[list[Merge], list[MergeRefusal], list[str]]:
    """One round on ``model`` (a copy the caller owns, folded already): plan, compute, rewrite in place.

    Returns the merges made, the blocks left (named by their sum's node) and notes.
    """
    translation = to_graph(model)
    nodes = annotate(model, translation)
    plan = plan_merges(translation.graph)
    graph = translation.graph

    def name_of(index: int) -> str:
        return graph.nodes[index].label

    refusals = [dataclasses.replace(r, block=name_of(r.root)) for r in plan.refusals]
    access = OnnxWeights(model, translation)
    merges: list[Merge] = []
    for merge in plan.merges:
        if merge.into not in translation.layers:
            refusals.append(MergeRefusal(name_of(merge.root), merge.root, f"'{merge.into}' is not a Conv"))
            continue
        blocked = _rewrite(model, access, merge, graph, nodes)
        if blocked is None:
            try:
                merge_one(merge, access)
            except MergeOverflow as overflow:
                blocked = str(overflow)
        if blocked is not None:
            refusals.append(MergeRefusal(name_of(merge.root), merge.root, blocked))
            continue
        _apply_rewrite(access, merge, nodes)
        merges.append(dataclasses.replace(merge, block=name_of(merge.root)))
    if merges:
        access.finish()
    return merges, refusals, list(dict.fromkeys(access.notes))


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
        merges, refusals, notes = merge_once(outcome.model)
        outcome.notes.extend(notes)
        for merge in merges:
            identities = tuple(i.norm or "input" for i in merge.identities)
            outcome.entries.append(MergeEntry(merge.block, MERGED, merge.into, merge.merged_layers, identities))
            for norm in merge.norms:
                outcome.absorbed_norms[norm] = merge.into
        left = [MergeEntry(r.block, LEFT, reason=r.reason) for r in refusals]
        if not merges:
            break
        outcome.model, folds = fold_again(outcome.model)
        outcome.folded_norms.update(folds)
        if not folds:
            break
    outcome.entries.extend(left)
    return outcome
