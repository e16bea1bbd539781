"""Following a tensor along the core graph for the planner (:mod:`bnfold.core.plan`): which layer is at the other
end of a norm, what lies between, and where the channel axis goes on the way. Nothing here decides a fold; a stretch
that cannot be followed comes back as the sentence why (a ``str``), as in :mod:`bnfold.core.commuting`.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import commuting
from .commuting import AffineStep
from .graph import LAYER, NORM, Graph, Node


@dataclass(frozen=True)
class Followed:
    """Where a channel axis ends after a stretch of ops: its axis, the tensor's shape (if known), whether an op needs
    every scale to be non-negative, the affine steps met (in dataflow order) and the layout (outer, inner)."""

    axis: int
    shape: tuple[int, ...] | None
    needs_non_negative: bool
    steps: tuple[AffineStep, ...]
    layout: tuple[int, int]


class Paths:
    """The graph's dataflow as a fold sees it. ``folded_forward`` / ``folded_backward``: the norms folded so far in
    each direction, which a trace towards the producer / the consumers looks through."""

    def __init__(self, graph: Graph) -> None:
        self.nodes = graph.nodes
        self.units = graph.units
        self.folded_forward: set[str] = set()
        self.folded_backward: set[str] = set()
        self._steps: dict[int, tuple[int, AffineStep] | str | None] = {}

    def other_user(self, node: Node, expected: Node) -> str:
        """How a reason names a reader of ``node`` other than ``expected``."""
        others = [self.nodes[u] for u in node.users if u != expected.index]
        return others[0].label if others else "another call"

    def step(self, node: Node) -> tuple[int, AffineStep] | str | None:
        """``node`` as a per-channel affine step (:func:`commuting.affine_step`), worked out once."""
        if node.index not in self._steps:
            self._steps[node.index] = commuting.affine_step(node, self.nodes)
        return self._steps[node.index]

    def _passes(self, node: Node, folded: set[str]) -> bool:
        """Whether a trace looks through ``node``: a norm in ``folded``, a commuting op, or an affine step."""
        return ((node.kind == NORM and node.unit in folded) or commuting.may_commute(node)
                or isinstance(self.step(node), tuple))

    def producer(self, reader: Node, source: Node, steps: bool = True) -> tuple[Node, list[Node]] | str:
        """The node that produced the tensor ``source`` hands to ``reader``, and the nodes between (producer side
        first, each read only by the next), looking through transparent nodes and, unless ``steps`` is False (a
        concatenation's inputs), affine steps."""
        between: list[Node] = []
        current = reader
        while self._passes(source, self.folded_forward) and (steps or not isinstance(self.step(source), tuple)):
            if source.users != [current.index]:
                return (f"the output of {source.label}, between it and its layer, is also used by "
                        f"{self.other_user(source, current)}")
            between.append(source)
            if not source.inputs:
                return "its input is not produced by a layer (it is a constant)"
            step = self.step(source)  # the tensor an affine step transforms, else the op's first input
            current, source = source, self.nodes[step[0] if isinstance(step, tuple) else source.inputs[0]]
        between.reverse()
        return source, between

    def layers_reached(self, norm_node: Node) -> list[tuple[Node, list[Node]]] | str:
        """Every layer call the norm's output reaches, each with the nodes between (norm side first)."""
        leaves: list[tuple[Node, list[Node]]] = []
        pending: list[tuple[Node, list[Node]]] = [(norm_node, [])]
        while pending:
            node, between = pending.pop()
            if not node.users:
                return f"the output of {node.label} is not used"
            for index in node.users:
                user = self.nodes[index]
                if user.kind == LAYER:
                    leaves.append((user, between))
                elif self._passes(user, self.folded_backward):
                    pending.append((user, [*between, user]))
                else:
                    what = "it" if node is norm_node else node.label
                    return f"the output of {what} goes to {user.label}, not only to conv or linear layers"
        return leaves

    def follow_axis(
        self,
        axis: int,
        shape: tuple[int, ...] | None,
        between: list[Node] | tuple[Node, ...],
        channels: int,
        rank: int | None = None,
    ) -> Followed | str:
        """Follow channel ``axis`` (of ``channels`` channels) of a tensor of ``shape`` through ``between``: where it
        ends, the affine steps met, and whether an op on the way needs every scale to be non-negative; or why the
        map does not pass. ``rank``: the tensor's rank where its shape is not known but its layer tells."""
        needs_non_negative = False
        steps: list[AffineStep] = []
        layout = (1, 1)
        if shape is not None:
            rank = len(shape)
            axis %= rank
        for node in between:
            if node.kind == NORM:  # a norm folded already: an identity now
                continue
            step = self.step(node)
            if step is not None:
                if isinstance(step, str):
                    return step
                problem = commuting.constant_problem(step[1], rank, axis, channels, layout)
                if problem:
                    return problem
                steps.append(step[1])
                shape = node.shape if node.shape is not None else shape
                continue
            passage = commuting.passage(node, shape, axis, layout, rank)
            if isinstance(passage, str):
                return passage
            assert node.op is not None
            if node.shape is not None:
                rank = len(node.shape)
            elif node.op.kind not in commuting.RANK_KEEPING:
                rank = None
            axis, shape, layout = passage.axis, node.shape, (passage.outer, passage.inner)
            needs_non_negative = needs_non_negative or passage.needs_non_negative_scale
        return Followed(axis, shape, needs_non_negative, tuple(steps), layout)
