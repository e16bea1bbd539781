"""Branch merges in torch.export programs: the core's :class:`~bnfold.core.merge.MergePlan` written into the ATen
graph of a program's unlifted module.

The adapter (:mod:`bnfold.backends.exported`) translates the graph with what merging needs (each layer's geometry,
``aten.add`` / ``sub`` / ``mul`` as the core's linear combinations, a layer scale read through ``constant``); the
core plans (:func:`~bnfold.core.merge.plan_merges`, splitting sums whose terms read different tensors) and computes
(:func:`~bnfold.core.apply.merge_one`, writing the merged kernel and bias into the ``into`` layer's stored tensors
through the adapter's :class:`~bnfold.core.apply.WeightAccess`), the same as for an ``nn.Module`` or an ONNX file.
This module only rewrites the fx graph: every reader of the sum reads the ``into`` layer's call instead (plus, for
a split sum, the terms it kept, :attr:`~bnfold.core.merge.Merge.kept`, added in new ``aten.add`` nodes: RepGhost's
shortcut), and the additions, subtractions and products of the tree, the other branches' layer and norm calls and
the identities between them are erased. The stored tensors nobody reads any more (the other branches' weights, a
layer scale) are returned to the caller, which deletes them before the module is exported again, so that the new
program's state_dict and graph signature hold exactly what its graph reads.

It imports nothing of the adapter (which calls it): the graph's translation and the folds between rounds are
handed in, as :mod:`bnfold.backends.module_merges` is handed its folds.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx

from ..core.apply import MergeOverflow, WeightAccess, merge_one
from ..core.graph import Graph
from ..core.merge import Merge, MergeRefusal, plan_merges
from ..core.plan import FoldPlan
from ..report import MergeEntry, record_merges

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
    """The fx nodes a merge erases: those of its removed core nodes, and the unused outputs of a tuple-valued norm.
    Stored tensors (``get_attr``: a layer scale only the removed products read) are not among them: they go with
    the other reads nothing is left to use (:func:`_erase_unread`)."""
    erased = [node for index in merge.removed for node in nodes.get(index, []) if node.op != "get_attr"]
    for node in list(erased):
        erased.extend(user for user in node.users
                      if user.target is operator.getitem and not user.users and user not in erased)
    return erased


def _blocked(merge: Merge, nodes: dict[int, list[fx.Node]], erased: list[fx.Node]) -> str | None:
    """Why erasing the merge's nodes would break the graph (a node also read for its shape, or by a node the core
    does not see), or None."""
    missing = [index for index in (*merge.removed, *merge.kept, merge.root) if index not in nodes]
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


def _writes(node: fx.Node) -> bool:
    """Whether the op writes into one of its arguments (``detach_`` only changes autograd metadata: not a write)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return True
    if schema.name == "aten::detach_":
        return False
    return any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)


def _erase_unread(graph: fx.Graph, candidates: set[fx.Node]) -> list[str]:
    """Erase the ``candidates`` (the nodes the erased ones read) that nothing reads any more, and, in turn, what
    those read: the stored tensors of the other branches, a layer scale, the ``lift_fresh_copy`` / ``view`` a
    constant was read through. Only reads of stored tensors and ops that write into nothing are erased (an input
    stays an input, an in-place op stays). Returns the targets of the stored tensors no node reads any more."""
    stale: list[str] = []
    pending = list(candidates)
    while pending:
        node = pending.pop()
        if node.graph is not graph or node.users:
            continue
        if node.op == "get_attr":
            stale.append(str(node.target))
        elif node.op != "call_function" or _writes(node):
            continue
        pending.extend(node.all_input_nodes)
        graph.erase_node(node)
    return list(dict.fromkeys(stale))


def _rewrite(module: fx.GraphModule, into: fx.Node, root: fx.Node, erased: list[fx.Node],
             kept: list[fx.Node]) -> tuple[fx.Node, list[str]]:
    """Make every reader of the sum read ``into`` (plus the ``kept`` terms of a split, added in new ``aten.add``
    nodes where the sum was: after every term); erase the block's other nodes. Returns the node the sum's readers
    read now, and the targets of the stored tensors the erased nodes read that nothing reads any more (deleted by
    the caller)."""
    graph = module.graph
    read = {arg for node in erased for arg in node.all_input_nodes} - set(erased)
    result = into
    with graph.inserting_before(root):
        for term in kept:
            result = graph.call_function(torch.ops.aten.add.Tensor, (result, term))
            result.meta["val"] = root.meta.get("val")  # what the next round's translation reads shapes from
    root.replace_all_uses_with(result)
    order = {node: i for i, node in enumerate(graph.nodes)}
    for node in sorted(erased, key=order.__getitem__, reverse=True):
        graph.erase_node(node)
    return result, _erase_unread(graph, read)


