"""The merge planner: parallel branches summed into one layer (RepVGG, MobileOne, RepViT blocks), for every format.

A re-parameterisable block computes, while training, a sum of branches that all read the same tensor ``X``::

    y = conv_3x3(X) + conv_1x1(X) + BN(X) + X

After the fold plan every norm folded into a layer is an identity, so each ``conv_k(X)`` is a plain linear layer
``W_k * X + b_k``, and a norm left on an identity branch is a per-channel affine map ``s * X + t``. A sum of linear
maps of the same input is one linear map: with every kernel placed where it reads the same input positions inside
the largest kernel (zeros elsewhere),

    W = sum_k pad(W_k) + sum_identities diag(s) at the centre tap,      b = sum_k b_k + sum_identities t

(``X`` itself is the identity with ``s = 1``, ``t = 0``; for grouped and depthwise convolutions the identity is
per group). That is exact when the branches agree on everything else: same stride, dilation and groups, same
channels, kernels that sit inside the largest one reading the same positions (a 1x1 with padding 0 centred in a
3x3 with padding 1), zero padding (the larger kernel then reads zeros, or real inputs multiplied by zeros, where a
smaller one read nothing), no transposed convolutions, and an identity branch only where the layer keeps the
input's positions (stride 1, the identity tap exactly under each output).

This module decides, on the core :class:`~bnfold.core.graph.Graph` alone (torch-free, like the fold planner),
which add trees merge and why the others do not; the arithmetic is :func:`bnfold.core.apply.merge_branches`, the
rewrite of the graph is each adapter's.

An **add tree** is a tree of additions (``x + y``, ``torch.add``, ``+=``; a constant ``0`` operand counts for
nothing) whose inner sums are read only by the next addition. Its **leaves** are what the additions read, looking
through identities (an ``nn.Identity``, a dropout in eval, a folded norm).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .graph import LAYER, NORM, OP, Geometry, Graph, LayerFacts, Node
from .plan import FoldPlan


@dataclass(frozen=True)
class Branch:
    """A layer merged: ``offset`` is where its kernel sits inside the merged kernel, per spatial axis."""

    layer: str
    offset: tuple[int, ...]


@dataclass(frozen=True)
class IdentityBranch:
    """An identity branch: ``X`` itself (``norm`` None) or a norm of ``X`` (an identity scaled per channel, plus
    its shift); ``tap`` is the kernel position that reads, for every output, the input at the same place."""

    norm: str | None
    tap: tuple[int, ...]


@dataclass(frozen=True)
class Merge:
    """Merge an add tree into the layer ``into``: its kernel and bias become the sums of every branch's.

    Attributes:
        block: the root addition, as a user reads it.
        root: its node index (the adapter makes every reader of the sum read ``into``'s output instead).
        into: the branch layer with the largest kernel, which keeps its geometry.
        branches: every layer merged, ``into`` included, in the tree's order.
        identities: the identity branches.
        removed: node indices that are no longer computed (the additions, the other branches' layer and norm calls,
            and the identities between them and the additions).
    """

    block: str
    root: int
    into: str
    branches: tuple[Branch, ...]
    identities: tuple[IdentityBranch, ...]
    removed: tuple[int, ...]

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

    block: str
    root: int
    reason: str


@dataclass
class MergePlan:
    """What merging will do, and the candidate blocks it leaves (each with its reason)."""

    merges: list[Merge] = field(default_factory=list)
    refusals: list[MergeRefusal] = field(default_factory=list)


@dataclass(frozen=True)
class _Leaf:
    node: Node  # what the additions read, looking through identities
    path: tuple[Node, ...]  # the identities between it and its addition
    only_to_tree: bool  # the leaf's output (and every identity on the way) is read by the tree alone
    reader: int  # the node of the tree that reads it


class _Refused(Exception):
    pass


class _MergePlanner:
    def __init__(self, graph: Graph, fold_plan: FoldPlan | None) -> None:
        self.graph = graph
        self.nodes = graph.nodes
        self.folded = {fold.norm for fold in fold_plan.folds} if fold_plan is not None else set()

    # ------------------------------------------------------------------------------------------ the trees

    @staticmethod
    def is_add(node: Node) -> bool:
        return node.kind == OP and node.op is not None and node.op.kind == "add"

    def transparent(self, node: Node) -> bool:
        """An identity now: a folded norm, an identity op, a dropout in eval."""
        if len(node.inputs) != 1:
            return False
        if node.kind == NORM:
            return node.unit in self.folded
        if node.kind != OP or node.op is None:
            return False
        return node.op.kind == "identity" or (node.op.kind == "dropout" and node.op.attributes.get("training") is False)

    def resolve(self, node: Node) -> Node:
        """The tensor ``node`` stands for: itself, or what the identities before it pass on."""
        while self.transparent(node):
            node = self.nodes[node.inputs[0]]
        return node

    def reader_in_tree(self, node: Node) -> Node | None:
        """The addition that reads ``node`` as part of a tree (through identities each read once), or None."""
        while len(node.users) == 1:
            user = self.nodes[node.users[0]]
            if self.is_add(user):
                return user
            if not self.transparent(user):
                return None
            node = user
        return None

    def leaves(self, add: Node) -> tuple[list[Node], list[_Leaf]]:
        """The additions of the tree rooted at ``add`` (with the identities between them) and its leaves, both in
        the order the sum reads them."""
        adds: list[Node] = [add]
        leaves: list[_Leaf] = []
        for index in add.inputs:
            node, reader, path = self.nodes[index], add, []
            while self.transparent(node) and node.users == [reader.index]:
                path.append(node)
                reader, node = node, self.nodes[node.inputs[0]]
            if self.is_add(node) and node.users == [reader.index]:
                adds.extend(path)  # identities between two additions go with them
                inner_adds, inner_leaves = self.leaves(node)
                adds.extend(inner_adds)
                leaves.extend(inner_leaves)
                continue
            leaves.append(_Leaf(node, tuple(path), node.users == [reader.index], reader.index))
        return adds, leaves

    # --------------------------------------------------------------------------------------- one block

    def layer_facts(self, node: Node) -> LayerFacts:
        unit = self.graph.units[node.unit or ""]
        assert unit.layer is not None
        return unit.layer

    def plan_block(self, root: Node, adds: list[Node], leaves: list[_Leaf]) -> Merge:
        for add in adds:
            if not self.is_add(add):
                continue
            assert add.op is not None
            alpha = add.op.attributes.get("alpha", 1)
            if alpha != 1:
                raise _Refused(f"{add.label} scales an operand by alpha={alpha}")
            for scalar in add.op.attributes.get("scalars", ()):
                if scalar != 0:
                    raise _Refused(f"{add.label} adds the constant {scalar}")
        layers = [leaf for leaf in leaves if leaf.node.kind == LAYER and leaf.only_to_tree]
        for leaf in layers:
            name = leaf.node.unit or ""
            facts = self.layer_facts(leaf.node)
            if facts.not_a_rule:
                raise _Refused(f"the branch '{name}': {facts.not_a_rule}")
            if facts.problem:
                raise _Refused(facts.problem)
            if self.graph.units[name].calls != [leaf.node.index]:
                raise _Refused(f"'{name}' is also called at another site, which would change too")
            if len(leaf.node.inputs) != 1:
                raise _Refused(f"'{name}' reads several tensors")
            if facts.geometry is None:
                raise _Refused(f"'{name}' is not mergeable: its geometry is unknown")
            if facts.geometry.transposed:
                raise _Refused(f"'{name}' is a transposed convolution, whose branches bnfold does not merge")
        inputs = {id(self.resolve(self.nodes[leaf.node.inputs[0]])): leaf for leaf in layers}
        if len(inputs) > 1:
            shown = ", ".join(
                f"'{leaf.node.unit}' reads {self.resolve(self.nodes[leaf.node.inputs[0]]).label}"
                for leaf in inputs.values()
            )
            raise _Refused(f"its branches read different tensors ({shown})")
        source = self.resolve(self.nodes[layers[0].node.inputs[0]])
        identities: list[_Leaf] = []
        norms: list[_Leaf] = []
        for leaf in leaves:
            if leaf in layers:
                continue
            if self.resolve(leaf.node) is source:
                identities.append(leaf)
            elif leaf.node.kind == NORM and leaf.only_to_tree and self.resolve(self.nodes[leaf.node.inputs[0]]) is source:
                norms.append(leaf)
            elif not leaf.only_to_tree and (leaf.node.kind in (LAYER, NORM) or self.is_add(leaf.node)):
                other = next((self.nodes[u].label for u in leaf.node.users if u != leaf.reader), None)
                if other is None:
                    raise _Refused(f"it adds the output of {leaf.node.label} to itself")
                raise _Refused(f"the output of {leaf.node.label} is also used by {other}")
            else:
                raise _Refused(
                    f"one of its terms comes from {leaf.node.label}, which is not a conv or linear layer reading "
                    f"{source.label}, a norm of it, or that tensor itself"
                )
        into, branches = self.place_kernels(layers)
        taps = self.identity_taps(into, layers, identities + norms, source)
        identity_branches = [IdentityBranch(leaf.node.unit if leaf in norms else None, taps) for leaf in leaves
                             if leaf in identities or leaf in norms]
        removed = [add.index for add in adds]
        for leaf in leaves:
            removed.extend(n.index for n in leaf.path)
            if leaf in norms or (leaf in layers and leaf.node.unit != into):
                removed.append(leaf.node.index)
        return Merge(root.label, root.index, into, tuple(branches), tuple(identity_branches), tuple(sorted(removed)))

    def place_kernels(self, layers: list[_Leaf]) -> tuple[str, list[Branch]]:
        """The layer whose kernel covers every other's, and where each kernel sits inside it; or why none can."""
        facts = [(leaf.node.unit or "", self.layer_facts(leaf.node)) for leaf in layers]
        first_name, first = facts[0]
        assert first.geometry is not None
        for name, other in facts[1:]:
            assert other.geometry is not None
            a, b = first.geometry, other.geometry
            if (first.channel_dim, len(a.kernel)) != (other.channel_dim, len(b.kernel)):
                raise _Refused(f"'{first_name}' and '{name}' are different kinds of layer")
            for what, mine, theirs in (("strides", a.stride, b.stride), ("dilations", a.dilation, b.dilation),
                                       ("groups", a.groups, b.groups)):
                if mine != theirs:
                    raise _Refused(f"different {what}: '{first_name}' has {mine}, '{name}' has {theirs}")
            if (first.in_channels, first.out_channels) != (other.in_channels, other.out_channels):
                raise _Refused(
                    f"'{first_name}' maps {first.in_channels} to {first.out_channels} channels, '{name}' "
                    f"{other.in_channels} to {other.out_channels}"
                )
        for name, fact in facts:
            geometry = fact.geometry
            assert geometry is not None
            if geometry.padding_mode != "zeros" and any(p for pair in geometry.padding for p in pair):
                raise _Refused(
                    f"'{name}' pads with {geometry.padding_mode} values: a larger kernel would read other values "
                    f"where it read padding"
                )
        largest = [
            (name, fact) for name, fact in facts
            if all(all(k >= j for k, j in zip(fact.geometry.kernel, other.geometry.kernel, strict=True))  # type: ignore[union-attr]
                   for _, other in facts)
        ]
        if not largest:
            raise _Refused("no branch's kernel covers the others' (" + ", ".join(
                f"'{name}' {fact.geometry.kernel}" for name, fact in facts) + ")")  # type: ignore[union-attr]
        into, big = largest[0]
        target = big.geometry
        assert target is not None
        branches: list[Branch] = []
        for name, fact in facts:
            geometry = fact.geometry
            assert geometry is not None
            offset: list[int] = []
            for axis, (k, d, (begin, end), big_k, (big_begin, big_end)) in enumerate(zip(
                geometry.kernel, geometry.dilation, geometry.padding, target.kernel, target.padding, strict=True
            )):
                shift, rest = divmod(big_begin - begin, d)
                if rest or not 0 <= shift <= big_k - k or big_end - end != d * (big_k - k - shift):
                    raise _Refused(
                        f"'{name}' (kernel {geometry.kernel}, padding {_show(geometry.padding)}) does not read the "
                        f"positions '{into}' (kernel {target.kernel}, padding {_show(target.padding)}) reads on axis "
                        f"{axis}: padding that would change the border outputs"
                    )
                offset.append(shift)
            branches.append(Branch(name, tuple(offset)))
        return into, branches

    def identity_taps(self, into: str, layers: list[_Leaf], identities: list[_Leaf], source: Node) -> tuple[int, ...]:
        """The kernel position of ``into`` that reads each output's own input position; or why there is none."""
        unit = self.graph.units[into]
        facts = unit.layer
        assert facts is not None and facts.geometry is not None
        geometry = facts.geometry
        if not identities:
            return ()
        if facts.in_channels != facts.out_channels:
            raise _Refused(
                f"it adds its input to '{into}', which maps {facts.in_channels} to {facts.out_channels} channels: an "
                f"identity branch needs as many outputs as inputs"
            )
        if any(s != 1 for s in geometry.stride):
            raise _Refused(f"it adds its input to '{into}', which has stride {geometry.stride}: an identity needs stride 1")
        tap: list[int] = []
        for k, d, (begin, end) in zip(geometry.kernel, geometry.dilation, geometry.padding, strict=True):
            position, rest = divmod(begin, d)
            if rest or not 0 <= position < k or end != d * (k - 1 - position):
                raise _Refused(
                    f"'{into}' (kernel {geometry.kernel}, padding {_show(geometry.padding)}) does not keep its input's "
                    f"positions, so its input cannot be added as an identity kernel"
                )
            tap.append(position)
        for leaf in identities:
            if leaf.node.kind != NORM or leaf.node is source:
                continue
            norm = self.graph.units[leaf.node.unit or ""]
            assert norm.norm is not None
            if norm.norm.problem:
                raise _Refused(f"the norm '{norm.name}' on its identity branch: {norm.norm.problem}")
            if norm.norm.backward_blocker:
                raise _Refused(f"the norm '{norm.name}' on its identity branch: {norm.norm.backward_blocker}")
            if norm.calls != [leaf.node.index]:
                raise _Refused(f"the norm '{norm.name}' on its identity branch is also called at another site")
            if norm.norm.channels != facts.in_channels:
                raise _Refused(f"the norm '{norm.name}' has {norm.norm.channels} channels, '{into}' {facts.in_channels}")
            shape = leaf.node.shape
            mismatch = (
                norm.norm.channel_dim % len(shape) != facts.channel_dim % len(shape) if shape is not None
                else norm.norm.channel_dim != facts.channel_dim and not (len(geometry.kernel) == 0
                                                                          and norm.norm.channel_dim == 1)
            )
            if mismatch:
                raise _Refused(f"the norm '{norm.name}' normalises another axis than the channels of '{into}'")
        shapes = {leaf.node.shape for leaf in (*layers, *identities)}
        if None not in shapes and len(shapes) > 1:
            raise _Refused(f"its terms have different shapes ({', '.join(str(s) for s in sorted(shapes))})")  # type: ignore[type-var]
        return tuple(tap)

    # ------------------------------------------------------------------------------------------------ driver

    def run(self) -> MergePlan:
        plan = MergePlan()
        for node in self.nodes:
            if not self.is_add(node) or self.reader_in_tree(node) is not None:
                continue
            adds, leaves = self.leaves(node)
            if len(leaves) < 2 or not any(leaf.node.kind == LAYER and leaf.only_to_tree for leaf in leaves):
                continue  # not a block with a branch to merge into: nothing to report
            try:
                plan.merges.append(self.plan_block(node, adds, leaves))
            except _Refused as refusal:
                plan.refusals.append(MergeRefusal(node.label, node.index, str(refusal)))
        return plan


def _show(padding: tuple[tuple[int, int], ...]) -> str:
    if all(begin == end for begin, end in padding):
        return str(tuple(begin for begin, _ in padding))
    return str(padding)


def plan_merges(graph: Graph, fold_plan: FoldPlan | None = None) -> MergePlan:
    """Decide which add trees of ``graph`` merge into one layer, once the norms of ``fold_plan`` are folded.

    ``fold_plan``: the folds applied before the merges (their norms are identities now); ``None`` when the graph
    was read after folding. Every add tree that has a layer among its terms is either merged or refused with a
    reason; the merges are disjoint (a layer or norm belongs to one tree at most).
    """
    return _MergePlanner(graph, fold_plan).run()


__all__ = ["Branch", "Geometry", "IdentityBranch", "Merge", "MergePlan", "MergeRefusal", "plan_merges"]
