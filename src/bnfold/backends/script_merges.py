"""Branch merges in TorchScript: the core's :class:`~bnfold.core.merge.MergePlan` written into a frozen JIT graph.

The TorchScript adapter (:mod:`bnfold.backends.torchscript`) translates the frozen graph, with each convolution's
geometry and each ``aten::add`` / ``aten::add_`` as the core's ``add``; the core decides
(:func:`~bnfold.core.merge.plan_merges`) and computes (:func:`~bnfold.core.apply.merge_one`, writing the merged
kernel and bias as new constants of the ``into`` node through the adapter's weight access, as a fold does); this
module rewrites the graph: every use of the sum's output becomes a use of the ``into`` node's output, the
additions, the other branches' layer and norm nodes and the identities between them are destroyed, and the
constants nobody reads any more go with dead-code elimination. The result is still a frozen ``ScriptModule`` that
``torch.jit.save`` writes and ``torch.jit.load`` reads back.

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
from ..core.graph import Graph
from ..core.merge import Merge, MergeRefusal, plan_merges
from ..report import FOLDED, LEFT, MERGED, MergeEntry, NormEntry

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
    """

    graph: Graph
    node_of: dict[int, Any]
    access: WeightAccess
    name: Callable[[Any], str]


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


def _read_elsewhere(merge: Merge, node_of: dict[int, Any]) -> str | None:
    """Why destroying the merge's nodes would break the graph (a value read for its shape, or inside control flow,
    which the core graph does not show as a use), or None."""
    missing = [index for index in (*merge.removed, merge.root) if index not in node_of]
    if missing:
        return f"bnfold cannot tell which node of the TorchScript graph computes node {missing[0]} of its dataflow"
    removed = {node_of[index] for index in merge.removed}
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


def _numel(tensor: Any) -> int:
    return int(tensor.numel()) if isinstance(tensor, torch.Tensor) else 0


def _sizes_removed(merge: Merge, access: WeightAccess) -> tuple[int, int]:
    """Parameter and buffer elements the merge takes out of the model (read before anything is written): the other
    branches' weights and biases, the identity norms' affine parameters and statistics, less the bias ``into`` gets
    when it had none."""
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
    return parameters, buffers


def _rewrite(merge: Merge, node_of: dict[int, Any], into: Any) -> None:
    node_of[merge.root].output().replaceAllUsesWith(into.output())
    for index in sorted(merge.removed, reverse=True):  # readers before what they read
        node_of[index].destroy()


def merge_once(blocks: ScriptBlocks, jit_graph: Any) -> tuple[list[Merge], list[MergeRefusal], tuple[int, int]]:
    """One round on ``jit_graph`` (the frozen graph ``blocks`` translates, owned by the caller): plan, compute,
    rewrite in place.

    Returns the merges made and the blocks left (both named by their sum's JIT node), and the parameter and buffer
    elements the merges removed.
    """
    graph, node_of = blocks.graph, blocks.node_of

    def name_of(index: int) -> str:
        return blocks.name(node_of[index]) if index in node_of else graph.nodes[index].label

    plan = plan_merges(graph)
    refusals = [dataclasses.replace(r, block=name_of(r.root)) for r in plan.refusals]
    merges: list[Merge] = []
    parameters = buffers = 0
    for merge in plan.merges:
        blocked = _read_elsewhere(merge, node_of)
        sizes = (0, 0)
        if blocked is None:
            sizes = _sizes_removed(merge, blocks.access)
            try:
                merge_one(merge, blocks.access)
            except MergeOverflow as overflow:
                blocked = str(overflow)
        if blocked is not None:
            refusals.append(MergeRefusal(name_of(merge.root), merge.root, blocked))
            continue
        merges.append(dataclasses.replace(merge, block=name_of(merge.root)))
        _rewrite(merge, node_of, node_of[graph.units[merge.into].calls[0]])
        parameters, buffers = parameters + sizes[0], buffers + sizes[1]
    if merges:
        torch._C._jit_pass_dce(jit_graph)
        torch._C._jit_pass_constant_pooling(jit_graph)
    return merges, refusals, (parameters, buffers)


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
        merges, refusals, (parameters, buffers) = merge_once(translate(), jit_graph)
        outcome.parameters_removed += parameters
        outcome.buffers_removed += buffers
        for merge in merges:
            identities = tuple(i.norm or "input" for i in merge.identities)
            outcome.entries.append(MergeEntry(merge.block, MERGED, merge.into, merge.merged_layers, identities))
            for norm in merge.norms:
                outcome.absorbed_norms[norm] = merge.into
        left = [MergeEntry(refusal.block, LEFT, reason=refusal.reason) for refusal in refusals]
        if not merges:
            break
        folds = fold_again()
        outcome.folded_norms.update(folds.entries)
        outcome.parameters_removed += folds.parameters_removed
        outcome.buffers_removed += folds.buffers_removed
        if not any(entry.status == FOLDED for entry in folds.entries.values()):
            break  # nothing new to fold: another round would find the same blocks left
    outcome.entries.extend(left)
    return outcome