def _kept_terms(merge: Merge, nodes: dict[int, list[fx.Node]], erased: list[fx.Node],
                replaced: dict[fx.Node, fx.Node]) -> list[fx.Node] | None:
    """The fx nodes of a split's kept terms, as the block's ops read them (a tuple-valued op stands for its
    ``getitem 0`` too; a kept term that is the sum of a block merged before in this round, RepGhost's shortcut, is
    read from the node computing it now); None if one cannot be told."""
    gone = set(erased)
    kept = []
    for index in merge.kept:
        found = {replaced.get(node, node) for node in nodes[index]}
        read = [node for node in found if gone.intersection(node.users)]
        if len(read) != 1:
            return None
        kept.append(read[0])
    return kept


@dataclass
class ExportedMergeRound:
    """One round of :func:`merge_once`: the merges made (named by their sum's node), the node names of each one's
    kept terms, the blocks left, the stored tensors nothing reads any more, and whether a split left terms another
    round may merge."""

    merges: list[Merge] = field(default_factory=list)
    kept: list[tuple[str, ...]] = field(default_factory=list)
    refusals: list[MergeRefusal] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    again: bool = False


def merge_once(module: fx.GraphModule, translation: Translation) -> ExportedMergeRound:
    """One round on ``module`` (folded already, owned by the caller): plan on its translation (sums split where
    their terms read different tensors), compute, rewrite."""
    graph, nodes, access = translation
    plan = plan_merges(graph, split_sums=True)

    def name_of(index: int) -> str:
        return nodes[index][0].name if index in nodes else graph.nodes[index].label

    done = ExportedMergeRound(refusals=[dataclasses.replace(r, block=name_of(r.root)) for r in plan.refusals],
                              again=plan.again)
    replaced: dict[fx.Node, fx.Node] = {}  # the sums merged in this round -> the node computing each now
    for merge in plan.merges:
        erased = _erased(merge, nodes)
        blocked = _blocked(merge, nodes, erased)
        kept = _kept_terms(merge, nodes, erased, replaced) if blocked is None else []
        if kept is None:
            blocked = "bnfold cannot tell which nodes the terms left after the merge are"
        if blocked is None:  # every check before the weights are written: a block left keeps its weights
            try:
                merge_one(merge, access)
            except MergeOverflow as overflow:
                blocked = str(overflow)
        if blocked is not None or kept is None:
            done.refusals.append(MergeRefusal(name_of(merge.root), merge.root, blocked or ""))
            continue
        root = nodes[merge.root][0]
        done.kept.append(tuple(node.name for node in kept))
        into = nodes[graph.units[merge.into].calls[0]][0]
        replaced[root], stale = _rewrite(module, into, root, erased, kept)
        done.stale.extend(stale)
        done.merges.append(dataclasses.replace(merge, block=name_of(merge.root)))
    if done.merges:
        module.graph.lint()
        module.recompile()
    return done


def merge_rounds(
    module: fx.GraphModule,
    translate: Callable[[fx.GraphModule], Translation],
    fold_again: Callable[[fx.GraphModule], FoldPlan],
) -> ExportedMergeOutcome:
    """Merge the summed branches of ``module`` (an unlifted program module, folded already, owned by the caller),
    fold what that made foldable (``fold_again(module)`` folds in place and returns the folds it made), and repeat
    while anything changes (new folds, or a split whose kept terms may merge among themselves).
    ``translate(module)`` reads the module's current graph."""
    outcome = ExportedMergeOutcome()
    left: list[MergeEntry] = []
    for _ in range(MAX_ROUNDS):
        done = merge_once(module, translate(module))
        outcome.removed_state.extend(done.stale)
        left = record_merges(zip(done.merges, done.kept, strict=True), done.refusals, outcome.entries,
                             outcome.absorbed_norms)
        if not done.merges:
            break
        plan = fold_again(module)
        outcome.folds.append(plan)
        if not plan.folds and not done.again:
            break  # nothing new to fold or to merge: another round would find the same blocks left
    outcome.entries.extend(left)
    return outcome
