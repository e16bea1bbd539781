"""Branch merges in TorchScript: the core's :class:`~bnfold.core.merge.MergePlan` written into a frozen JIT graph,
the graph's side of the rounds of :mod:`bnfold.core.merge_rounds`. The adapter (:mod:`bnfold.backends.torchscript`)
hands each round's translation in and folds between rounds itself: it imports this module,
not the other way round.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..core.apply import WeightAccess
from ..core.graph import CONSTANT, OP, Graph
from ..core.merge import Merge
from ..report import FOLDED, NormEntry


def _computed_nodes(merge: Merge, graph: Graph) -> list[int]:
    """The core nodes of the merge the JIT graph computes (the constants a removed product read are not nodes of
    it; dead-code elimination takes them when nothing else reads them)."""
    return sorted({index for index in (*merge.removed, merge.root) if graph.nodes[index].kind != CONSTANT})


def _read_elsewhere(merge: Merge, graph: Graph, node_of: dict[int, Any]) -> str | None:
    """Why destroying the merge's nodes would break the graph (a value read for its shape, or inside control flow,
    which the core graph does not show as a use), or None."""
    missing = [index for index in _computed_nodes(merge, graph) if index not in node_of]
    if missing:
        return f"bnfold cannot tell which node of the TorchScript graph computes node {missing[0]} of its dataflow"
    removed = {node_of[index] for index in _computed_nodes(merge, graph)}
    root = node_of[merge.root]
    for node in removed - {root}:
        for output in node.outputs():
            for use in output.uses():
                if use.user not in removed:
                    return (
                        f"%{output.debugName()}, inside the block, is also read by {use.user.kind()} (for its shape, or "
                        f"inside control flow)"
                    )
    return None


def _kept_inputs(merge: Merge, blocks: Any) -> list[tuple[Any, int]] | None:
    """Where the sum's JIT nodes read each term a split keeps (``Merge.kept``, in order): the node and its input
    position, or None when a term cannot be found there.

    Found before anything is rewritten: an earlier merge of the round may replace a term (RepGhost's shortcut is the
    previous block's sum), and the position then reads the value that replaced it.
    """
    readers = [blocks.node_of[index] for index in _computed_nodes(merge, blocks.graph)
               if blocks.graph.nodes[index].kind == OP and index in blocks.node_of]
    found: list[tuple[Any, int]] = []
    for index in merge.kept:
        places = [(reader, position) for reader in readers for position, value in enumerate(reader.inputs())
                  if blocks.value_nodes.get(value.unique()) == [index]]
        if len(places) != 1:
            return None
        found.append(places[0])
    return found


def _numel(tensor: Any) -> int:
    return int(tensor.numel()) if isinstance(tensor, torch.Tensor) else 0


def _sizes_removed(merge: Merge, access: WeightAccess, parameters_named: frozenset[str]) -> tuple[int, int]:
    """Parameter and buffer elements the merge takes out of the model (read before anything is written): the other
    branches' weights and biases, the identity norms' affine parameters and statistics, the layer scales its
    products multiplied by (a parameter where ``parameters_named`` has its name, a buffer otherwise), less the bias
    ``into`` gets when it had none.

    A layer scale counts once per merge that multiplies by it, as the module's parameters count it: freezing pools
    constants of equal value (the layer scales of fresh blocks), so one graph constant may stand for several."""
    parameters = buffers = 0
    for layer in merge.merged_layers:
        tensors = access.read(layer)
        parameters += _numel(tensors.weight) + _numel(tensors.bias)
    into = access.read(merge.into)
    if into.bias is None:
        parameters -= int(into.weight.shape[0])
    for norm in merge.norms:
        statistics = access.statistics(norm)
        parameters += _numel(statistics.gamma) + _numel(statistics.beta)
        buffers += _numel(statistics.mean) + _numel(statistics.var)
    factors = {name for term in (*merge.branches, *merge.identities) for name in term.coefficient.factors}
    for name in sorted(factors):
        elements = _numel(access.constant(name))  # type: ignore[attr-defined]
        if name in parameters_named:
            parameters += elements
        else:
            buffers += elements
    return parameters, buffers


def _rewrite(merge: Merge, blocks: Any, into: Any, kept: list[tuple[Any, int]], jit_graph: Any) -> None:
    """Readers of the sum read ``into``'s output, plus the terms a split kept (new ``aten::add`` nodes where the sum
    was, after every term it read); the merged nodes go."""
    root = blocks.node_of[merge.root]
    result = into.output()
    if kept:
        jit_graph.setInsertPoint(root)
        one = jit_graph.insertConstant(1)
        for reader, position in kept:
            add = jit_graph.create("aten::add", [result, reader.inputsAt(position), one], 1)
            add.insertBefore(root)
            add.output().setType(root.output().type())
            result = add.output()
        jit_graph.setInsertPoint(jit_graph.return_node())
    root.output().replaceAllUsesWith(result)
    for index in sorted(_computed_nodes(merge, blocks.graph), reverse=True):  # readers before what they read
        blocks.node_of[index].destroy()


class ScriptMerges:
    """A frozen JIT graph as merge rounds see it (:class:`~bnfold.core.merge_rounds.MergeTarget`), rewritten in place.

    ``translate()`` translates the graph as it is now: the adapter's translation (``graph``, its core graph, folded
    norms no longer in it; ``node_of``: core node -> the JIT node it stands for; ``value_nodes``: JIT value ->
    the core nodes it stands for, where the terms a split keeps are found) and its weight access. ``fold_again()``
    folds the graph as it is now and returns the report entries of the norms it decided, and the parameter and
    buffer elements the folds removed, net of biases added; they are added up here with what the merges remove.
    ``name`` names the sum a JIT node computes; ``parameters`` are the names of the graph constants that were
    parameters (``%self.layer_scale.gamma``): a layer scale merged away counts as a parameter removed, not a buffer.
    """

    def __init__(self, jit_graph: Any, translate: Callable[[], tuple[Any, WeightAccess]],
                 fold_again: Callable[[], tuple[dict[str, NormEntry], int, int]], name: Callable[[Any], str],
                 parameters: frozenset[str]) -> None:
        self.model = jit_graph
        self._translate, self._fold_again, self._name, self.parameters = translate, fold_again, name, parameters
        self.folded_norms: dict[str, NormEntry] = {}
        self.parameters_removed = self.buffers_removed = 0

    def translate(self) -> Graph:
        self.blocks, self.access = self._translate()
        return self.blocks.graph

    def start(self, merges: list[Merge]) -> None:
        # found and named before any rewrite: a kept term may be the sum of a block merged earlier in the round
        self.kept_inputs = {merge.root: _kept_inputs(merge, self.blocks) for merge in merges}
        self.kept_names = {merge.root: tuple(self.name(index) for index in merge.kept) for merge in merges}
        self.sizes: dict[int, tuple[int, int]] = {}

    def name(self, index: int) -> str:
        node_of, graph = self.blocks.node_of, self.blocks.graph
        if index in node_of and graph.nodes[index].kind == OP:
            return self._name(node_of[index])
        return graph.nodes[index].label

    def blocked(self, merge: Merge) -> str | None:
        blocked = _read_elsewhere(merge, self.blocks.graph, self.blocks.node_of)
        if blocked is None and self.kept_inputs[merge.root] is None:
            blocked = "bnfold cannot tell which values of the TorchScript graph the terms left after the merge are"
        if blocked is None:  # read before the merge writes
            self.sizes[merge.root] = _sizes_removed(merge, self.access, self.parameters)
        return blocked

    def rewrite(self, merge: Merge) -> tuple[str, ...]:
        kept = self.kept_inputs[merge.root]
        assert kept is not None  # checked by blocked()
        into = self.blocks.node_of[self.blocks.graph.units[merge.into].calls[0]]
        _rewrite(merge, self.blocks, into, kept, self.model)
        parameters, buffers = self.sizes[merge.root]
        self.parameters_removed += parameters
        self.buffers_removed += buffers
        return self.kept_names[merge.root]

    def commit(self) -> None:
        torch._C._jit_pass_dce(self.model)
        torch._C._jit_pass_constant_pooling(self.model)

    def fold_again(self) -> bool:
        entries, parameters, buffers = self._fold_again()
        self.folded_norms.update(entries)
        self.parameters_removed += parameters
        self.buffers_removed += buffers
        return any(entry.status == FOLDED for entry in entries.values())
