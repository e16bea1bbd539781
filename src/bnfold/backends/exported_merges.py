"""Branch merges in torch.export programs: the core's :class:`~bnfold.core.merge.MergePlan` written into the ATen
graph of a program's unlifted module.

The adapter (:mod:`bnfold.backends.exported`) translates the graph with what merging needs (each layer's geometry,
``aten.add`` as the core's ``add``); the core plans (:func:`~bnfold.core.merge.plan_merges`) and computes
(:func:`~bnfold.core.apply.merge_one`, writing the merged kernel and bias into the ``into`` layer's stored tensors
through the adapter's :class:`~bnfold.core.apply.WeightAccess`), the same as for an ``nn.Module`` or an ONNX file.
This module only rewrites the fx graph: every reader of the sum reads the ``into`` layer's call instead, and the
additions, the other branches' layer and norm calls and the identities between them are erased. The stored tensors
nobody reads any more are returned to the caller, which deletes them before the module is exported again, so that
the new program's state_dict and graph signature hold exactly what its graph reads.

It imports nothing of the adapter (which calls it): the graph's translation and the folds between rounds are
handed in, as :mod:`bnfold.backends.module_merges` is handed its folds.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import fx

from ..core.apply import MergeOverflow, WeightAccess, merge_one
from ..core.graph import Graph
from ..core.merge import Merge, MergeRefusal, plan_merges
from ..core.plan import FoldPlan
from ..report import LEFT, MERGED, MergeEntry

MAX_ROUNDS = 4
"""Merges and folds alternate at most this often (see :mod:`bnfold.backends.module_merges`)."""

Translation = tuple[Graph, dict[int, list[fx.Node]], WeightAccess]
"""The core graph of a module, the fx nodes each core node stands for, and write access to its tensors."""


@dataclass
class ExportedMergeOutcome:
    """What :func:`merge_rounds` did to the module it was handed (the module itself is rewritten in place)."""

    entries: list[MergeEntry] = field(default_factory=list)
    folds: list[FoldPlan] = field(default_factory=list)  # the folds made between rounds
    absorbed_norms: dict[str, str] = field(default_factory=dict)  # identity-branch norm -> the layer it went into
    removed_state: list[str] = field(default_factory=list)  # stored tensors the erased nodes read


def _erased(merge: Merge, nodes: dict[int, list[fx.Node]]) -> list[fx.Node]:
    """The fx nodes a merge erases: those of its removed core nodes, and the unused outputs of a tuple-valued norm."""
    erased = [node for index in merge.removed for node in nodes.get(index, [])]
    for node in list(erased):
        erased.extend(user for user in node.users
                      if user.target is operator.getitem and not user.users and user not in erased)
    return erased


def _blocked(merge: Merge, nodes: dict[int, list[fx.Node]], erased: list[fx.Node]) -> str | None:
    """Why erasing the merge's nodes would break the graph (a node also read for its shape, or by a node the core
    does not see), or None."""
    missing = [index for index in (*merge.removed, merge.root) if index not in nodes]
    if missing:
        return f"bnfold cannot tell which node of the graph is core node {missing[0]}"
    gone = set(erased)
    root = nodes[merge.root][0]  # its readers read the merged layer instead
    for node in erased:
        if node is root:
            continue
        for user in node.users:
            if user not in gone:
                return f"%{node.name}, inside the block, is also read by %{user.name}"
    return None


def _rewrite(module: fx.GraphModule, merge: Merge, into: fx.Node, root: fx.Node, erased: list[fx.Node]) -> list[str]:
    """Make every reader of the sum read ``into``; erase the block's other nodes. Returns the targets of the
    stored tensors the erased nodes read (deleted by the caller once nothing reads them)."""
    read = {arg for node in erased for arg in node.all_input_nodes if arg.op == "get_attr"}
    root.replace_all_uses_with(into)
    order = {node: i for i, node in enumerate(module.graph.nodes)}
    for node in sorted(erased, key=order.__getitem__, reverse=True):
        module.graph.erase_node(node)
    stale: list[str] = []
    for attribute in read:
        if not attribute.users:
            stale.append(str(attribute.target))
            module.graph.erase_node(attribute)
    return stale


def merge_once(module: fx.GraphModule, translation: Translation) -> tuple[list[Merge], list[MergeRefusal], list[str]]:
    """One round on ``module`` (folded already, owned by the caller): plan on its translation, compute, rewrite.

    Returns the merges made and the blocks left (named by their sum's node), and the stored tensors the erased nodes
    read.
    """
    graph, nodes, access = translation
    plan = plan_merges(graph)

    def name_of(index: int) -> str:
        return nodes[index][0].name if index in nodes else graph.nodes[index].label

    refusals = [dataclasses.replace(r, block=name_of(r.root)) for r in plan.refusals]
    merges: list[Merge] = []
    stale: list[str] = []
    for merge in plan.merges:
        erased = _erased(merge, nodes)
        blocked = _blocked(merge, nodes, erased)
        if blocked is None:
            try:
                merge_one(merge, access)
            except MergeOverflow as overflow:
                blocked = str(overflow)
        if blocked is not None:
            refusals.append(MergeRefusal(name_of(merge.root), merge.root, blocked))
            continue
        into = nodes[graph.units[merge.into].calls[0]][0]
        stale.extend(_rewrite(module, merge, into, nodes[merge.root][0], erased))
        merges.append(dataclasses.replace(merge, block=name_of(merge.root)))
    if merges:
        module.graph.lint()
        module.recompile()
    return merges, refusals, stale


def merge_rounds(
    module: fx.GraphModule,
    translate: Callable[[fx.GraphModule], Translation],
    fold_again: Callable[[fx.GraphModule], FoldPlan],
) -> ExportedMergeOutcome:
    """Merge the summed branches of ``module`` (an unlifted program module, folded already, owned by the caller),
    fold what that made foldable (``fold_again(module)`` folds in place and returns the folds it made), and repeat
    while anything changes. ``translate(module)`` reads the module's current graph."""
    outcome = ExportedMergeOutcome()
    left: list[MergeEntry] = []
    for _ in range(MAX_ROUNDS):
        merges, refusals, stale = merge_once(module, translate(module))
        outcome.removed_state.extend(stale)
        for merge in merges:
            identities = tuple(i.norm or "input" for i in merge.identities)
            outcome.entries.append(MergeEntry(merge.block, MERGED, merge.into, merge.merged_layers, identities))
            for norm in merge.norms:
                outcome.absorbed_norms[norm] = merge.into
        left = [MergeEntry(refusal.block, LEFT, reason=refusal.reason) for refusal in refusals]
        if not merges:
            break
        plan = fold_again(module)
        outcome.folds.append(plan)
        if not plan.folds:
            break  # nothing new to fold: another round would find the same blocks left
    outcome.entries.extend(left)
    return outcome
