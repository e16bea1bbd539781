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

from .capture import Dataflow, Site
from .layers import LayerRegistry, LinearLayerRule, NormRule

FORWARD = "forward"
BACKWARD = "backward"


@dataclass(frozen=True)
class Fold:
    """Fold norm ``norm`` into ``layers`` (one for a forward fold; one or more consumers for a backward fold)."""

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
        self.folded_forward: dict[str, str] = {}  # norm name -> layer it folded into
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

    # ------------------------------------------------------------------------------------------ forward fold

    def producer(self, site: Site) -> tuple[Site, Site] | None:
        """The site that produced ``site``'s input and the site that reads it, looking through folded norms.

        A norm already folded forward becomes an identity, so the layer before it produces this norm's input too,
        provided nothing else read the folded norm's output.
        """
        if not site.inputs:
            return None
        source = self.sites[site.inputs[0]]
        while source.kind == "module" and source.name in self.folded_forward and source.users == [site.index]:
            if not source.inputs:
                return None
            site, source = source, self.sites[source.inputs[0]]
        return source, site

    def forward_fold(self, name: str, module: nn.Module, rule: NormRule) -> str | tuple[str, str]:
        """The layer ``name`` folds into, or the reason it cannot."""
        layer_name: str | None = None
        layer_sites: set[int] = set()
        for site in self.calls[name]:
            found = self.producer(site)
            if found is None:
                return "its input is not produced by a layer (it is a constant)"
            source, consumer = found
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
        if layer_rule.activation_channel_dim != rule.channel_dim:
            ranks = {len(s.shape) for s in self.calls[layer_name] if s.shape is not None}
            if not ranks:
                self.notes.append(
                    f"'{name}' folded into '{layer_name}' assuming 2-D activations (batch, channels); pass "
                    f"example_inputs to have that checked"
                )
            elif ranks != {2}:
                return (
                    f"'{layer_name}' puts channels on axis {layer_rule.activation_channel_dim} of a {max(ranks)}-D output "
                    f"but the norm normalises axis {rule.channel_dim}"
                )
        return (layer_name, FORWARD)

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
        skips: list[Skip] = []
        for name, module in self.norms_in_call_order():
            match = self.registry.norm(module)
            rule = match.rule
            problem = self.norm_problem(name, module, rule if isinstance(rule, NormRule) else None, match.reason)
            if problem:
                skips.append(Skip(name, problem))
                continue
            assert isinstance(rule, NormRule)
            outcome = self.forward_fold(name, module, rule)
            if isinstance(outcome, tuple):
                layer_name, direction = outcome
                self.folded_forward[name] = layer_name
                folds.append(Fold(name, (layer_name,), direction))
            else:
                skips.append(Skip(name, outcome))
        return FoldPlan(folds, skips, self.flow.method, self.notes)


def make_plan(model: nn.Module, flow: Dataflow, registry: LayerRegistry) -> FoldPlan:
    """Decide, for every batch-norm-like module of ``model``, whether and where it folds."""
    return _Planner(model, flow, registry).run()
