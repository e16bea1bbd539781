"""Reading an add tree (see :mod:`bnfold.core.merge`): its ops, its leaves, the factor each leaf enters the sum with,
and why a term cannot be read as part of a sum. Nothing here decides whether a tree merges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .graph import CONSTANT, LAYER, NORM, OP, Graph, Node, Operand
from .plan import Reason


@dataclass(frozen=True)
class Factor:
    """A stored tensor a term is multiplied by, ``shape`` as stored, and the product ``op`` that multiplies by it."""

    name: str
    shape: tuple[int, ...]
    op: Node


@dataclass(frozen=True)
class Scale:
    """The factor a term enters its sum with: ``number`` times the product of ``factors``."""

    number: float = 1.0
    factors: tuple[Factor, ...] = ()

    def times(self, other: Scale) -> Scale:
        return Scale(self.number * other.number, self.factors + other.factors)

    @property
    def is_one(self) -> bool:
        return self.number == 1.0 and not self.factors


@dataclass(frozen=True)
class Leaf:
    """A term of an add tree: ``node`` is what the tree's ops read, looking through the identities ``path`` before
    the op ``reader``; ``only_to_tree``: only the tree reads it and them; ``scale``: its factor in the root's sum."""

    node: Node
    path: tuple[Node, ...]
    only_to_tree: bool
    reader: int
    scale: Scale = Scale()

    @property
    def operand(self) -> Node:
        """The node the tree's op reads directly (the leaf, or the last identity after it)."""
        return self.path[-1] if self.path else self.node


def is_number(value: object) -> bool:
    """A finite plain number (a bool is no scale)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def channel_axes(shape: tuple[int, ...]) -> list[int]:
    """The axes of a constant's shape that hold more than one value."""
    return [axis for axis, size in enumerate(shape) if size != 1]


