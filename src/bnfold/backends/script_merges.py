"""Branch merges in TorchScript: the core's :class:`~bnfold.core.merge.MergePlan` written into a frozen JIT graph.

The TorchScript adapter (:mod:`bnfold.backends.torchscript`) translates the frozen graph, with each convolution's
geometry and each addition, subtraction, negation and product by a constant as the core's ``add`` / ``sub`` /
``mul`` with its operands; the core decides (:func:`~bnfold.core.merge.plan_merges`, sums split where their terms
read different tensors) and computes (:func:`~bnfold.core.apply.merge_one`: every term scaled by its coefficient,
FastViT's RepMixer ``x + gamma * (mixer(x) - norm(x))`` included, the merged kernel and bias written as new
constants of the ``into`` node through the adapter's weight access, as a fold does); this module rewrites the
graph: every use of the sum's output becomes a use of the ``into`` node's output (for a split sum, of new
``aten::add`` nodes adding the terms that stay to it, RepGhost's shortcut), the additions, subtractions and
products, the other branches' layer and norm nodes and the identities between them are destroyed, and the
constants nobody reads any more (a layer scale) go with dead-code elimination. The result is still a frozen
``ScriptModule`` that ``torch.jit.save`` writes and ``torch.jit.load`` reads back.

As for the other formats, a round of merges can make new folds possible (RepViT's ``BN(conv3x3(x) + conv1x1(x) +
x)``: once the sum is one convolution, the norm after it folds forward) and new folds new merges, so
:func:`merge_rounds` alternates until nothing changes.

This module knows nothing of how the graph was translated: the adapter hands it each round's translation
(:class:`ScriptBlocks`) and folds between rounds itself (it imports this module, not the other way round).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.apply import MergeOverflow, WeightAccess, merge_one
from ..core.graph import CONSTANT, OP, Graph
from ..core.merge import Merge, MergeRefusal, plan_merges
from ..report import FOLDED, MergeEntry, NormEntry, record_merges

MAX_ROUNDS = 4
"""Merges and folds alternate at most this often (see :mod:`bnfold.backends.module_merges`)."""


@dataclass
class ScriptBlocks:
    """One round's translation of the frozen graph, as the adapter made it.

    Attributes:
        graph: the core graph of the graph as it is now (folded already: folded norms are no longer in it).
        node_of: core node index -> the JIT node it stands for (every op, layer and norm node).
        access: reads and writes layer constants and norm statistics (the adapter's ``ScriptWeights``).
        name: how a report names the sum a JIT node computes.
        value_nodes: JIT value (its ``unique()``) -> the core nodes it stands for: how the terms a split sum keeps
            are found among the inputs of the sum's JIT nodes.
        parameters: the names of the graph constants that were parameters of the module (``%self.layer_scale.gamma``),
            so that a layer scale merged away counts as a parameter removed, not a buffer.
    """

    graph: Graph
    node_of: dict[int, Any]
    access: WeightAccess
    name: Callable[[Any], str]
    value_nodes: dict[int, list[int]] = field(default_factory=dict)
    parameters: frozenset[str] = frozenset()


@dataclass
class FoldRound:
    """What the adapter's fold between two rounds did: the report entries of the norms it folded (or left because
    the fold would overflow), and the parameter and buffer elements the folds removed (net of biases added)."""

    entries: dict[str, NormEntry] = field(default_factory=dict)
    parameters_removed: int = 0
    buffers_removed: int = 0


@dataclass
class ScriptMergeOutcome:
    """What :func:`merge_rounds` did to the graph it was handed."""

    entries: list[MergeEntry] = field(default_factory=list)
    absorbed_norms: dict[str, str] = field(default_factory=dict)  # identity-branch norm -> the layer it went into
    folded_norms: dict[str, NormEntry] = field(default_factory=dict)  # norms the folds between rounds decided
    parameters_removed: int = 0
    buffers_removed: int = 0


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


def _kept_inputs(merge: Merge, blocks: ScriptBlocks) -> list[tuple[Any, int]] | None:
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


def _rewrite(merge: Merge, blocks: ScriptBlocks, into: Any, kept: list[tuple[Any, int]], jit_graph: Any) -> None:
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


@dataclass
class ScriptMergeRound:
    """One round of :func:`merge_once`: the merges made and the blocks left (both named by their sum's JIT node),
    per merge the names of the terms a split kept, the parameter and buffer elements the merges removed, and
    whether a split left terms another round may merge."""

    merges: list[Merge] = field(default_factory=list)
    kept: list[tuple[str, ...]] = field(default_factory=list)
    refusals: list[MergeRefusal] = field(default_factory=list)
    parameters_removed: int = 0
    buffers_removed: int = 0
    again: bool = False


def merge_once(blocks: ScriptBlocks, jit_graph: Any) -> ScriptMergeRound:
    """One round on ``jit_graph`` (the frozen graph ``blocks`` translates, owned by the caller): plan (sums split
    where their terms read different tensors), compute, rewrite in place."""
    graph, node_of = blocks.graph, blocks.node_of

    def name_of(index: int) -> str:
        if index in node_of and graph.nodes[index].kind == OP:
            return blocks.name(node_of[index])
        return graph.nodes[index].label

    plan = plan_merges(graph, split_sums=True)
    done = ScriptMergeRound(refusals=[dataclasses.replace(r, block=name_of(r.root)) for r in plan.refusals],
                            again=plan.again)
    # found and named before any rewrite: a kept term may be the sum of a block merged earlier in the round
    kept_inputs = {merge.root: _kept_inputs(merge, blocks) for merge in plan.merges}
    kept_names = {merge.root: tuple(name_of(index) for index in merge.kept) for merge in plan.merges}
    for merge in plan.merges:
        blocked = _read_elsewhere(merge, graph, node_of)
        kept = kept_inputs[merge.root]
        if blocked is None and kept is None:
            blocked = "bnfold cannot tell which values of the TorchScript graph the terms left after the merge are"
        sizes = (0, 0)
        if blocked is None:
            sizes = _sizes_removed(merge, blocks.access, blocks.parameters)
            try:
                merge_one(merge, blocks.access)
            except MergeOverflow as overflow:
                blocked = str(overflow)
        if blocked is not None:
            done.refusals.append(MergeRefusal(name_of(merge.root), merge.root, blocked))
            continue
        assert kept is not None
        done.merges.append(dataclasses.replace(merge, block=name_of(merge.root)))
        done.kept.append(kept_names[merge.root])
        _rewrite(merge, blocks, node_of[graph.units[merge.into].calls[0]], kept, jit_graph)
        done.parameters_removed += sizes[0]
        done.buffers_removed += sizes[1]
    if done.merges:
        torch._C._jit_pass_dce(jit_graph)
        torch._C._jit_pass_constant_pooling(jit_graph)
    return done


def merge_rounds(
    jit_graph: Any, translate: Callable[[], ScriptBlocks], fold_again: Callable[[], FoldRound]
) -> ScriptMergeOutcome:
    """Merge the summed branches of ``jit_graph`` (a frozen graph, folded already, owned by the caller), fold what
    that made foldable, and repeat while anything changes.

    ``translate()`` translates the graph as it is now; ``fold_again()`` plans and applies the folds of the graph as
    it is now and says what it did.
    """
    outcome = ScriptMergeOutcome()
    left: list[MergeEntry] = []
    for _ in range(MAX_ROUNDS):
        done = merge_once(translate(), jit_graph)
        outcome.parameters_removed += done.parameters_removed
        outcome.buffers_removed += done.buffers_removed
        left = record_merges(zip(done.merges, done.kept, strict=True), done.refusals, outcome.entries,
                             outcome.absorbed_norms)
        if not done.merges:
            break
        folds = fold_again()
        outcome.folded_norms.update(folds.entries)
        outcome.parameters_removed += folds.parameters_removed
        outcome.buffers_removed += folds.buffers_removed
        if not any(entry.status == FOLDED for entry in folds.entries.values()) and not done.again:
            break  # nothing new to fold or to merge: another round would find the same blocks left
    outcome.entries.extend(left)
    return outcome
