"""The merge planner: parallel branches summed into one layer (RepVGG, MobileOne, RepViT blocks), for every format.

A re-parameterisable block computes ``y = conv_3x3(X) + conv_1x1(X) + BN(X) + X``. After the folds each branch is a
linear map of ``X`` (a norm left on an identity branch is ``s * X + t``), and a sum of linear maps of one input is
one: every kernel placed inside the largest (zeros elsewhere), each identity's ``s`` on the tap that reads each
output's own position (:func:`bnfold.core.apply.merged_tensors` has the formula). That is exact only when the
branches agree on stride, dilation, groups and channels, read the same positions with zero padding, and are not
transposed; an identity needs stride 1 (:mod:`bnfold.core.merge_geometry`).

An **add tree** (:mod:`bnfold.core.merge_tree`) is a tree of sums, differences and products by a constant of one
value per channel (FastViT's ``LayerScale2d``), whose inner results only the tree reads; each **leaf** enters with a
per-output-channel **coefficient** (the signs and scales on its way to the root), so FastViT's RepMixer,
``x + gamma * (mixer(x) - norm(x))``, is one depthwise convolution. A tree whose terms read different tensors is
split where that removes a layer or a norm and every term left has coefficient 1: those terms stay, added to the
merged layer's output (:attr:`Merge.kept`). Decided on the core graph alone; every refusal is a
:class:`~bnfold.core.plan.Reason`; the arithmetic is :func:`bnfold.core.apply.merge_one`, the rewrite each adapter's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .graph import CONSTANT, LAYER, NORM, Graph, LayerFacts, Node, norm_problem
from .merge_geometry import Layer, identity_tap, place_kernels, scale_reason
from .merge_tree import AddTrees, Leaf, Scale
from .plan import FoldPlan, Reason


@dataclass(frozen=True)
class Coefficient:
    """The factor a term enters its sum with, per output channel: ``scale`` times the product of the stored
    tensors ``factors`` (each one value per channel, or a single value), named as the format's weight access reads
    them (``constant(name)``). ``Coefficient()`` is 1: a term of a plain sum."""

    scale: float = 1.0
    factors: tuple[str, ...] = ()

    @property
    def is_one(self) -> bool:
        """A plain term: no sign, no scale."""
        return self.scale == 1.0 and not self.factors


ONE = Coefficient()


@dataclass(frozen=True)
class Branch:
    """A layer merged: ``offset`` is where its kernel sits inside the merged kernel, per spatial axis;
    ``coefficient`` scales its output channels (its kernel and bias) in the sum."""

    layer: str
    offset: tuple[int, ...]
    coefficient: Coefficient = ONE


@dataclass(frozen=True)
class IdentityBranch:
    """An identity branch: ``X`` itself (``norm`` None) or a norm of ``X`` (an identity scaled per channel, plus
    its shift); ``tap`` is the kernel position that reads, for every output, the input at the same place;
    ``coefficient`` scales the branch in the sum."""

    norm: str | None
    tap: tuple[int, ...]
    coefficient: Coefficient = ONE


@dataclass(frozen=True)
class Merge:
    """Merge an add tree into the layer ``into``: its kernel and bias become the sums of every branch's.

    Attributes:
        root: the node index of the root addition (whose readers read ``into``'s output instead, plus the ``kept``
            terms).
        into: the branch layer with the largest kernel, which keeps its geometry.
        branches: every layer merged, ``into`` included, in the tree's order; identities: the identity branches.
        removed: node indices no longer computed (the tree's ops, the other branches' layer and norm calls, the
            identities between them and the tree, constants only the removed products read).
        kept: for a split tree, the terms that stay (read by the tree directly, with the coefficient 1), in order;
            empty when the whole tree merged.
    """

    root: int
    into: str
    branches: tuple[Branch, ...]
    identities: tuple[IdentityBranch, ...]
    removed: tuple[int, ...]
    kept: tuple[int, ...] = ()

    @property
    def norms(self) -> tuple[str, ...]:
        """The norms of identity branches, absorbed by the merge."""
        return tuple(i.norm for i in self.identities if i.norm is not None)

    @property
    def merged_layers(self) -> tuple[str, ...]:
        """The branch layers other than ``into``: they are no longer called."""
        return tuple(b.layer for b in self.branches if b.layer != self.into)


@dataclass(frozen=True)
class MergeRefusal:
    """An add tree with a layer among its branches that stays as it is, because of ``reason``."""

    root: int
    reason: str


@dataclass
class MergePlan:
    """What merging will do, and the candidate blocks it leaves (each with its reason)."""

    merges: list[Merge] = field(default_factory=list)
    refusals: list[MergeRefusal] = field(default_factory=list)
    again: bool = False
    """A split left terms that may merge among themselves: another round (planned on the rewritten graph) may
    merge them."""


def _public(scale: Scale) -> Coefficient:
    return Coefficient(scale.number, tuple(f.name for f in scale.factors))


class _MergePlanner:
    """Decides, tree by tree, the merge or the reason there is none (see :func:`plan_merges`)."""

    def __init__(self, graph: Graph, fold_plan: FoldPlan | None, split_sums: bool) -> None:
        self.graph = graph
        self.nodes = graph.nodes
        self.trees = AddTrees(graph, {fold.norm for fold in fold_plan.folds} if fold_plan is not None else set())
        self.split_sums = split_sums

    def run(self) -> MergePlan:
        plan = MergePlan()
        for node in self.nodes:
            if not self.trees.is_root(node):
                continue
            ops, leaves = self.trees.read(node)
            if len(leaves) < 2 or not any(leaf.node.kind == LAYER and leaf.only_to_tree for leaf in leaves):
                continue  # not a block with a branch to merge into: nothing to report
            planned = self.plan_tree(node, ops, leaves)
            if isinstance(planned, Reason):
                plan.refusals.append(MergeRefusal(node.index, str(planned)))
                continue
            plan.merges.append(planned[0])
            plan.again = plan.again or planned[1]
        return plan

    def source_of(self, leaf: Leaf) -> Node | None:
        """The tensor a mergeable layer or norm term reads (through identities), or None for any other term."""
        if leaf.node.kind in (LAYER, NORM) and leaf.only_to_tree and len(leaf.node.inputs) >= 1:
            return self.trees.input_of(leaf.node)
        return None

    def groups(self, leaves: list[Leaf]) -> list[list[Leaf]]:
        """The terms of each tensor some layer term reads: those layers, then that tensor's identities and norms."""
        groups: dict[int, tuple[Node, list[Leaf]]] = {}  # source node -> its layer terms, in the tree's order
        for leaf in leaves:
            source = self.source_of(leaf) if leaf.node.kind == LAYER else None
            if source is not None:
                groups.setdefault(source.index, (source, []))[1].append(leaf)
        for source, layers in groups.values():
            layers.extend(leaf for leaf in leaves if leaf not in layers and (
                self.trees.resolve(leaf.node) is source or (leaf.node.kind == NORM and self.source_of(leaf) is source)))
        return [layers for _, layers in groups.values()]

    def plan_tree(self, root: Node, ops: list[Node], leaves: list[Leaf]) -> tuple[Merge, bool] | Reason:
        """The merge of the tree, split where its terms read different tensors, and whether the terms a split left
        may merge among themselves in another round; or the reason nothing merges."""
        reason = self.trees.ops_reason(ops)
        if reason is not None:
            return reason
        groups = self.groups(leaves)
        whole = any(len(g) == len(leaves) for g in groups)
        candidates = [] if whole or not self.split_sums else sorted(
            (g for g in groups if self.removes(g)), key=lambda g: -self.removes(g))
        if not candidates:
            merged = self.plan_block(root, ops, leaves)
            if isinstance(merged, Reason):
                if whole or not self.split_sums:
                    return merged
                return Reason(f"{merged}; merging only the terms that read one tensor would remove no layer or norm")
            return merged, False
        first: Reason | None = None
        for group in candidates:
            merged = self.plan_block(root, ops, [leaf for leaf in leaves if leaf in group],
                                     [leaf for leaf in leaves if leaf not in group])
            if isinstance(merged, Merge):
                return merged, len(candidates) > 1
            first = first or merged
        return first or Reason("nothing merges")

    def removes(self, group: list[Leaf]) -> int:
        """How many layer and norm calls merging ``group`` saves (0: the split would only move an addition)."""
        layers = sum(1 for leaf in group if leaf.node.kind == LAYER and leaf.only_to_tree)
        norms = sum(1 for leaf in group if leaf.node.kind == NORM and leaf.only_to_tree
                    and self.trees.resolve(leaf.node) is leaf.node)
        return layers - 1 + norms

    def branch_reason(self, leaf: Leaf) -> Reason | None:
        """Why the layer term ``leaf`` cannot be merged with others at all, or None."""
        name = leaf.node.unit or ""
        facts = self.graph.units[name].layer or LayerFacts(0, 0, 1, problem=f"'{name}' is not a layer")
        if facts.not_a_rule:
            return Reason(f"the branch '{name}': {facts.not_a_rule}")
        if facts.problem:
            return Reason(facts.problem)
        if self.graph.units[name].calls != [leaf.node.index]:
            return Reason(f"'{name}' is also called at another site, which would change too")
        if len(leaf.node.inputs) != 1:
            return Reason(f"'{name}' reads several tensors")
        if facts.geometry is None:
            return Reason(f"'{name}' is not mergeable: its geometry is unknown")
        if facts.geometry.transposed:
            return Reason(f"'{name}' is a transposed convolution, whose branches bnfold does not merge")
        return None

    def plan_block(self, root: Node, ops: list[Node], leaves: list[Leaf], kept: list[Leaf] | None = None
                   ) -> Merge | Reason:
        """Merge ``leaves`` (all the tree's terms, or one tensor's terms of a split tree) into one layer; ``kept``: the
        terms of a split tree that stay added to it. Or the reason they cannot merge."""
        kept = kept or []
        layers = [leaf for leaf in leaves if leaf.node.kind == LAYER and leaf.only_to_tree]
        reason = next((r for r in map(self.branch_reason, layers) if r is not None), None)
        if reason is not None:
            return reason
        inputs = {id(self.trees.input_of(leaf.node)): leaf for leaf in layers}
        if len(inputs) > 1:
            shown = ", ".join(f"'{leaf.node.unit}' reads {self.trees.input_of(leaf.node).label}"
                              for leaf in inputs.values())
            return Reason(f"its branches read different tensors ({shown})")
        source = self.trees.input_of(layers[0].node)
        identities, norms = [], []
        for leaf in leaves:
            if leaf in layers:
                continue
            if self.trees.resolve(leaf.node) is source:
                identities.append(leaf)
            elif leaf.node.kind == NORM and leaf.only_to_tree and self.trees.input_of(leaf.node) is source:
                norms.append(leaf)
            else:
                return self.trees.term_reason(leaf, source)
        reason = self.kept_reason(kept, source)
        if reason is not None:
            return reason
        branch_layers: list[Layer] = []
        for leaf in layers:
            facts = self.graph.units[leaf.node.unit or ""].layer
            assert facts is not None and facts.geometry is not None  # as branch_reason checked
            branch_layers.append((leaf.node.unit or "", facts, facts.geometry))
        placed = place_kernels(branch_layers)
        if isinstance(placed, Reason):
            return placed
        target, offsets = placed
        into = target[0]
        taps = self.identity_taps(target, layers, identities + norms, source)
        if isinstance(taps, Reason):
            return taps
        merged = [leaf for leaf in leaves if leaf in layers or leaf in identities or leaf in norms]
        reason = scale_reason(target, [leaf.node.shape for leaf in merged],
                              [factor for leaf in merged for factor in leaf.scale.factors])
        if reason is not None:
            return reason
        branches = tuple(Branch(name, offset, _public(leaf.scale))
                         for (name, _, _), offset, leaf in zip(branch_layers, offsets, layers, strict=True))
        identity_branches = tuple(IdentityBranch(leaf.node.unit if leaf in norms else None, taps, _public(leaf.scale))
                                  for leaf in leaves if leaf in identities or leaf in norms)
        removed = {op.index for op in ops}
        for leaf in leaves:
            removed.update(n.index for n in leaf.path)
            if leaf in norms or (leaf in layers and leaf.node.unit != into):
                removed.add(leaf.node.index)
        for op in ops:  # constants only the removed products read (a layer scale) go with them
            removed.update(i for i in op.inputs if self.nodes[i].kind == CONSTANT
                           and all(user in removed for user in self.nodes[i].users))
        return Merge(root.index, into, branches, identity_branches, tuple(sorted(removed)),
                     tuple(leaf.operand.index for leaf in kept))

    def kept_reason(self, kept: list[Leaf], source: Node) -> Reason | None:
        """Why a term of a split tree cannot stay added to the merged layer's output, or None."""
        for leaf in kept:
            related = leaf.node.kind in (LAYER, NORM) and leaf.node.inputs and self.trees.input_of(leaf.node) is source
            if related and not leaf.only_to_tree:
                return self.trees.term_reason(leaf, source)
            if not leaf.scale.is_one:
                return Reason(
                    f"its terms read different tensors, and {leaf.node.label}, which would stay added to the merged "
                    f"layer's output, enters the sum scaled or subtracted"
                )
        return None

    def identity_taps(self, target: Layer, layers: list[Leaf], identities: list[Leaf], source: Node
                      ) -> tuple[int, ...] | Reason:
        """Where the identity branches sit in the kernel of ``target`` (``()`` without any), or why they cannot."""
        if not identities:
            return ()
        into, facts, geometry = target
        tap = identity_tap(target)
        if isinstance(tap, Reason):
            return tap
        for leaf in identities:
            if leaf.node.kind != NORM or leaf.node is source:
                continue
            norm = self.graph.units[leaf.node.unit or ""]
            if norm.norm is None:
                return Reason(f"'{norm.name}' on its identity branch is not a norm")
            where = f"the norm '{norm.name}' on its identity branch"
            if blocker := norm_problem(norm.norm) or norm.norm.backward_blocker:
                return Reason(f"{where}: {blocker}")
            if norm.calls != [leaf.node.index]:
                return Reason(f"{where} is also called at another site")
            if norm.norm.channels != facts.in_channels:
                return Reason(f"the norm '{norm.name}' has {norm.norm.channels} channels, '{into}' {facts.in_channels}")
            shape = leaf.node.shape
            mismatch = (
                norm.norm.channel_dim % len(shape) != facts.channel_dim % len(shape) if shape is not None
                else norm.norm.channel_dim != facts.channel_dim and not (not geometry.kernel
                                                                          and norm.norm.channel_dim == 1)
            )
            if mismatch:
                return Reason(f"the norm '{norm.name}' normalises another axis than the channels of '{into}'")
        shapes = {leaf.node.shape for leaf in (*layers, *identities)}
        if None not in shapes and len(shapes) > 1:
            return Reason(f"its terms have different shapes ({', '.join(str(s) for s in sorted(shapes))})")  # type: ignore[type-var]
        return tap


def plan_merges(graph: Graph, fold_plan: FoldPlan | None = None, *, split_sums: bool = False) -> MergePlan:
    """Decide which add trees of ``graph`` merge into one layer, once the norms of ``fold_plan`` are folded.

    ``fold_plan``: the folds applied before the merges; ``None`` when the graph was read after folding.
    ``split_sums``: also split trees whose terms read different tensors (:attr:`Merge.kept`), for an adapter whose
    rewrite adds the kept terms. Every add tree with a layer among its terms is merged or refused with a reason;
    the merges are disjoint (a layer or norm belongs to one tree at most).
    """
    return _MergePlanner(graph, fold_plan, split_sums).run()


__all__ = ["ONE", "Branch", "Coefficient", "IdentityBranch", "Merge", "MergePlan", "MergeRefusal", "plan_merges"]
