"""The planner: which norm folds into which layer, and why any norm stays. One planner for every format.

It reads a :class:`~bnfold.core.graph.Graph` (nodes, units, facts: never weight values) and decides, for every norm
unit, either a :class:`Fold` or a :class:`Refusal` whose reason a user can act on. A fold is planned only where it is
exact for every call of both units:

* **forward** (layer -> norm): every call of the norm reads the output of a call of one linear layer, nothing
  else reads that output, and every call of that layer feeds this norm (a layer called twice, once without the
  norm after it, would otherwise be changed at the other call too). A norm whose input concatenates the outputs of
  several layers along its channels folds into each of them, each taking its share of the channels.
* **backward** (norm -> layers): every call of the norm feeds only linear layers that can absorb an affine map on
  their input exactly (fully connected; convolutions that do not zero-pad), and those layers read nothing else.

Both look through operations that commute with a per-channel affine map (:mod:`bnfold.core.commuting`), and
through ops that are such maps themselves (an ``Add`` of a per-channel bias, ``x * scale``, ``x / 2``): those stay
in the model, and the fold's :class:`Route` names them so that the norm is folded through them. A backward fold
also reaches a layer whose input features spread each channel over several features (``BN -> flatten ->
Linear`` with a spatial size above 1x1); the route says how. Norms
whose forward fold was planned become transparent, so chains fold completely (Conv -> BN -> BN); backward folds are
planned last, from the end of the network, so BN -> BN -> Linear folds completely too.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from . import commuting
from .commuting import AffineStep
from .graph import LAYER, NORM, Graph, LayerFacts, Node, Unit, input_fold_blocker, norm_problem

FORWARD = "forward"
BACKWARD = "backward"


@dataclass(frozen=True)
class Route:
    """What lies between a norm and one layer it folds into, besides ops that pass its map unchanged.

    ``steps``: the model's own per-channel affine ops on the way (:class:`~bnfold.core.commuting.AffineStep`),
    ordered from the norm outward; they stay in the model and the norm is folded through them. ``outer`` /
    ``inner`` (backward folds): the layer's input feature ``f`` belongs to the norm's channel ``(f // inner) % C``,
    so it absorbs ``s`` and ``t`` expanded to ``outer * C * inner`` features.
    """

    steps: tuple[AffineStep, ...] = ()
    outer: int = 1
    inner: int = 1

    @property
    def plain(self) -> bool:
        return not self.steps and self.outer == 1 and self.inner == 1


PLAIN = Route()


@dataclass(frozen=True)
class Fold:
    """Fold norm ``norm`` into ``layers`` (unit names).

    Forward: the layer before it, or the layers whose outputs were concatenated along channels into its input (each
    takes its share of the channels, in order). Backward: every layer after it (each absorbs all its channels).
    ``routes``: one :class:`Route` per layer where any is not plain, else empty.
    """

    norm: str
    layers: tuple[str, ...]
    direction: str
    routes: tuple[Route, ...] = ()

    def route(self, index: int) -> Route:
        return self.routes[index] if self.routes else PLAIN


@dataclass(frozen=True)
class Reason:
    """Why a fold cannot be made, in words a user can act on: what the planner's steps return instead of a result."""

    text: str

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Refusal:
    """Leave norm ``norm`` in place, because of ``reason`` (a sentence a user can act on)."""

    norm: str
    reason: str


@dataclass
class FoldPlan:
    """What folding will do, in the order it must be done (a chain's first norm first), and what it leaves."""

    folds: list[Fold]
    refusals: list[Refusal]
    method: str
    notes: list[str] = field(default_factory=list)

    def decisions(self) -> Iterator[Fold | Refusal]:
        yield from self.folds
        yield from self.refusals


@dataclass(frozen=True)
class _Followed:
    """Where a channel axis ends after a stretch of ops: its axis, the tensor's shape (if known), whether an op needs
    every scale to be non-negative, the affine steps met (in dataflow order) and the layout (outer, inner)."""

    axis: int
    shape: tuple[int, ...] | None
    needs_non_negative: bool
    steps: tuple[AffineStep, ...]
    layout: tuple[int, int]


_RANK_KEEPING = frozenset({"identity", "dropout", "avg_pool", "adaptive_avg_pool", "max_pool", "upsample", "pad",
                           "permute", "transpose"})


@dataclass(frozen=True)
class _Path:
    """A layer call, the norm call at the other end, and the nodes between them (in dataflow order)."""

    layer: Node
    norm: Node
    between: tuple[Node, ...]


class _Planner:
    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.nodes = graph.nodes
        self.units = graph.units
        self.folded_forward: set[str] = set()
        self.folded_backward: set[str] = set()
        self.notes: list[str] = list(graph.notes)
        self._steps: dict[int, tuple[int, AffineStep] | str | None] = {}

    # ------------------------------------------------------------------------------------- paths and axes

    def _other_user(self, node: Node, expected: Node) -> str:
        others = [self.nodes[u] for u in node.users if u != expected.index]
        return others[0].label if others else "another call"

    def step(self, node: Node) -> tuple[int, AffineStep] | str | None:
        """``node`` as a per-channel affine step (:func:`commuting.affine_step`), worked out once."""
        if node.index not in self._steps:
            self._steps[node.index] = commuting.affine_step(node, self.nodes)
        return self._steps[node.index]

    def data_input(self, node: Node) -> Node:
        """The node whose tensor ``node`` transforms: the tensor of an affine step, else its first input."""
        step = self.step(node)
        return self.nodes[step[0]] if isinstance(step, tuple) else self.nodes[node.inputs[0]]

    def passes_forward(self, node: Node) -> bool:
        """Whether a trace towards the producer looks through ``node``: a norm folded forward, a commuting op, or an
        affine step."""
        return ((node.kind == NORM and node.unit in self.folded_forward) or commuting.may_commute(node)
                or isinstance(self.step(node), tuple))

    def passes_backward(self, node: Node) -> bool:
        """Whether a trace towards the consumers looks through ``node``: a norm folded backward, a commuting op, or an
        affine step."""
        return ((node.kind == NORM and node.unit in self.folded_backward) or commuting.may_commute(node)
                or isinstance(self.step(node), tuple))

    def trace_back(self, reader: Node, source: Node, steps: bool = True) -> tuple[Node, list[Node]] | Reason:
        """The node that produced the tensor ``source`` hands to ``reader``, looking through transparent nodes (and
        affine steps unless ``steps`` is False: a concatenation's inputs are never folded through them).

        Returns that producer and the nodes between (producer side first). Every node on the way must have the next
        one as its only user.
        """
        between: list[Node] = []
        current = reader
        while self.passes_forward(source) and (steps or not isinstance(self.step(source), tuple)):
            if source.users != [current.index]:
                return Reason(
                    f"the output of {source.label}, between it and its layer, is also used by "
                    f"{self._other_user(source, current)}"
                )
            between.append(source)
            if not source.inputs:
                return Reason("its input is not produced by a layer (it is a constant)")
            current, source = source, self.data_input(source)
        between.reverse()
        return source, between

    def trace_on(self, norm_node: Node) -> list[tuple[Node, list[Node]]] | Reason:
        """Every layer call the norm's output reaches, each with the nodes between (norm side first)."""
        leaves: list[tuple[Node, list[Node]]] = []
        pending: list[tuple[Node, list[Node]]] = [(norm_node, [])]
        while pending:
            node, between = pending.pop()
            if not node.users:
                return Reason(f"the output of {node.label} is not used")
            for index in node.users:
                user = self.nodes[index]
                if user.kind == LAYER:
                    leaves.append((user, between))
                elif self.passes_backward(user):
                    pending.append((user, [*between, user]))
                else:
                    what = "it" if node is norm_node else node.label
                    return Reason(f"the output of {what} goes to {user.label}, not only to conv or linear layers")
        return leaves

    def follow_axis(
        self,
        axis: int,
        shape: tuple[int, ...] | None,
        between: list[Node] | tuple[Node, ...],
        channels: int,
        rank: int | None = None,
    ) -> _Followed | Reason:
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
                    return Reason(step)
                problem = commuting.constant_problem(step[1], rank, axis, channels, layout)
                if problem:
                    return Reason(problem)
                steps.append(step[1])
                shape = node.shape if node.shape is not None else shape
                continue
            passage = commuting.passage(node, shape, axis, layout, rank)
            if isinstance(passage, str):
                return Reason(passage)
            assert node.op is not None
            if node.shape is not None:
                rank = len(node.shape)
            elif node.op.kind not in _RANK_KEEPING:
                rank = None
            axis, shape, layout = passage.axis, node.shape, (passage.outer, passage.inner)
            needs_non_negative = needs_non_negative or passage.needs_non_negative_scale
        return _Followed(axis, shape, needs_non_negative, tuple(steps), layout)

    @staticmethod
    def _rank_hint(facts: LayerFacts) -> int | None:
        """The rank the layer's facts give, or a convolution's kernel rank plus two axes."""
        if facts.rank is not None:
            return facts.rank
        geometry = facts.geometry
        if geometry is None or not geometry.kernel or facts.channel_dim < 0:
            return None
        return len(geometry.kernel) + 2

    def axis_mismatch(
        self, layer_label: str, norm: str, layer_axis: int, norm_axis: int, shape: tuple[int, ...] | None, what: str
    ) -> Reason | None:
        """Why channel axis ``layer_axis`` of the layer does not meet the norm's ``norm_axis``; ``None`` if it does.

        Without shapes a fully connected layer next to a norm of channel axis 1 is assumed to see 2-D activations,
        and the report says so.
        """
        if shape is not None:
            if layer_axis % len(shape) == norm_axis % len(shape):
                return None
            return Reason(
                f"{layer_label} has its channels on axis {layer_axis % len(shape)} of a {len(shape)}-D {what} but the "
                f"norm normalises axis {norm_axis % len(shape)}"
            )
        if layer_axis != norm_axis:
            self.notes.append(
                f"'{norm}' folded into {layer_label} assuming 2-D activations (batch, channels); pass "
                f"example_inputs to have that checked"
            )
        return None

    def sign_problem(self, norm: Unit) -> Reason | None:
        assert norm.norm is not None
        negative = norm.norm.negative_scales
        if negative:
            return Reason(
                f"a max pooling lies on the way, which commutes with the norm only when every scale is >= 0, and "
                f"{negative} of its channels have a negative weight"
            )
        return None

    def only_called_at(self, layer: Unit, sites: set[int]) -> bool:
        return set(layer.calls) == sites

    # ------------------------------------------------------------------------------------------ forward fold

    def forward_fold(self, norm: Unit) -> tuple[str, ...] | tuple[tuple[str, ...], tuple[Route, ...]] | Reason:
        """The layer(s) ``norm`` folds into (with their routes where any is not plain), or the reason it cannot."""
        assert norm.norm is not None
        layer: Unit | None = None
        layer_sites: set[int] = set()
        paths: list[_Path] = []
        for index in norm.calls:
            call = self.nodes[index]
            if not call.inputs:
                return Reason("its input is not produced by a layer (it is a constant)")
            found = self.trace_back(call, self.nodes[call.inputs[0]])
            if isinstance(found, Reason):
                return found
            source, between = found
            consumer = between[0] if between else call
            if source.kind == "op" and source.op is not None and source.op.kind == "concat" and len(norm.calls) == 1:
                return self.concat_fold(norm, consumer, source, between)
            if source.kind != LAYER:
                step = self.step(source)
                why = f" ({step})" if isinstance(step, str) and "combines" not in step else ""
                return Reason(f"its input comes from {source.label}, not from a conv or linear layer{why}")
            source_unit = self.units[source.unit or ""]
            facts = source_unit.layer
            assert facts is not None
            if facts.not_a_rule:
                return Reason(f"the layer before it, '{source_unit.name}': {facts.not_a_rule}")
            if layer is not None and source_unit is not layer:
                return Reason(
                    f"it is called at several sites with different layers before it ('{layer.name}' and "
                    f"'{source_unit.name}')"
                )
            if source.users != [consumer.index]:
                return Reason(
                    f"the output of '{source_unit.name}' is also used by {self._other_user(source, consumer)}, which "
                    f"must keep seeing the unnormalised values"
                )
            layer = source_unit
            layer_sites.add(source.index)
            paths.append(_Path(source, call, tuple(between)))
        assert layer is not None and layer.layer is not None
        if not self.only_called_at(layer, layer_sites):
            return Reason(
                f"'{layer.name}' is also called at another site whose output this norm does not normalise; folding "
                f"would change that call too"
            )
        if layer.layer.problem:
            return Reason(layer.layer.problem)
        if layer.layer.out_channels != norm.norm.channels:
            return Reason(f"'{layer.name}' has {layer.layer.out_channels} output channels but the norm has {norm.norm.channels}")
        routes: set[Route] = set()
        for path in paths:
            followed = self.follow_axis(layer.layer.channel_dim, path.layer.shape, path.between,
                                        layer.layer.out_channels, self._rank_hint(layer.layer))
            if isinstance(followed, Reason):
                return Reason(f"between '{layer.name}' and the norm, {followed}")
            if followed.layout != (1, 1):
                return Reason(f"between '{layer.name}' and the norm, a reshape spreads each of its channels over "
                              f"several of the norm's channels")
            mismatch = self.axis_mismatch(f"'{layer.name}'", norm.name, followed.axis, norm.norm.channel_dim,
                                          followed.shape, "output")
            if mismatch:
                return mismatch
            if followed.needs_non_negative and (problem := self.sign_problem(norm)):
                return problem
            routes.add(Route(tuple(reversed(followed.steps))))
        if len(routes) > 1:
            return Reason(f"it is called at several sites with different constant operations between it and "
                          f"'{layer.name}'")
        route = routes.pop()
        return (layer.name,) if route.plain else ((layer.name,), (route,))

    def concat_fold(self, norm: Unit, consumer: Node, cat: Node, between: list[Node]) -> tuple[str, ...] | Reason:
        """The layers whose outputs are concatenated along channels into the norm's input, in channel order.

        ``norm(cat([a(x), b(y)]))`` is ``cat([norm_a(a(x)), norm_b(b(y))])`` with the norm's channels split at the
        concatenation's boundaries, so each layer absorbs its share.
        """
        assert norm.norm is not None and cat.op is not None
        if cat.users != [consumer.index]:
            return Reason(f"its input, {cat.label}, is also used by {self._other_user(cat, consumer)}")
        dim = cat.op.attributes.get("axis")
        if not isinstance(dim, int):
            return Reason(f"its input comes from {cat.label} along an axis bnfold cannot read")
        followed = self.follow_axis(dim, cat.shape, between, norm.norm.channels)
        if isinstance(followed, Reason):
            return Reason(f"between {cat.label} and the norm, {followed}")
        if followed.steps or followed.layout != (1, 1):
            return Reason(f"between {cat.label} and the norm, {self._not_plain(followed)}")
        axis, shape, needs_non_negative = followed.axis, followed.shape, followed.needs_non_negative
        mismatch = self.axis_mismatch(cat.label, norm.name, axis, norm.norm.channel_dim, shape, "output")
        if mismatch:
            return Reason(f"its input concatenates along another axis than its channels ({mismatch})")
        layers: list[Unit] = []
        for index in cat.inputs:
            found = self.trace_back(cat, self.nodes[index], steps=False)
            if isinstance(found, Reason):
                return found
            source, path = found
            if source.users != [(path[0] if path else cat).index]:
                return Reason(f"the output of {source.label} is also used by {self._other_user(source, path[0] if path else cat)}")
            unit = self.units.get(source.unit or "") if source.kind == LAYER else None
            if unit is None or unit.layer is None or unit.layer.not_a_rule:
                why = f": {unit.layer.not_a_rule}" if unit is not None and unit.layer is not None else ""
                return Reason(f"its input concatenates the output of {source.label}{why}, which is not a conv or linear layer")
            if not self.only_called_at(unit, {source.index}) or unit in layers:
                return Reason(f"'{unit.name}' before it is also called at another site; folding would change that call too")
            if unit.layer.problem:
                return Reason(unit.layer.problem)
            followed = self.follow_axis(unit.layer.channel_dim, source.shape, path, unit.layer.out_channels,
                                        self._rank_hint(unit.layer))
            if isinstance(followed, Reason):
                return Reason(f"between '{unit.name}' and the concatenation, {followed}")
            if followed.steps or followed.layout != (1, 1):
                return Reason(f"between '{unit.name}' and the concatenation, {self._not_plain(followed)}")
            layer_axis, layer_shape, needs = followed.axis, followed.shape, followed.needs_non_negative
            needs_non_negative = needs_non_negative or needs
            mismatch = self.axis_mismatch(f"'{unit.name}'", norm.name, layer_axis, dim, layer_shape, "output")
            if mismatch:
                return mismatch
            layers.append(unit)
        channels = sum(self._facts(u).out_channels for u in layers)
        if channels != norm.norm.channels:
            return Reason(f"the layers concatenated before it have {channels} output channels but the norm has {norm.norm.channels}")
        if needs_non_negative and (problem := self.sign_problem(norm)):
            return problem
        return tuple(u.name for u in layers)

    @staticmethod
    def _not_plain(followed: _Followed) -> str:
        if followed.steps:
            return (f"{followed.steps[0].label} changes the values, which bnfold folds through only between one layer "
                    f"and its norm, not across a concatenation")
        return "a reshape spreads channels over features"

    @staticmethod
    def _facts(unit: Unit) -> LayerFacts:
        assert unit.layer is not None
        return unit.layer

    # ----------------------------------------------------------------------------------------- backward fold

    def backward_fold(self, norm: Unit) -> tuple[str, ...] | tuple[tuple[str, ...], tuple[Route, ...]] | Reason:
        """The layers after ``norm`` that absorb it (every one its output reaches), or why they cannot."""
        assert norm.norm is not None
        if norm.norm.backward_blocker:
            return Reason(norm.norm.backward_blocker)
        consumers: dict[str, set[int]] = {}
        paths: list[_Path] = []
        for index in norm.calls:
            call = self.nodes[index]
            found = self.trace_on(call)
            if isinstance(found, Reason):
                return found
            for layer_node, between in found:
                reader = between[-1] if between else call
                if layer_node.inputs != [reader.index]:
                    return Reason(f"'{layer_node.unit}' after it also reads other tensors")
                consumers.setdefault(layer_node.unit or "", set()).add(layer_node.index)
                paths.append(_Path(layer_node, call, tuple(between)))
        for name, sites in consumers.items():
            layer = self.units[name]
            facts = self._facts(layer)
            if facts.not_a_rule:
                return Reason(f"the layer after it, '{name}': {facts.not_a_rule}")
            blocker = input_fold_blocker(facts)
            if blocker:
                return Reason(f"the layer after it, '{name}', cannot absorb it exactly: {blocker}")
            if not self.only_called_at(layer, sites):
                return Reason(
                    f"'{name}' after it is also called at another site whose input this norm does not "
                    f"normalise; folding would change that call too"
                )
            if facts.problem:
                return Reason(facts.problem)
        routes: dict[str, Route] = {}
        for path in paths:
            name = path.layer.unit or ""
            facts = self._facts(self.units[name])
            followed = self.follow_axis(norm.norm.channel_dim, path.norm.shape, path.between, norm.norm.channels)
            if isinstance(followed, Reason):
                if facts.in_channels != norm.norm.channels:  # the plainer reason, as before
                    return Reason(f"'{name}' after it has {facts.in_channels} input channels but the norm has "
                                  f"{norm.norm.channels} ({followed})")
                return Reason(f"between the norm and '{name}', {followed}")
            outer, inner = followed.layout
            features = outer * norm.norm.channels * inner
            if facts.in_channels != features:
                spread = (f" (a reshape spreads them over {features} features)" if features != norm.norm.channels
                          else "")
                return Reason(f"'{name}' after it has {facts.in_channels} input channels but the norm has "
                              f"{norm.norm.channels}{spread}")
            mismatch = self.axis_mismatch(f"'{name}'", norm.name, facts.channel_dim, followed.axis, followed.shape,
                                          "input")
            if mismatch:
                return mismatch
            if followed.needs_non_negative and (problem := self.sign_problem(norm)):
                return problem
            route = Route(followed.steps, outer, inner)
            if routes.setdefault(name, route) != route:
                return Reason(f"it reaches '{name}' along ways with different constant operations or layouts")
        layers = tuple(consumers)
        if all(route.plain for route in routes.values()):
            return layers
        return layers, tuple(routes.get(name, PLAIN) for name in layers)

    # ------------------------------------------------------------------------------------------------ driver

    def run(self) -> FoldPlan:
        folds: list[Fold] = []
        refused: dict[str, str] = {}
        candidates: list[Unit] = []
        order = self.graph.norms()
        for norm in order:
            assert norm.norm is not None
            if problem := norm_problem(norm.norm):
                refused[norm.name] = problem
                continue
            if not norm.calls:
                refused[norm.name] = f"it is never called in the forward pass ({self.graph.method} capture)"
                continue
            outcome = self.forward_fold(norm)
            if isinstance(outcome, tuple):
                self.folded_forward.add(norm.name)
                folds.append(_fold(norm.name, outcome, FORWARD, self.notes))
            else:
                refused[norm.name] = outcome.text
                candidates.append(norm)
        for norm in reversed(candidates):
            backward = self.backward_fold(norm)
            if isinstance(backward, tuple):
                self.folded_backward.add(norm.name)
                folds.append(_fold(norm.name, backward, BACKWARD, self.notes))
                del refused[norm.name]
            else:
                refused[norm.name] = f"{refused[norm.name]}; nor can the layers after it absorb it: {backward}"
        refusals = [Refusal(norm.name, refused[norm.name]) for norm in order if norm.name in refused]
        return FoldPlan(folds, refusals, self.graph.method, list(dict.fromkeys(self.notes)))


def _fold(norm: str, outcome: tuple[str, ...] | tuple[tuple[str, ...], tuple[Route, ...]], direction: str,
          notes: list[str]) -> Fold:
    if outcome and isinstance(outcome[0], tuple):
        layers, routes = outcome
        fold = Fold(norm, layers, direction, routes)  # type: ignore[arg-type]
        for layer, route in zip(fold.layers, fold.routes, strict=True):
            if route.steps:
                ops = ", ".join(step.label for step in route.steps)
                stay = "stays" if len(route.steps) == 1 else "stay"
                notes.append(f"'{norm}' folded into '{layer}' through {ops}, which {stay} in the model (their "
                             f"constants unchanged; the folded bias accounts for them)")
        return fold
    return Fold(norm, outcome, direction)  # type: ignore[arg-type]


def make_plan(graph: Graph) -> FoldPlan:
    """Decide, for every norm of ``graph``, whether and where it folds."""
    return _Planner(graph).run()
