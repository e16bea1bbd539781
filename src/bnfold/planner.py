"""Pairs and legality: which norm folds into which layer, and why any norm stays.

The planner reads a :class:`~bnfold.capture.Dataflow` and the module tree (types, attributes, hooks: never weight
values) and decides, for every batch-norm-like module, either a :class:`Fold` or a :class:`Skip` whose reason a
user can act on. A fold is planned only where it is exact for every call of both modules:

* **forward** (layer -> norm): every call of the norm reads the output of a call of one linear layer, nothing
  else reads that output, and every call of that layer feeds this norm (a layer called twice, once without the
  norm after it, would otherwise be changed at the other call too).
* **backward** (norm -> layers): every call of the norm feeds only linear layers that can absorb an affine map on
  their input exactly (Linear; convolutions that do not zero-pad), and those layers read nothing else there.

Norms whose forward fold was planned become transparent, so chains fold completely (Conv -> BN -> BN).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn
from torch.nn.utils import parametrize

from . import commuting
from .capture import Dataflow, Site
from .layers import LayerRegistry, LinearLayerRule, NormRule

FORWARD = "forward"
BACKWARD = "backward"
CONCATENATIONS = frozenset({"cat", "concat", "concatenate"})


@dataclass(frozen=True)
class Fold:
    """Fold norm ``norm`` into ``layers``.

    Forward: the layer before it, or the layers whose outputs were concatenated along channels into its input (each
    takes its share of the channels, in order). Backward: every layer after it (each absorbs all its channels).
    """

    norm: str
    layers: tuple[str, ...]
    direction: str


@dataclass(frozen=True)
class Skip:
    """Leave norm ``norm`` in place, because of ``reason``."""

    norm: str
    reason: str


@dataclass
class FoldPlan:
    """What folding will do, in the order it must be done (a chain's first norm first)."""

    folds: list[Fold]
    skips: list[Skip]
    method: str
    notes: list[str] = field(default_factory=list)

    def decisions(self) -> Iterator[Fold | Skip]:
        yield from self.folds
        yield from self.skips


def _describe(site: Site) -> str:
    if site.kind == "module":
        return f"module '{site.name}' ({type(site.target).__name__})"
    if site.kind == "input":
        return "a model input"
    if site.kind == "param":
        return f"the tensor '{site.name}'"
    if site.kind == "output":
        return "the model output"
    return f"the operation {site.name}"


class _Planner:
    def __init__(self, model: nn.Module, flow: Dataflow, registry: LayerRegistry) -> None:
        self.model = model
        self.flow = flow
        self.sites = flow.sites
        self.registry = registry
        self.calls = flow.module_sites()
        self.param_reads = flow.param_reads()
        self.folded_forward: dict[str, tuple[str, ...]] = {}  # norm name -> layer(s) it folded into
        self.folded_backward: dict[str, tuple[str, ...]] = {}  # norm name -> layers after it that absorb it
        self.notes: list[str] = list(flow.notes)
        self.names_of: dict[int, list[str]] = {}
        for name, module in model.named_modules(remove_duplicate=False):
            self.names_of.setdefault(id(module), []).append(name)
        self.param_owners: dict[int, list[str]] = {}
        for name, tensor in model.named_parameters(remove_duplicate=False):
            self.param_owners.setdefault(id(tensor), []).append(name)

    # ------------------------------------------------------------------------------------------------ checks

    def module_problem(self, name: str, module: nn.Module, what: str) -> str | None:
        """Why ``module`` must not be touched at all, whatever it is paired with."""
        if parametrize.is_parametrized(module):
            return (
                f"{what} '{name}' has parametrizations (torch.nn.utils.parametrize, weight_norm or spectral_norm): "
                f"its weight is recomputed at every call"
            )
        hooks = [
            kind
            for kind, table in (("forward pre-hooks", module._forward_pre_hooks), ("forward hooks", module._forward_hooks))
            if table
        ]
        if hooks:
            return f"{what} '{name}' has {' and '.join(hooks)} (weight_norm, spectral_norm or your own), which may change what it computes"
        aliases = self.names_of.get(id(module), [name])
        for own_name, tensor in module.named_parameters(recurse=False):
            own_names = {f"{alias}.{own_name}" if alias else own_name for alias in aliases}
            others = [owner for owner in self.param_owners.get(id(tensor), []) if owner not in own_names]
            if others:
                return f"the {what} '{name}' shares its parameter '{own_name}' with '{others[0]}'"
        own_tensors = {
            f"{alias}.{tensor_name}" if alias else tensor_name
            for alias in aliases
            for tensor_name, _ in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False))
        }
        for tensor_name in own_tensors & self.param_reads.keys():
            read = self.param_reads[tensor_name][0]
            user = self.sites[read.users[0]] if read.users else read
            return f"its tensor '{tensor_name}' is also read directly by {_describe(user)} in the forward code"
        return None

    def norm_problem(self, name: str, module: nn.Module, rule: NormRule | None, reason: str | None) -> str | None:
        if rule is None:
            return reason
        unfoldable = rule.unfoldable(module)
        if unfoldable:
            return unfoldable
        if name not in self.calls:
            return f"it is never called in the forward pass ({self.flow.method} capture)"
        return self.module_problem(name, module, "norm")

    # ------------------------------------------------------------------------------------- paths and axes

    def passes_forward(self, site: Site) -> bool:
        """Whether a forward trace looks through ``site``: a norm already folded forward, or a commuting op."""
        return (site.kind == "module" and site.name in self.folded_forward) or commuting.may_commute(site)

    def passes_backward(self, site: Site) -> bool:
        """Whether a backward trace looks through ``site``: a norm already folded backward, or a commuting op."""
        return (site.kind == "module" and site.name in self.folded_backward) or commuting.may_commute(site)

    def trace_back_from(self, source: Site, reader: Site) -> tuple[Site, list[Site]] | str:
        """Like :meth:`trace_back`, for the tensor ``source`` produced and ``reader`` reads."""
        between: list[Site] = []
        current = reader
        while self.passes_forward(source):
            if source.users != [current.index]:
                others = [self.sites[u] for u in source.users if u != current.index]
                other = _describe(others[0]) if others else "another call"
                return f"the output of {_describe(source)}, between it and its layer, is also used by {other}"
            between.append(source)
            if not source.inputs:
                return "its input is not produced by a layer (it is a constant)"
            current, source = source, self.sites[source.inputs[0]]
        if source.users != [current.index]:
            others = [self.sites[u] for u in source.users if u != current.index]
            return f"the output of {_describe(source)} is also used by {_describe(others[0]) if others else 'another call'}"
        between.reverse()
        return source, between

    def trace_back(self, norm_site: Site) -> tuple[Site, list[Site]] | str:
        """The site that produced the norm's input, and the sites between (producer side first).

        Looks through norms folded forward (they became identities) and ops that commute with a per-channel affine;
        each of those must have the next site as its only user.
        """
        between: list[Site] = []
        current = norm_site
        while True:
            if not current.inputs:
                return "its input is not produced by a layer (it is a constant)"
            source = self.sites[current.inputs[0]]
            if not self.passes_forward(source):
                between.reverse()
                return source, between
            if source.users != [current.index]:
                others = [self.sites[u] for u in source.users if u != current.index]
                other = _describe(others[0]) if others else "another call"
                return f"the output of {_describe(source)}, between it and its layer, is also used by {other}"
            between.append(source)
            current = source

    def is_layer_like(self, module: nn.Module) -> bool:
        """A linear layer, or a subclass of one that the registry declined (the consumer check gives the reason)."""
        match = self.registry.layer(module)
        return match.rule is not None or match.reason is not None

    def trace_on(self, norm_site: Site) -> list[tuple[Site, list[Site]]] | str:
        """Every layer call the norm's output reaches, each with the sites between (norm side first).

        Looks through norms folded backward and ops that commute with a per-channel affine; every other reader of
        the output on the way is a reason not to fold.
        """
        leaves: list[tuple[Site, list[Site]]] = []
        pending: list[tuple[Site, list[Site]]] = [(norm_site, [])]
        while pending:
            site, between = pending.pop()
            if not site.users:
                return f"the output of {_describe(site)} is not used"
            for index in site.users:
                user = self.sites[index]
                if user.kind == "module" and self.is_layer_like(user.target):
                    leaves.append((user, between))
                elif self.passes_backward(user):
                    pending.append((user, [*between, user]))
                else:
                    what = "it" if site is norm_site else _describe(site)
                    return f"the output of {what} goes to {_describe(user)}, not only to conv or linear layers"
        return leaves

    def follow_axis(
        self, axis: int, shape: tuple[int, ...] | None, between: list[Site]
    ) -> tuple[int, tuple[int, ...] | None, bool] | str:
        """Follow channel ``axis`` of a tensor of ``shape`` through ``between``: the axis and shape at the end, and
        whether an op on the way needs every scale to be non-negative; or why the map does not pass."""
        needs_non_negative = False
        if shape is not None:
            axis %= len(shape)
        for site in between:
            if site.kind == "module" and (site.name in self.folded_forward or site.name in self.folded_backward):
                continue
            passage = commuting.passage(site, shape, axis)
            if isinstance(passage, str):
                return passage
            axis, shape = passage.axis, site.shape
            needs_non_negative = needs_non_negative or passage.needs_non_negative_scale
        return axis, shape, needs_non_negative

    def axis_mismatch(
        self, layer_name: str, norm_name: str, layer_axis: int, norm_axis: int, shape: tuple[int, ...] | None, what: str
    ) -> str | None:
        """Why channel axis ``layer_axis`` of the layer does not meet the norm's ``norm_axis``; ``None`` if it does.

        Without shapes (no example inputs) a Linear next to a BatchNorm1d is assumed to see 2-D activations, and the
        report says so.
        """
        if shape is not None:
            if layer_axis % len(shape) == norm_axis % len(shape):
                return None
            return (
                f"'{layer_name}' has its channels on axis {layer_axis % len(shape)} of a {len(shape)}-D {what} but the "
                f"norm normalises axis {norm_axis % len(shape)}"
            )
        if layer_axis != norm_axis:
            self.notes.append(
                f"'{norm_name}' folded into '{layer_name}' assuming 2-D activations (batch, channels); pass "
                f"example_inputs to have that checked"
            )
        return None

    def sign_problem(self, module: nn.Module, rule: NormRule) -> str | None:
        gamma = rule.statistics(module).gamma
        negative = 0 if gamma is None else int((gamma.detach() < 0).sum())
        if negative:
            return (
                f"a max pooling lies on the way, which commutes with the norm only when every scale is >= 0, and "
                f"{negative} of its channels have a negative weight"
            )
        return None

    # ------------------------------------------------------------------------------------------ forward fold

    def forward_fold(self, name: str, module: nn.Module, rule: NormRule) -> str | tuple[str, ...]:
        """The layer(s) norm ``name`` folds into, or the reason it cannot.

        One layer, or, when the norm's input is a concatenation along channels of layer outputs (MixNet's mixed
        convolutions, Inception-style branches), each of those layers, in the order of their channels.
        """
        layer_name: str | None = None
        layer_sites: set[int] = set()
        paths: list[tuple[Site, Site, list[Site]]] = []
        for site in self.calls[name]:
            found = self.trace_back(site)
            if isinstance(found, str):
                return found
            source, between = found
            consumer = between[0] if between else site
            if source.kind == "op" and commuting.op_name(source) in CONCATENATIONS and len(self.calls[name]) == 1:
                return self.concat_fold(name, module, rule, consumer, source, between)
            if source.kind != "module":
                return f"its input comes from {_describe(source)}, not from a conv or linear layer"
            match = self.registry.layer(source.target)
            if match.rule is None:
                if match.reason:
                    return f"the layer before it, '{source.name}': {match.reason}"
                return f"its input comes from {_describe(source)}, not from a conv or linear layer"
            if layer_name is not None and source.name != layer_name:
                return (
                    f"it is called at several sites with different layers before it ('{layer_name}' and "
                    f"'{source.name}')"
                )
            if source.users != [consumer.index]:
                others = [self.sites[u] for u in source.users if u != consumer.index]
                other = _describe(others[0]) if others else "another call"
                return f"the output of '{source.name}' is also used by {other}, which must keep seeing the unnormalised values"
            layer_name = source.name
            layer_sites.add(source.index)
            paths.append((source, site, between))
        assert layer_name is not None
        layer_calls = {s.index for s in self.calls[layer_name]}
        if layer_calls != layer_sites:
            return (
                f"'{layer_name}' is also called at another site whose output this norm does not normalise; folding "
                f"would change that call too"
            )
        layer = self.model.get_submodule(layer_name)
        layer_rule = self.registry.layer(layer).rule
        assert isinstance(layer_rule, LinearLayerRule)
        problem = self.layer_problem(layer_name, layer, layer_rule)
        if problem:
            return problem
        channels = layer_rule.out_channels(layer)
        norm_channels = int(rule.statistics(module).mean.shape[0])
        if channels != norm_channels:
            return f"'{layer_name}' has {channels} output channels but the norm has {norm_channels}"
        for source, _, between in paths:
            followed = self.follow_axis(layer_rule.activation_channel_dim, source.shape, between)
            if isinstance(followed, str):
                return f"between '{layer_name}' and the norm, {followed}"
            axis, shape, needs_non_negative = followed
            mismatch = self.axis_mismatch(layer_name, name, axis, rule.channel_dim, shape, "output")
            if mismatch:
                return mismatch
            if needs_non_negative and (problem := self.sign_problem(module, rule)):
                return problem
        return (layer_name,)

    def concat_fold(
        self, name: str, module: nn.Module, rule: NormRule, consumer: Site, cat: Site, between: list[Site]
    ) -> str | tuple[str, ...]:
        """The layers whose outputs are concatenated along channels into the norm's input, in channel order.

        ``norm(cat([a(x), b(y)]))`` is ``cat([norm_a(a(x)), norm_b(b(y))])`` with the norm's channels split at the
        concatenation's boundaries, so each layer absorbs its share.
        """
        if cat.users != [consumer.index]:
            others = [self.sites[u] for u in cat.users if u != consumer.index]
            return f"its input, {_describe(cat)}, is also used by {_describe(others[0]) if others else 'another call'}"
        dim = cat.kwargs.get("dim", cat.kwargs.get("axis", cat.args[1] if len(cat.args) > 1 else 0))
        if not isinstance(dim, int):
            return f"its input comes from {_describe(cat)} along an axis bnfold cannot read"
        followed = self.follow_axis(dim, cat.shape, between)
        if isinstance(followed, str):
            return f"between {_describe(cat)} and the norm, {followed}"
        axis, shape, needs_non_negative = followed
        mismatch = self.axis_mismatch(_describe(cat), name, axis, rule.channel_dim, shape, "output")
        if mismatch:
            return f"its input concatenates along another axis than its channels ({mismatch})"
        layers: list[str] = []
        for index in cat.inputs:
            found = self.trace_back_from(self.sites[index], cat)
            if isinstance(found, str):
                return found
            source, path = found
            match = self.registry.layer(source.target) if source.kind == "module" else None
            if match is None or not isinstance(match.rule, LinearLayerRule):
                why = f": {match.reason}" if match is not None and match.reason else ""
                return (
                    f"its input concatenates the output of {_describe(source)}{why}, which is not a conv or linear layer"
                )
            if {s.index for s in self.calls[source.name]} != {source.index} or source.name in layers:
                return f"'{source.name}' before it is also called at another site; folding would change that call too"
            layer = self.model.get_submodule(source.name)
            problem = self.layer_problem(source.name, layer, match.rule)
            if problem:
                return problem
            followed = self.follow_axis(match.rule.activation_channel_dim, source.shape, path)
            if isinstance(followed, str):
                return f"between '{source.name}' and the concatenation, {followed}"
            layer_axis, layer_shape, needs = followed
            needs_non_negative = needs_non_negative or needs
            mismatch = self.axis_mismatch(source.name, name, layer_axis, dim, layer_shape, "output")
            if mismatch:
                return mismatch
            layers.append(source.name)
        channels = [self.registry_rule(n).out_channels(self.model.get_submodule(n)) for n in layers]
        norm_channels = int(rule.statistics(module).mean.shape[0])
        if sum(channels) != norm_channels:
            return f"the layers concatenated before it have {sum(channels)} output channels but the norm has {norm_channels}"
        if needs_non_negative and (problem := self.sign_problem(module, rule)):
            return problem
        return tuple(layers)

    def registry_rule(self, layer_name: str) -> LinearLayerRule:
        rule = self.registry.layer(self.model.get_submodule(layer_name)).rule
        assert isinstance(rule, LinearLayerRule)
        return rule

    # ----------------------------------------------------------------------------------------- backward fold

    def backward_fold(self, name: str, module: nn.Module, rule: NormRule) -> str | tuple[str, ...]:
        """The layers after norm ``name`` that absorb it (every one its output reaches), or why they cannot."""
        blocker = rule.backward_blocker(module)
        if blocker:
            return blocker
        consumers: dict[str, set[int]] = {}
        paths: list[tuple[Site, Site, list[Site]]] = []
        for site in self.calls[name]:
            found = self.trace_on(site)
            if isinstance(found, str):
                return found
            for layer_site, between in found:
                reader = between[-1] if between else site
                if layer_site.inputs != [reader.index]:
                    return f"'{layer_site.name}' after it also reads other tensors"
                consumers.setdefault(layer_site.name, set()).add(layer_site.index)
                paths.append((site, layer_site, between))
        norm_channels = int(rule.statistics(module).mean.shape[0])
        for layer_name, sites in consumers.items():
            layer = self.model.get_submodule(layer_name)
            match = self.registry.layer(layer)
            if not isinstance(match.rule, LinearLayerRule):
                return f"the layer after it, '{layer_name}': {match.reason}"
            layer_rule = match.rule
            layer_blocker = layer_rule.input_fold_blocker(layer)
            if layer_blocker:
                return f"the layer after it, '{layer_name}', cannot absorb it exactly: {layer_blocker}"
            if {s.index for s in self.calls[layer_name]} != sites:
                return (
                    f"'{layer_name}' after it is also called at another site whose input this norm does not "
                    f"normalise; folding would change that call too"
                )
            problem = self.layer_problem(layer_name, layer, layer_rule)
            if problem:
                return problem
            channels = layer_rule.in_channels(layer)
            if channels != norm_channels:
                return f"'{layer_name}' after it has {channels} input channels but the norm has {norm_channels}"
        for norm_site, layer_site, between in paths:
            followed = self.follow_axis(rule.channel_dim, norm_site.shape, between)
            if isinstance(followed, str):
                return f"between the norm and '{layer_site.name}', {followed}"
            axis, shape, needs_non_negative = followed
            layer_rule = self.registry.layer(layer_site.target).rule
            assert isinstance(layer_rule, LinearLayerRule)
            mismatch = self.axis_mismatch(layer_site.name, name, layer_rule.activation_channel_dim, axis, shape, "input")
            if mismatch:
                return mismatch
            if needs_non_negative and (problem := self.sign_problem(module, rule)):
                return problem
        return tuple(consumers)

    def layer_problem(self, name: str, layer: nn.Module, rule: LinearLayerRule) -> str | None:
        weight = getattr(layer, rule.weight_name, None)
        if weight is None or not weight.is_floating_point():
            return f"the layer '{name}' has no floating-point weight to fold into"
        problem = self.module_problem(name, layer, "layer")
        if problem:
            return problem
        return None

    # ------------------------------------------------------------------------------------------------ driver

    def norms_in_call_order(self) -> list[tuple[str, nn.Module]]:
        first_call = {name: sites[0].index for name, sites in self.calls.items()}
        seen: set[int] = set()
        norms = []
        for name, module in self.model.named_modules():
            if id(module) in seen or not self.registry.is_norm_candidate(module):
                continue
            seen.add(id(module))
            norms.append((name, module))
        norms.sort(key=lambda item: first_call.get(item[0], len(self.sites)))
        return norms

    def run(self) -> FoldPlan:
        folds: list[Fold] = []
        skips: dict[str, str] = {}
        candidates: list[tuple[str, nn.Module, NormRule]] = []
        order = self.norms_in_call_order()
        for name, module in order:
            match = self.registry.norm(module)
            rule = match.rule
            problem = self.norm_problem(name, module, rule if isinstance(rule, NormRule) else None, match.reason)
            if problem:
                skips[name] = problem
                continue
            assert isinstance(rule, NormRule)
            outcome = self.forward_fold(name, module, rule)
            if isinstance(outcome, tuple):
                self.folded_forward[name] = outcome
                folds.append(Fold(name, outcome, FORWARD))
            else:
                skips[name] = outcome
                candidates.append((name, module, rule))
        # Backward folds last, from the end of the network: in a chain BN1 -> BN2 -> Linear, BN2 folds first and
        # BN1 then folds through it, into the Linear that already holds BN2.
        for name, module, rule in reversed(candidates):
            backward = self.backward_fold(name, module, rule)
            if isinstance(backward, tuple):
                self.folded_backward[name] = backward
                folds.append(Fold(name, backward, BACKWARD))
                del skips[name]
            else:
                skips[name] = f"{skips[name]}; nor can the layers after it absorb it: {backward}"
        ordered_skips = [Skip(name, skips[name]) for name, _ in order if name in skips]
        return FoldPlan(folds, ordered_skips, self.flow.method, self.notes)


def make_plan(model: nn.Module, flow: Dataflow, registry: LayerRegistry) -> FoldPlan:
    """Decide, for every batch-norm-like module of ``model``, whether and where it folds."""
    return _Planner(model, flow, registry).run()
