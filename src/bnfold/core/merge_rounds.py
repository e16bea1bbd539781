"""Rounds of branch merges, written once for every format: plan, check, compute, rewrite, fold again, repeat.

A round of merges can make new folds possible (RepViT's ``BN(conv3x3(x) + conv1x1(x) + x)``: once the sum is one
convolution, the norm after it folds forward), and new folds new merges, so the rounds alternate with the format's
folds until nothing changes. The format's side is :class:`MergeTarget`; nothing of torch, numpy or onnx here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from ..report import LEFT, MERGED, MergeEntry
from .apply import MergeOverflow, WeightAccess, merge_one
from .graph import Graph
from .merge import Merge, plan_merges

MAX_ROUNDS = 4
"""Merges and folds alternate at most this often (each round needs a sum that only the previous round's folds made
mergeable: two rounds are what the known architectures need)."""


class MergeTarget(Protocol):
    """A format's side of the rounds. ``translate`` starts a round; the other methods act on its translation, in the
    order :func:`merge_rounds` calls them. ``model``: what the rounds leave (rewritten in place, or replaced by
    ``commit``); ``access``: the round's weights, through which the merged kernels and biases are written."""

    model: Any
    access: WeightAccess

    def translate(self) -> Graph | str:
        """The core graph of the format's graph as it is now, or why it cannot be merged at all (nothing is)."""

    def start(self, merges: list[Merge]) -> None:
        """The round's merges, before any is checked or written (what a rewrite would change is read here)."""

    def name(self, index: int) -> str:
        """How the report names core node ``index`` (the sum of a block)."""

    def blocked(self, merge: Merge) -> str | None:
        """Why ``merge`` cannot be written into the format's graph, or None; asked before its weights are written."""

    def rewrite(self, merge: Merge) -> tuple[str, ...]:
        """Write ``merge`` (its weights written) into the graph; returns the names of the terms a split kept."""

    def commit(self) -> None:
        """After a round that merged: make the rewritten graph whole again (dead code, recompiling, ...)."""

    def fold_again(self) -> bool:
        """Fold what the round's merges made foldable, in place; whether anything new folded."""


@dataclass
class MergeOutcome:
    """What :func:`merge_rounds` did: the model to return, an entry per block merged or left, the norms of identity
    branches a merge absorbed (norm -> the layer it went into), notes, and why nothing could be merged (the format's
    graph cannot be translated) or None."""

    model: Any = None
    entries: list[MergeEntry] = field(default_factory=list)
    absorbed_norms: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    failure: str | None = None


def merge_rounds(target: MergeTarget) -> MergeOutcome:
    """Merge the summed branches of ``target`` (folded already, owned by the caller), fold what that made foldable,
    and repeat while anything changes (new folds, or a split whose kept terms may merge among themselves).

    Each round plans on the format's graph as it is now, checks each merge (every check before the weights are
    written: a block left keeps its weights), computes it and has the format rewrite its graph. The report's entries
    are every merge made, in order, then the blocks the last round left, with their reasons.
    """
    outcome = MergeOutcome()
    left: list[MergeEntry] = []
    for _ in range(MAX_ROUNDS):
        graph = target.translate()
        if isinstance(graph, str):
            outcome.failure = graph
            break
        plan = plan_merges(graph, split_sums=True)
        left = [MergeEntry(target.name(refusal.root), LEFT, reason=refusal.reason) for refusal in plan.refusals]
        target.start(plan.merges)
        merged = False
        for merge in plan.merges:
            block = target.name(merge.root)
            blocked = target.blocked(merge)
            if blocked is None:
                try:
                    merge_one(merge, target.access)
                except MergeOverflow as overflow:
                    blocked = str(overflow)
            if blocked is not None:
                left.append(MergeEntry(block, LEFT, reason=blocked))
                continue
            kept = target.rewrite(merge)
            identities = tuple(i.norm or "input" for i in merge.identities)
            outcome.entries.append(MergeEntry(block, MERGED, merge.into, merge.merged_layers, identities, kept=kept))
            outcome.absorbed_norms.update(dict.fromkeys(merge.norms, merge.into))
            merged = True
        if not merged:
            break
        target.commit()
        if not target.fold_again() and not plan.again:
            break  # nothing new to fold or to merge: another round would find the same blocks left
    outcome.entries.extend(left)
    outcome.model = target.model
    return outcome
