"""Plan, fold one norm, plan again: the loop that turns a model into its folded copy and a :class:`FoldReport`.

Folding one norm can make another foldable (in ``Conv -> BN -> BN`` the second norm's producer becomes the Conv),
so the loop re-plans after every fold until nothing more folds. Each fold removes a norm, so it ends after at most
as many rounds as there are norms. A fold whose result would not fit its dtype (:class:`~bnfold.onnx.apply.FoldOverflow`)
is not made: that norm is left with the reason and not planned again, which also ends a round.
"""

from __future__ import annotations

import onnx

from ..report import FOLDED, LEFT, FoldReport, NormEntry
from .apply import FoldOverflow, Rewriter
from .graph import GraphIndex, display_name, float_parameter_count, tensor_ranks
from .planner import BackwardFold, ForwardFold, Leave, channels_of, is_norm, plan_graph

KIND = "BatchNormalization"


def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 1


def fold_graph(model: onnx.ModelProto, name: str, applied: bool) -> tuple[onnx.ModelProto, FoldReport]:
    """Fold every foldable norm of a copy of ``model``; return the copy and the report (``applied`` as given).

    ``model`` itself is never modified.
    """
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    graph = folded.graph
    ranks = tensor_ranks(folded)
    opset = default_opset(folded)
    # Keyed by output name: unlike node names (often empty, not required to be unique) it identifies a norm.
    order = {node.output[0]: i for i, node in enumerate(n for n in graph.node if is_norm(n))}
    rewriter = Rewriter(graph)
    entries: dict[str, NormEntry] = {}
    overflowing: set[str] = set()  # output names of norms whose fold would overflow: left, not planned again
    subgraph_norms = 0
    while True:
        index = GraphIndex.build(graph)
        subgraph_norms = index.subgraph_norms
        decisions = [d for d in plan_graph(index, ranks, opset) if d.norm.output[0] not in overflowing]
        fold = next((d for d in decisions if not isinstance(d, Leave)), None)
        if fold is None:
            for decision in decisions:
                if not isinstance(decision, Leave):  # unreachable: no fold was found in this round
                    continue
                norm = decision.norm
                entries[norm.output[0]] = NormEntry(
                    display_name(norm), KIND, _channels(norm, index), LEFT, reason=decision.reason
                )
            break
        norm = fold.norm
        direction = "forward" if isinstance(fold, ForwardFold) else "backward"
        entries[norm.output[0]] = NormEntry(
            display_name(norm), KIND, channels_of(norm, index), FOLDED, into=fold.into, direction=direction
        )
        matmuls = [n for n in _targets(fold) if n.op_type == "MatMul"]
        try:
            if isinstance(fold, ForwardFold):
                rewriter.forward(index, fold)
            else:
                rewriter.backward(index, fold)
        except FoldOverflow as overflow:  # nothing was written
            overflowing.add(norm.output[0])
            entries[norm.output[0]] = NormEntry(
                display_name(norm), KIND, channels_of(norm, index), LEFT, reason=overflow.reason
            )
            continue
        for node in matmuls:
            if node.op_type == "Gemm":
                rewriter.notes.append(
                    f"'{display_name(node)}' (MatMul) became a Gemm to carry the folded bias"
                )
    rewriter.cleanup()
    notes = list(rewriter.notes)
    if subgraph_norms:
        notes.append(
            f"{subgraph_norms} BatchNormalization node(s) inside subgraphs (If/Loop/Scan bodies) were not considered"
        )
    report = FoldReport(
        model=name,
        applied=applied,
        capture="onnx graph",
        entries=[
            entry for _, entry in sorted(entries.items(), key=lambda item: order.get(item[0], len(order)))
        ],
        parameters_before=float_parameter_count(model.graph),
        parameters_after=float_parameter_count(graph),
        notes=notes,
    )
    return folded, report


def _targets(fold: ForwardFold | BackwardFold) -> list[onnx.NodeProto]:
    return [fold.producer] if isinstance(fold, ForwardFold) else list(fold.consumers)


def _channels(norm: onnx.NodeProto, index: GraphIndex) -> int | None:
    try:
        shape = index.shape(norm.input[1])
    except KeyError:
        return None
    return shape[0] if len(shape) == 1 else None
