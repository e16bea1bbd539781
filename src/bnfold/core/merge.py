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
nothing), subtractions (``x - y``: ``y`` enters with the factor -1) and products by a constant (``gamma * s`` with a
``gamma`` of one value per channel, FastViT's ``LayerScale2d``, or a single number) whose inner results are read
only by the next op of the tree. Its **leaves** are what the ops read, looking through identities (an
``nn.Identity``, a dropout in eval, a folded norm); each enters the sum with a per-output-channel **coefficient**
``c_k`` (the product of the signs and scales on its way to the root), so the tree computes ``sum_k c_k * leaf_k``
and a merge of it is

    W = sum_k diag(c_k) pad(W_k) + sum_identities diag(c_i * s_i) at the centre tap,
    b = sum_k c_k * b_k + sum_identities c_i * t_i

(FastViT's RepMixer, ``x + gamma * (mixer(x) - norm(x))``, is one depthwise convolution this way).

A tree whose terms read **different tensors** (a residual ``conv_a(x) + conv_b(x) + BN(x) + y``) is split: the
terms that read one tensor merge into one layer, the others (``y``) stay, added to that layer's output
(:attr:`Merge.kept`). That is done only where it removes a layer or a norm, and only where every term left enters
the sum with the coefficient 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .graph import CONSTANT, LAYER, NORM, OP, Geometry, Graph, LayerFacts, Node, Operand
from .plan import FoldPlan


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
        block: the root addition, as a user reads it.
        root: its node index (the adapter makes every reader of the sum read ``into``'s output instead).
        into: the branch layer with the largest kernel, which keeps its geometry.
        branches: every layer merged, ``into`` included, in the tree's order.
        identities: the identity branches.
        removed: node indices that are no longer computed (the additions, subtractions and products of the tree,
            the other branches' layer and norm calls, the identities between them and the tree, and constants only
            the removed products read).
        kept: for a split tree, the node indices of the terms that stay (each read by the tree directly, each with
            the coefficient 1): the readers of the sum read ``into``'s output plus these, in this order. Empty when
            the whole tree merged (the readers of the sum read ``into``'s output itself).
    """

    block: str
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

    block: str
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


@dataclass(frozen=True)
class _Factor:
    name: str
    shape: tuple[int, ...]
    op: Node  # the product that multiplies by it


@dataclass(frozen=True)
class _Coefficient:
    scale: float = 1.0
    factors: tuple[_Factor, ...] = ()

    def times(self, other: _Coefficient) -> _Coefficient:
        return _Coefficient(self.scale * other.scale, self.factors + other.factors)

    @property
    def is_one(self) -> bool:
        return self.scale == 1.0 and not self.factors

    def public(self) -> Coefficient:
        return Coefficient(self.scale, tuple(f.name for f in self.factors))


_ONE = _Coefficient()


@dataclass(frozen=True)
class _Leaf:
    node: Node  # what the tree's ops read, looking through identities
    path: tuple[Node, ...]  # the identities between it and the op that reads it
    only_to_tree: bool  # the leaf's output (and every identity on the way) is read by the tree alone
    reader: int  # the node of the tree that reads it
    coefficient: _Coefficient = _ONE  # the factor it enters the root's sum with

    @property
    def operand(self) -> Node:
        """The node the tree's op reads directly (the leaf, or the last identity after it)."""
        return self.path[-1] if self.path else self.node


class _Refused(Exception):
    pass


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _channel_axes(shape: tuple[int, ...]) -> list[int]:
    """The axes of a constant's shape that hold more than one value."""
    return [axis for axis, size in enumerate(shape) if size != 1]


class _MergePlanner:
    def __init__(self, graph: Graph, fold_plan: FoldPlan | None, split_sums: bool) -> None:
        self.graph = graph
        self.nodes = graph.nodes
        self.folded = {fold.norm for fold in fold_plan.folds} if fold_plan is not None else set()
        self.split_sums = split_sums

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

    def operands(self, node: Node) -> list[Operand] | None:
        """The operands of an ``add`` / ``sub`` / ``mul`` node in call order, or None where the facts do not say."""
        assert node.op is not None
        listed = node.op.attributes.get("operands")
        if listed is not None:
            return list(listed)
        if node.op.kind == "add":  # every input a term (the numbers are checked from ``scalars``)
            return [Operand(input=i) for i in range(len(node.inputs))]
        if node.op.kind == "sub" and len(node.inputs) == 2 and not node.op.attributes.get("scalars"):
            return [Operand(input=0), Operand(input=1)]
        return None

    def terms(self, node: Node) -> list[tuple[Node, _Coefficient]] | None:
        """The tensors a linear-combination op reads, each with the factor it enters the op's result with; None
        when ``node`` is no such op (any other op, a product of two computed tensors, a scale that is not one value
        per channel)."""
        if node.kind != OP or node.op is None or node.op.kind not in ("add", "sub", "mul"):
            return None
        operands = self.operands(node)
        if operands is None or any(o.input is not None and not 0 <= o.input < len(node.inputs) for o in operands):
            return None
        kind = node.op.kind
        if kind in ("add", "sub"):
            terms = []
            for position, operand in enumerate(operands):
                if operand.input is None or operand.constant is not None:
                    continue  # numbers and constants added: refused by check_ops with the value
                sign = -1.0 if kind == "sub" and position == 1 else 1.0
                terms.append((self.nodes[node.inputs[operand.input]], _Coefficient(sign)))
            return terms
        tensors = [o for o in operands if o.constant is None and o.number is None and o.input is not None
                   and self.nodes[node.inputs[o.input]].kind != CONSTANT]
        if len(tensors) != 1:
            return None  # a product of computed tensors (or of constants only) is no scale of a sum
        scale, factors = 1.0, []
        for operand in operands:
            if operand is tensors[0]:
                continue
            if operand.number is not None and _is_number(operand.number):
                scale *= float(operand.number)
            elif operand.constant is not None and operand.shape is not None and len(_channel_axes(operand.shape)) <= 1:
                factors.append(_Factor(operand.constant, tuple(operand.shape), node))
            else:
                return None
        assert tensors[0].input is not None
        return [(self.nodes[node.inputs[tensors[0].input]], _Coefficient(scale, tuple(factors)))]

    def reader_in_tree(self, node: Node) -> Node | None:
        """The op that reads ``node`` as part of a tree (through identities each read once), or None."""
        while len(node.users) == 1:
            user = self.nodes[node.users[0]]
            if self.terms(user) is not None:
                return user
            if not self.transparent(user):
                return None
            node = user
        return None

    def leaves(self, root: Node) -> tuple[list[Node], list[_Leaf]]:
        """The ops of the tree rooted at ``root`` (with the identities between them) and its leaves with their
        coefficients, both in the order the tree reads them."""
        ops: list[Node] = [root]
        leaves: list[_Leaf] = []
        self._walk(root, _ONE, ops, leaves)
        return ops, leaves

    def _walk(self, op: Node, coefficient: _Coefficient, ops: list[Node], leaves: list[_Leaf]) -> None:
        terms = self.terms(op) or []
        repeated = {id(n) for n, _ in terms if sum(m is n for m, _ in terms) > 1}  # ``y + y``: one input, twice
        for child, factor in terms:
            node, reader, path = child, op, []
            while self.transparent(node) and node.users == [reader.index]:
                path.append(node)
                reader, node = node, self.nodes[node.inputs[0]]
            only_to_tree = node.users == [reader.index] and id(child) not in repeated
            if only_to_tree and self.terms(node) is not None:
                ops.extend(path)  # identities between two ops of the tree go with them
                ops.append(node)
                self._walk(node, coefficient.times(factor), ops, leaves)
                continue
            leaves.append(_Leaf(node, tuple(path), only_to_tree, reader.index, coefficient.times(factor)))

    # --------------------------------------------------------------------------------------- one block

    def layer_facts(self, node: Node) -> LayerFacts:
        unit = self.graph.units[node.unit or ""]
        assert unit.layer is not None
        return unit.layer

    def check_ops(self, ops: list[Node]) -> None:
        """Refuse additions and subtractions that are not plain sums and differences of the terms."""
        for op in ops:
            if op.op is None or op.op.kind not in ("add", "sub"):
                continue
            alpha = op.op.attributes.get("alpha", 1)
            if alpha != 1:
                raise _Refused(f"{op.label} scales an operand by alpha={alpha}")
            verb = "adds" if op.op.kind == "add" else "subtracts"
            for scalar in op.op.attributes.get("scalars", ()):
                if scalar != 0:
                    raise _Refused(f"{op.label} {verb} the constant {scalar}")
            for operand in self.operands(op) or []:
                if operand.constant is not None:
                    raise _Refused(f"{op.label} {verb} the constant '{operand.constant}'")
                if operand.number is not None and operand.number != 0:
                    raise _Refused(f"{op.label} {verb} the constant {operand.number}")

    def source_of(self, leaf: _Leaf) -> Node | None:
        """The tensor a mergeable layer or norm term reads (through identities), or None for any other term."""
        if leaf.node.kind in (LAYER, NORM) and leaf.only_to_tree and len(leaf.node.inputs) >= 1:
            return self.resolve(self.nodes[leaf.node.inputs[0]])
        return None

    def plan_tree(self, root: Node, ops: list[Node], leaves: list[_Leaf]) -> tuple[Merge, bool]:
        """The merge of the tree, split where its terms read different tensors; and whether the terms a split left
        may merge among themselves in another round. Raises :class:`_Refused` with the reason when nothing merges."""
        self.check_ops(ops)
        groups: dict[int, list[_Leaf]] = {}  # source node -> its layer terms, in the tree's order
        sources: dict[int, Node] = {}
        for leaf in leaves:
            source = self.source_of(leaf) if leaf.node.kind == LAYER else None
            if source is not None:
                groups.setdefault(source.index, []).append(leaf)
                sources[source.index] = source
        for index, layers in groups.items():  # the identities and the norms of each source join its layers
            source = sources[index]
            for leaf in leaves:
                if leaf in layers:
                    continue
                if self.resolve(leaf.node) is source or (leaf.node.kind == NORM and self.source_of(leaf) is source):
                    layers.append(leaf)
        whole = [g for g in groups.values() if len(g) == len(leaves)]
        if whole:
            return self.plan_block(root, ops, leaves), False
        candidates = sorted((g for g in groups.values() if self.removes(g)), key=lambda g: -self.removes(g)) \
            if self.split_sums else []
        if not candidates:
            try:
                self.plan_block(root, ops, leaves)  # raises the reason the whole tree cannot merge
            except _Refused as refusal:
                if not self.split_sums:
                    raise
                raise _Refused(f"{refusal}; merging only the terms that read one tensor would remove no layer or "
                               f"norm") from None
            raise AssertionError("a tree whose terms read different tensors merged whole")  # pragma: no cover
        first: _Refused | None = None
        for group in candidates:
            kept = [leaf for leaf in leaves if leaf not in group]
            try:
                return self.plan_block(root, ops, [leaf for leaf in leaves if leaf in group], kept), len(candidates) > 1
            except _Refused as refusal:
                first = first or refusal
        assert first is not None
        raise first

    def removes(self, group: list[_Leaf]) -> int:
        """How many layer and norm calls merging ``group`` saves (0: the split would only move an addition)."""
        layers = sum(1 for leaf in group if leaf.node.kind == LAYER and leaf.only_to_tree)
        norms = sum(1 for leaf in group if leaf.node.kind == NORM and leaf.only_to_tree and self.resolve(leaf.node)
                    is leaf.node)
        return layers - 1 + norms

    def plan_block(self, root: Node, ops: list[Node], leaves: list[_Leaf], kept: list[_Leaf] | None = None) -> Merge:
        """Merge ``leaves`` (all the tree's terms, or one tensor's terms of a split tree) into one layer; ``kept``: the
        terms of a split tree that stay added to it."""
        kept = kept or []
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
            else:
                raise _Refused(self.term_reason(leaf, source))
        for leaf in kept:
            related = leaf.node.kind in (LAYER, NORM) and leaf.node.inputs and self.resolve(
                self.nodes[leaf.node.inputs[0]]) is source
            if related and not leaf.only_to_tree:
                raise _Refused(self.term_reason(leaf, source))
            if not leaf.coefficient.is_one:
                raise _Refused(
                    f"its terms read different tensors, and {leaf.node.label}, which would stay added to the merged "
                    f"layer's output, enters the sum scaled or subtracted"
                )
        into, branches = self.place_kernels(layers)
        taps = self.identity_taps(into, layers, identities + norms, source)
        self.check_factors(into, [leaf for leaf in leaves if leaf in layers or leaf in identities or leaf in norms])
        coefficients = {id(leaf): leaf.coefficient.public() for leaf in leaves}
        branches = [Branch(b.layer, b.offset, coefficients[id(leaf)]) for b, leaf in zip(branches, layers, strict=True)]
        identity_branches = [IdentityBranch(leaf.node.unit if leaf in norms else None, taps, coefficients[id(leaf)])
                             for leaf in leaves if leaf in identities or leaf in norms]
        removed = {op.index for op in ops}
        for leaf in leaves:
            removed.update(n.index for n in leaf.path)
            if leaf in norms or (leaf in layers and leaf.node.unit != into):
                removed.add(leaf.node.index)
        for op in ops:  # constants only the removed products read (a layer scale) go with them
            for index in op.inputs:
                node = self.nodes[index]
                if node.kind == CONSTANT and all(user in removed for user in node.users):
                    removed.add(index)
        return Merge(root.label, root.index, into, tuple(branches), tuple(identity_branches), tuple(sorted(removed)),
                     tuple(leaf.operand.index for leaf in kept))

    def term_reason(self, leaf: _Leaf, source: Node) -> str:
        """Why the term ``leaf`` keeps the tree reading ``source`` from merging."""
        if not leaf.only_to_tree and (leaf.node.kind in (LAYER, NORM) or self.terms(leaf.node) is not None):
            other = next((self.nodes[u].label for u in leaf.node.users if u != leaf.reader), None)
            if other is None:
                return f"it adds the output of {leaf.node.label} to itself"
            return f"the output of {leaf.node.label} is also used by {other}"
        node = leaf.node
        if node.kind == OP and node.op is not None and node.op.kind == "mul":
            return self.product_reason(node)
        return (
            f"one of its terms comes from {node.label}, which is not a conv or linear layer reading "
            f"{source.label}, a norm of it, or that tensor itself"
        )

    def product_reason(self, node: Node) -> str:
        """Why the product ``node`` is not a scale of a term bnfold can merge."""
        operands = self.operands(node) or []
        for operand in operands:
            if operand.constant is not None and (operand.shape is None or len(_channel_axes(operand.shape)) > 1):
                shape = "of unknown shape" if operand.shape is None else f"of shape {operand.shape}"
                return (f"one of its terms is {node.label}, which multiplies by '{operand.constant}' {shape}: the scale "
                        f"is not per channel")
            if operand.number is not None and not _is_number(operand.number):
                return f"one of its terms is {node.label}, which multiplies by {operand.number!r}"
        computed = [self.nodes[node.inputs[o.input]].label for o in operands
                    if o.input is not None and o.constant is None and self.nodes[node.inputs[o.input]].kind != CONSTANT]
        if len(computed) > 1:
            return (f"one of its terms is {node.label}, a product of {computed[0]} and {computed[1]}: a non-constant "
                    f"multiplier")
        return f"one of its terms is {node.label}, a product bnfold cannot read as a per-channel scale"

    def check_factors(self, into: str, terms: list[_Leaf]) -> None:
        """Every scale on the merged terms must be one value per output channel of ``into`` (or a single value)."""
        facts = self.graph.units[into].layer
        assert facts is not None and facts.geometry is not None
        shapes = [leaf.node.shape for leaf in terms if leaf.node.shape is not None]
        rank = len(shapes[0]) if shapes else (len(facts.geometry.kernel) + 2 if facts.channel_dim >= 0 else None)
        for leaf in terms:
            for factor in leaf.coefficient.factors:
                where = f"{factor.op.label} multiplies by '{factor.name}' of shape {factor.shape}"
                if rank is not None and len(factor.shape) > rank:
                    raise _Refused(f"{where}, more axes than the terms it scales have")
                axes = _channel_axes(factor.shape)
                if not axes:
                    continue  # a single value
                if facts.channel_dim >= 0 and rank is None:
                    raise _Refused(f"{where}, and the rank of the terms it scales is not known")
                channel = facts.channel_dim - rank if facts.channel_dim >= 0 and rank is not None else facts.channel_dim
                if axes[0] - len(factor.shape) != channel or factor.shape[axes[0]] != facts.out_channels:
                    raise _Refused(
                        f"{where}: the scale is not per channel of '{into}' ({facts.out_channels} channels on axis "
                        f"{facts.channel_dim})"
                    )

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
            if self.terms(node) is None or self.reader_in_tree(node) is not None:
                continue
            ops, leaves = self.leaves(node)
            if len(leaves) < 2 or not any(leaf.node.kind == LAYER and leaf.only_to_tree for leaf in leaves):
                continue  # not a block with a branch to merge into: nothing to report
            try:
                merge, again = self.plan_tree(node, ops, leaves)
            except _Refused as refusal:
                plan.refusals.append(MergeRefusal(node.label, node.index, str(refusal)))
                continue
            plan.merges.append(merge)
            plan.again = plan.again or again
        return plan


def _show(padding: tuple[tuple[int, int], ...]) -> str:
    if all(begin == end for begin, end in padding):
        return str(tuple(begin for begin, _ in padding))
    return str(padding)


def plan_merges(graph: Graph, fold_plan: FoldPlan | None = None, *, split_sums: bool = False) -> MergePlan:
    """Decide which add trees of ``graph`` merge into one layer, once the norms of ``fold_plan`` are folded.

    ``fold_plan``: the folds applied before the merges (their norms are identities now); ``None`` when the graph
    was read after folding. ``split_sums``: also split trees whose terms read different tensors (merges with
    :attr:`Merge.kept` terms); an adapter passes True once its rewrite adds the kept terms to the merged layer's
    output, so one that does not know them never gets such a merge. Every add tree that has a layer among its terms
    is either merged or refused with a reason; the merges are disjoint (a layer or norm belongs to one tree at most).
    """
    return _MergePlanner(graph, fold_plan, split_sums).run()


__all__ = ["ONE", "Branch", "Coefficient", "Geometry", "IdentityBranch", "Merge", "MergePlan", "MergeRefusal",
           "plan_merges"]
