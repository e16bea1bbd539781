"""Branch merges in torch.export programs: the core's :class:`~bnfold.core.merge.MergePlan` written into the ATen
graph of a program's unlifted module, the module's side of the rounds of :mod:`bnfold.core.merge_rounds`. It
imports nothing of the adapter (:mod:`bnfold.backends.exported`, which calls it): the translation and the folds
between rounds are handed in.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
from torch import fx

from ..core.apply import WeightAccess
from ..core.graph import Graph
from ..core.merge import Merge
from ..core.plan import FoldPlan

Translation = tuple[Graph, dict[int, list[fx.Node]], WeightAccess]
"""The core graph of a module, the fx nodes each core node stands for, and write access to its tensors."""


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


class ExportedMerges:
    """An unlifted program module as merge rounds see it (:class:`~bnfold.core.merge_rounds.MergeTarget`), rewritten
    in place. ``translate(module)`` reads the module's current graph; ``fold_again(module)`` folds in place and
    returns the folds it made. ``removed_state`` gathers the stored tensors the erased nodes read that nothing reads
    any more: the caller deletes them before the module is exported again, so that the new program's state_dict and
    graph signature hold exactly what its graph reads."""

    def __init__(self, module: fx.GraphModule, translate: Callable[[fx.GraphModule], Translation],
                 fold_again: Callable[[fx.GraphModule], FoldPlan]) -> None:
        self.model = module
        self._translate, self._fold_again = translate, fold_again
        self.removed_state: list[str] = []

    def translate(self) -> Graph:
        self.graph, self.nodes, self.access = self._translate(self.model)
        return self.graph

    def start(self, merges: list[Merge]) -> None:
        self.replaced: dict[fx.Node, fx.Node] = {}  # the sums merged in this round -> the node computing each now

    def name(self, index: int) -> str:
        return self.nodes[index][0].name if index in self.nodes else self.graph.nodes[index].label

    def blocked(self, merge: Merge) -> str | None:
        self.erased = _erased(merge, self.nodes)
        blocked = _blocked(merge, self.nodes, self.erased)
        self.kept = _kept_terms(merge, self.nodes, self.erased, self.replaced) if blocked is None else []
        if self.kept is None:
            return "bnfold cannot tell which nodes the terms left after the merge are"
        return blocked

    def rewrite(self, merge: Merge) -> tuple[str, ...]:
        assert self.kept is not None  # checked by blocked()
        root = self.nodes[merge.root][0]
        into = self.nodes[self.graph.units[merge.into].calls[0]][0]
        self.replaced[root], stale = _rewrite(self.model, into, root, self.erased, self.kept)
        self.removed_state.extend(stale)
        return tuple(node.name for node in self.kept)

    def commit(self) -> None:
        self.model.graph.lint()
        self.model.recompile()

    def fold_again(self) -> bool:
        return bool(self._fold_again(self.model).folds)