class AddTrees:
    """The add trees of ``graph`` once the norms named in ``folded`` are identities."""

    def __init__(self, graph: Graph, folded: set[str]) -> None:
        self.nodes = graph.nodes
        self.folded = folded

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

    def input_of(self, node: Node) -> Node:
        """The tensor a layer or norm call reads, looking through identities."""
        return self.resolve(self.nodes[node.inputs[0]])

    @staticmethod
    def operands(node: Node) -> list[Operand] | None:
        """The operands of an ``add`` / ``sub`` / ``mul`` node in call order, or None where the facts do not say."""
        if node.op is None:
            return None
        listed = node.op.attributes.get("operands")
        if listed is not None:
            return list(listed)
        if node.op.kind == "add":  # every input a term (the numbers are checked from ``scalars``)
            return [Operand(input=i) for i in range(len(node.inputs))]
        if node.op.kind == "sub" and len(node.inputs) == 2 and not node.op.attributes.get("scalars"):
            return [Operand(input=0), Operand(input=1)]
        return None

    def terms(self, node: Node) -> list[tuple[Node, Scale]] | None:
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
            # numbers and constants added are not terms: ops_reason refuses them with the value
            return [(self.nodes[node.inputs[o.input]], Scale(-1.0 if kind == "sub" and position == 1 else 1.0))
                    for position, o in enumerate(operands) if o.input is not None and o.constant is None]
        tensors = [o for o in operands if o.constant is None and o.number is None and o.input is not None
                   and self.nodes[node.inputs[o.input]].kind != CONSTANT]
        tensor = tensors[0] if len(tensors) == 1 else None
        if tensor is None or tensor.input is None:
            return None  # a product of computed tensors (or of constants only) is no scale of a sum
        number, factors = 1.0, []
        for operand in operands:
            if operand is tensor:
                continue
            if operand.number is not None and is_number(operand.number):
                number *= float(operand.number)
            elif operand.constant is not None and operand.shape is not None and len(channel_axes(operand.shape)) <= 1:
                factors.append(Factor(operand.constant, tuple(operand.shape), node))
            else:
                return None
        return [(self.nodes[node.inputs[tensor.input]], Scale(number, tuple(factors)))]

    def is_root(self, node: Node) -> bool:
        """``node`` is a linear-combination op not read as part of a larger tree (through identities read once)."""
        if self.terms(node) is None:
            return False
        while len(node.users) == 1:
            user = self.nodes[node.users[0]]
            if self.terms(user) is not None:
                return False
            if not self.transparent(user):
                return True
            node = user
        return True

    def read(self, root: Node) -> tuple[list[Node], list[Leaf]]:
        """The ops of the tree rooted at ``root`` (with the identities between them) and its leaves with their
        scales, both in the order the tree reads them."""
        ops: list[Node] = [root]
        leaves: list[Leaf] = []
        self._walk(root, Scale(), ops, leaves)
        return ops, leaves

    def _walk(self, op: Node, scale: Scale, ops: list[Node], leaves: list[Leaf]) -> None:
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
                self._walk(node, scale.times(factor), ops, leaves)
                continue
            leaves.append(Leaf(node, tuple(path), only_to_tree, reader.index, scale.times(factor)))

    # ------------------------------------------------------------------------------ what the tree cannot be

    def ops_reason(self, ops: list[Node]) -> Reason | None:
        """Why an addition or subtraction of the tree is not a plain sum or difference of its terms, or None."""
        for op in ops:
            if op.op is None or op.op.kind not in ("add", "sub"):
                continue
            alpha = op.op.attributes.get("alpha", 1)
            if alpha != 1:
                return Reason(f"{op.label} scales an operand by alpha={alpha}")
            verb = "adds" if op.op.kind == "add" else "subtracts"
            for scalar in op.op.attributes.get("scalars", ()):
                if scalar != 0:
                    return Reason(f"{op.label} {verb} the constant {scalar}")
            for operand in self.operands(op) or []:
                if operand.constant is not None:
                    return Reason(f"{op.label} {verb} the constant '{operand.constant}'")
                if operand.number is not None and operand.number != 0:
                    return Reason(f"{op.label} {verb} the constant {operand.number}")
        return None

    def term_reason(self, leaf: Leaf, source: Node) -> Reason:
        """Why the term ``leaf`` keeps the tree reading ``source`` from merging."""
        node = leaf.node
        if not leaf.only_to_tree and (node.kind in (LAYER, NORM) or self.terms(node) is not None):
            other = next((self.nodes[u].label for u in node.users if u != leaf.reader), None)
            if other is None:
                return Reason(f"it adds the output of {node.label} to itself")
            return Reason(f"the output of {node.label} is also used by {other}")
        if node.kind == OP and node.op is not None and node.op.kind == "mul":
            return self.product_reason(node)
        return Reason(
            f"one of its terms comes from {node.label}, which is not a conv or linear layer reading "
            f"{source.label}, a norm of it, or that tensor itself"
        )

    def product_reason(self, node: Node) -> Reason:
        """Why the product ``node`` is not a scale of a term bnfold can merge."""
        operands = self.operands(node) or []
        term = f"one of its terms is {node.label}"
        for operand in operands:
            if operand.constant is not None and (operand.shape is None or len(channel_axes(operand.shape)) > 1):
                shape = "of unknown shape" if operand.shape is None else f"of shape {operand.shape}"
                return Reason(f"{term}, which multiplies by '{operand.constant}' {shape}: the scale is not per channel")
            if operand.number is not None and not is_number(operand.number):
                return Reason(f"{term}, which multiplies by {operand.number!r}")
        computed = [self.nodes[node.inputs[o.input]].label for o in operands
                    if o.input is not None and o.constant is None and self.nodes[node.inputs[o.input]].kind != CONSTANT]
        if len(computed) > 1:
            return Reason(f"{term}, a product of {computed[0]} and {computed[1]}: a non-constant multiplier")
        return Reason(f"{term}, a product bnfold cannot read as a per-channel scale")
