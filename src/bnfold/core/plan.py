"""The planner: which norm folds into which layer, and why any norm stays. One planner for every format.

It reads a :class:`~bnfold.core.graph.Graph` (facts, never weight values) and gives every norm a :class:`Fold` or a
:class:`Refusal`. A fold is planned only where it is exact for every call of both units: **forward** when the norm
reads one layer's output (or a concatenation of layers' outputs, each taking its channels) that nothing else reads,
and every call of that layer feeds this norm; **backward** when the norm feeds only layers that can absorb an affine
map on their input exactly and read nothing else. Both look through ops that commute with a per-channel affine map
(:mod:`bnfold.core.commuting`) and through the model's own affine ops, which stay (the fold's :class:`Route`).
Forward folds make their norms transparent (Conv -> BN -> BN folds completely); backward folds are planned last,
from the end of the network (BN -> BN -> Linear too).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .commuting import AffineStep
from .graph import LAYER, Graph, LayerFacts, Node, Unit, input_fold_blocker, norm_problem
from .paths import Followed, Paths

FORWARD = "forward"
BACKWARD = "backward"


@dataclass(frozen=True)
class Route:
    """What lies between a norm and one layer it folds into, besides ops that pass its map unchanged.

    ``steps``: the model's own per-channel affine ops on the way, from the norm outward (they stay in the model).
    ``outer`` / ``inner`` (backward folds): the layer's input feature ``f`` belongs to the norm's channel
    ``(f // inner) % C``, so it absorbs ``s`` and ``t`` expanded to ``outer * C * inner`` features.
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
    """Fold norm ``norm`` into ``layers`` (unit names): forward, the layer before it or the layers concatenated into
    its input (each takes its share of the channels, in order); backward, every layer after it. ``routes``: one
    :class:`Route` per layer where any is not plain, else empty."""

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


# ------------------------------------------------------------------------------------ checks every fold makes


def _facts(unit: Unit) -> LayerFacts:
    assert unit.layer is not None
    return unit.layer


def _rank_hint(facts: LayerFacts) -> int | None:
    """The rank the layer's facts give, or a convolution's kernel rank plus two axes."""
    if facts.rank is not None:
        return facts.rank
    geometry = facts.geometry
    if geometry is None or not geometry.kernel or facts.channel_dim < 0:
        return None
    return len(geometry.kernel) + 2


def _axis_mismatch(layer_label: str, norm: str, layer_axis: int, norm_axis: int, shape: tuple[int, ...] | None,
                   what: str, notes: list[str]) -> Reason | None:
    """Why channel axis ``layer_axis`` of the layer does not meet the norm's ``norm_axis``; ``None`` if it does.
    Without shapes, a fully connected layer next to a norm of axis 1 is assumed to see 2-D activations (a note)."""
    if shape is not None:
        if layer_axis % len(shape) == norm_axis % len(shape):
            return None
        return Reason(
            f"{layer_label} has its channels on axis {layer_axis % len(shape)} of a {len(shape)}-D {what} but the "
            f"norm normalises axis {norm_axis % len(shape)}"
        )
    if layer_axis != norm_axis:
        notes.append(
            f"'{norm}' folded into {layer_label} assuming 2-D activations (batch, channels); pass "
            f"example_inputs to have that checked"
        )
    return None


def _unchangeable(layer: Unit, sites: set[int], elsewhere: str) -> Reason | None:
    """Why the fold must not change ``layer``, which the norm's paths reach at the calls ``sites``: a call
    ``elsewhere`` (its other calls would change too), or its own problem."""
    if set(layer.calls) != sites:
        return Reason(f"'{layer.name}' {elsewhere} this norm does not normalise; folding would change that call too")
    problem = _facts(layer).problem
    return Reason(problem) if problem else None


def _sign_problem(norm: Unit) -> Reason | None:
    assert norm.norm is not None
    negative = norm.norm.negative_scales
    if negative:
        return Reason(
            f"a max pooling lies on the way, which commutes with the norm only when every scale is >= 0, and "
            f"{negative} of its channels have a negative weight"
        )
    return None


def _plain(followed: Followed | str, where: str) -> Followed | Reason:
    """``followed`` where the way between a concatenation and its layers or norm is plain, else why it is not."""
    if isinstance(followed, str):
        return Reason(f"{where}, {followed}")
    if followed.steps:
        return Reason(f"{where}, {followed.steps[0].label} changes the values, which bnfold folds through only "
                      f"between one layer and its norm, not across a concatenation")
    if followed.layout != (1, 1):
        return Reason(f"{where}, a reshape spreads channels over features")
    return followed


# ------------------------------------------------------------------------------------------------ forward fold


def _forward_fold(paths: Paths, norm: Unit, notes: list[str]) -> Fold | Reason:
    """The fold of ``norm`` into the layer(s) before it, or the reason it cannot be made."""
    assert norm.norm is not None
    layer: Unit | None = None
    pairs: list[tuple[Node, list[Node]]] = []  # each layer call and the nodes between it and the norm
    for index in norm.calls:
        call = paths.nodes[index]
        if not call.inputs:
            return Reason("its input is not produced by a layer (it is a constant)")
        found = paths.producer(call, paths.nodes[call.inputs[0]])
        if isinstance(found, str):
            return Reason(found)
        source, between = found
        consumer = between[0] if between else call
        if source.kind == "op" and source.op is not None and source.op.kind == "concat" and len(norm.calls) == 1:
            return _concat_fold(paths, norm, consumer, source, between, notes)
        if source.kind != LAYER:
            step = paths.step(source)
            why = f" ({step})" if isinstance(step, str) and "combines" not in step else ""
            return Reason(f"its input comes from {source.label}, not from a conv or linear layer{why}")
        source_unit = paths.units[source.unit or ""]
        if not_a_rule := _facts(source_unit).not_a_rule:
            return Reason(f"the layer before it, '{source_unit.name}': {not_a_rule}")
        if layer is not None and source_unit is not layer:
            return Reason(
                f"it is called at several sites with different layers before it ('{layer.name}' and "
                f"'{source_unit.name}')"
            )
        if source.users != [consumer.index]:
            return Reason(
                f"the output of '{source_unit.name}' is also used by {paths.other_user(source, consumer)}, which "
                f"must keep seeing the unnormalised values"
            )
        layer = source_unit
        pairs.append((source, between))
    assert layer is not None
    facts = _facts(layer)
    if unchangeable := _unchangeable(layer, {source.index for source, _ in pairs}, "is also called at another site whose output"):
        return unchangeable
    if facts.out_channels != norm.norm.channels:
        return Reason(f"'{layer.name}' has {facts.out_channels} output channels but the norm has {norm.norm.channels}")
    routes: set[Route] = set()
    for source, between in pairs:
        followed = paths.follow_axis(facts.channel_dim, source.shape, between, facts.out_channels, _rank_hint(facts))
        if isinstance(followed, str):
            return Reason(f"between '{layer.name}' and the norm, {followed}")
        if followed.layout != (1, 1):
            return Reason(f"between '{layer.name}' and the norm, a reshape spreads each of its channels over "
                          f"several of the norm's channels")
        mismatch = _axis_mismatch(f"'{layer.name}'", norm.name, followed.axis, norm.norm.channel_dim,
                                  followed.shape, "output", notes)
        if mismatch:
            return mismatch
        if followed.needs_non_negative and (problem := _sign_problem(norm)):
            return problem
        routes.add(Route(tuple(reversed(followed.steps))))
    if len(routes) > 1:
        return Reason(f"it is called at several sites with different constant operations between it and "
                      f"'{layer.name}'")
    route = routes.pop()
    return Fold(norm.name, (layer.name,), FORWARD, () if route.plain else (route,))


def _concat_fold(paths: Paths, norm: Unit, consumer: Node, cat: Node, between: list[Node], notes: list[str]
                 ) -> Fold | Reason:
    """The fold of ``norm`` into the layers concatenated along channels into its input, in channel order:
    ``norm(cat([a(x), b(y)]))`` is ``cat([norm_a(a(x)), norm_b(b(y))])``, each layer absorbing its share."""
    assert norm.norm is not None and cat.op is not None
    if cat.users != [consumer.index]:
        return Reason(f"its input, {cat.label}, is also used by {paths.other_user(cat, consumer)}")
    dim = cat.op.attributes.get("axis")
    if not isinstance(dim, int):
        return Reason(f"its input comes from {cat.label} along an axis bnfold cannot read")
    followed = _plain(paths.follow_axis(dim, cat.shape, between, norm.norm.channels),
                      f"between {cat.label} and the norm")
    if isinstance(followed, Reason):
        return followed
    needs_non_negative = followed.needs_non_negative
    mismatch = _axis_mismatch(cat.label, norm.name, followed.axis, norm.norm.channel_dim, followed.shape, "output",
                              notes)
    if mismatch:
        return Reason(f"its input concatenates along another axis than its channels ({mismatch})")
    layers: list[Unit] = []
    channels = 0
    for index in cat.inputs:
        found = paths.producer(cat, paths.nodes[index], steps=False)
        if isinstance(found, str):
            return Reason(found)
        source, path = found
        reader = path[0] if path else cat
        if source.users != [reader.index]:
            return Reason(f"the output of {source.label} is also used by {paths.other_user(source, reader)}")
        unit = paths.units.get(source.unit or "") if source.kind == LAYER else None
        if unit is None or unit.layer is None or unit.layer.not_a_rule:
            why = f": {unit.layer.not_a_rule}" if unit is not None and unit.layer is not None else ""
            return Reason(f"its input concatenates the output of {source.label}{why}, which is not a conv or linear layer")
        if set(unit.calls) != {source.index} or unit in layers:
            return Reason(f"'{unit.name}' before it is also called at another site; folding would change that call too")
        facts = unit.layer
        if facts.problem:
            return Reason(facts.problem)
        followed = _plain(paths.follow_axis(facts.channel_dim, source.shape, path, facts.out_channels,
                                            _rank_hint(facts)), f"between '{unit.name}' and the concatenation")
        if isinstance(followed, Reason):
            return followed
        needs_non_negative = needs_non_negative or followed.needs_non_negative
        mismatch = _axis_mismatch(f"'{unit.name}'", norm.name, followed.axis, dim, followed.shape, "output", notes)
        if mismatch:
            return mismatch
        layers.append(unit)
        channels += facts.out_channels
    if channels != norm.norm.channels:
        return Reason(f"the layers concatenated before it have {channels} output channels but the norm has {norm.norm.channels}")
    if needs_non_negative and (problem := _sign_problem(norm)):
        return problem
    return Fold(norm.name, tuple(u.name for u in layers), FORWARD)


# ----------------------------------------------------------------------------------------------- backward fold


def _backward_fold(paths: Paths, norm: Unit, notes: list[str]) -> Fold | Reason:
    """The fold of ``norm`` into the layers after it (every one its output reaches), or why they cannot absorb it."""
    assert norm.norm is not None
    if norm.norm.backward_blocker:
        return Reason(norm.norm.backward_blocker)
    consumers: dict[str, set[int]] = {}
    pairs: list[tuple[Node, Node, list[Node]]] = []  # each layer call, the norm call and the nodes between
    for index in norm.calls:
        call = paths.nodes[index]
        found = paths.layers_reached(call)
        if isinstance(found, str):
            return Reason(found)
        for layer_node, between in found:
            reader = between[-1] if between else call
            if layer_node.inputs != [reader.index]:
                return Reason(f"'{layer_node.unit}' after it also reads other tensors")
            consumers.setdefault(layer_node.unit or "", set()).add(layer_node.index)
            pairs.append((layer_node, call, between))
    for name, sites in consumers.items():
        layer = paths.units[name]
        facts = _facts(layer)
        if facts.not_a_rule:
            return Reason(f"the layer after it, '{name}': {facts.not_a_rule}")
        blocker = input_fold_blocker(facts)
        if blocker:
            return Reason(f"the layer after it, '{name}', cannot absorb it exactly: {blocker}")
        if unchangeable := _unchangeable(layer, sites, "after it is also called at another site whose input"):
            return unchangeable
    routes: dict[str, Route] = {}
    for layer_node, call, between in pairs:
        name = layer_node.unit or ""
        facts = _facts(paths.units[name])
        followed = paths.follow_axis(norm.norm.channel_dim, call.shape, between, norm.norm.channels)
        if isinstance(followed, str):
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
        mismatch = _axis_mismatch(f"'{name}'", norm.name, facts.channel_dim, followed.axis, followed.shape, "input",
                                  notes)
        if mismatch:
            return mismatch
        if followed.needs_non_negative and (problem := _sign_problem(norm)):
            return problem
        route = Route(followed.steps, outer, inner)
        if routes.setdefault(name, route) != route:
            return Reason(f"it reaches '{name}' along ways with different constant operations or layouts")
    layers = tuple(consumers)  # each reached by a path, so each has its route
    plain = all(route.plain for route in routes.values())
    return Fold(norm.name, layers, BACKWARD, () if plain else tuple(routes[name] for name in layers))


# ------------------------------------------------------------------------------------------------------ driver


def make_plan(graph: Graph) -> FoldPlan:
    """Decide, for every norm of ``graph``, whether and where it folds: forward folds in the order of the norms'
    calls, then backward folds of the others from the end of the network (see the module docstring)."""
    paths = Paths(graph)
    notes = list(graph.notes)
    folds: list[Fold] = []
    refused: dict[str, str] = {}
    candidates: list[Unit] = []
    order = graph.norms()
    for norm in order:
        assert norm.norm is not None
        if problem := norm_problem(norm.norm):
            refused[norm.name] = problem
            continue
        if not norm.calls:
            refused[norm.name] = f"it is never called in the forward pass ({graph.method} capture)"
            continue
        assumed: list[str] = []  # an attempt's assumptions, noted only if it folds: a left norm assumed nothing
        outcome = _forward_fold(paths, norm, assumed)
        if isinstance(outcome, Fold):
            paths.folded_forward.add(norm.name)
            notes.extend(assumed)
            folds.append(_noted(outcome, notes))
        else:
            refused[norm.name] = outcome.text
            candidates.append(norm)
    for norm in reversed(candidates):
        assumed = []
        outcome = _backward_fold(paths, norm, assumed)
        if isinstance(outcome, Fold):
            paths.folded_backward.add(norm.name)
            notes.extend(assumed)
            folds.append(_noted(outcome, notes))
            del refused[norm.name]
        else:
            refused[norm.name] = f"{refused[norm.name]}; nor can the layers after it absorb it: {outcome}"
    refusals = [Refusal(norm.name, refused[norm.name]) for norm in order if norm.name in refused]
    return FoldPlan(folds, refusals, graph.method, list(dict.fromkeys(notes)))


def _noted(fold: Fold, notes: list[str]) -> Fold:
    """``fold``, with a note for each of its routes through the model's own affine ops."""
    for index, layer in enumerate(fold.layers):
        if (route := fold.route(index)).steps:
            ops = ", ".join(step.label for step in route.steps)
            stay = "stays" if len(route.steps) == 1 else "stay"
            notes.append(f"'{fold.norm}' folded into '{layer}' through {ops}, which {stay} in the model (their "
                         f"constants unchanged; the folded bias accounts for them)")
    return fold
