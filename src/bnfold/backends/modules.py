"""The ``nn.Module`` adapter: a captured :class:`~bnfold.backends.capture.Dataflow` translated into the core graph
(:func:`to_graph`), and the core's folds written back into the module tree (:class:`ModuleWeights`).

Registered layers and norms become units (a module called twice is one unit with two calls); any other call is an
op, named in the core's vocabulary by the facts table below. What only a module tree knows (parametrizations, hooks,
shared or directly read parameters) reaches the planner as a unit's ``problem``. Write-back sets
``parameter.data`` (optimisers and references see the new values), puts each folded norm's replacement in its
slots, and records it all in a :class:`Rollback`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

from .. import affine
from ..core.apply import LayerTensors, Statistics
from ..core.arithmetic import linear_combination
from ..core.graph import (
    CONSTANT,
    IN_TRAINING_MODE,
    INPUT,
    LAYER,
    NO_RUNNING_STATISTICS,
    NORM,
    OP,
    OUTPUT,
    PADS_BEFORE_THE_LAYER,
    PADS_ZEROS,
    Geometry,
    Graph,
    LayerFacts,
    NormFacts,
    Operand,
    OpFacts,
    same_padding,
)
from ..core.pipeline import NormModes
from ..layers import (
    CONV_RULE,
    CONV_TRANSPOSE_RULE,
    LINEAR_RULE,
    LayerRegistry,
    LinearLayerRule,
    NormRule,
    passes_its_input,
)
from ..segments import span_all_finite, span_counts, span_max_abs
from .capture import Dataflow, Site, TensorRef
from .module_tree import ModuleTree

# ------------------------------------------------------------------------------------------- the facts table

_MODULE_KINDS: tuple[tuple[tuple[type[nn.Module], ...], str], ...] = (
    ((nn.Identity,), "identity"),
    ((nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout), "dropout"),
    ((nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d), "adaptive_avg_pool"),
    ((nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d), "avg_pool"),
    ((nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d), "max_pool"),
    ((nn.Upsample,), "upsample"),  # UpsamplingNearest2d / UpsamplingBilinear2d subclass it
    ((nn.Flatten, nn.Unflatten), "reshape"),
)

_FUNCTION_KINDS: dict[str, str] = {
    **dict.fromkeys(("contiguous", "clone"), "identity"),
    **dict.fromkeys(("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout"), "dropout"),
    **dict.fromkeys(("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d"), "adaptive_avg_pool"),
    **dict.fromkeys(("avg_pool1d", "avg_pool2d", "avg_pool3d"), "avg_pool"),
    **dict.fromkeys(("max_pool1d", "max_pool2d", "max_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
                     "adaptive_max_pool3d"), "max_pool"),
    **dict.fromkeys(("interpolate", "upsample", "upsample_nearest", "upsample_bilinear"), "upsample"),
    **dict.fromkeys(("flatten", "reshape", "view", "unflatten"), "reshape"),
    "squeeze": "squeeze",
    "unsqueeze": "unsqueeze",
    "permute": "permute",
    **dict.fromkeys(("transpose", "swapaxes", "swapdims"), "transpose"),
    "mean": "mean",
    **dict.fromkeys(("cat", "concat", "concatenate"), "concat"),
    **dict.fromkeys(("add", "__add__", "__radd__", "iadd", "__iadd__", "add_"), "add"),
    **dict.fromkeys(("sub", "__sub__", "isub", "__isub__", "sub_", "subtract", "rsub", "__rsub__"), "sub"),
    **dict.fromkeys(("mul", "__mul__", "__rmul__", "imul", "__imul__", "mul_", "multiply"), "mul"),
    **dict.fromkeys(("neg", "__neg__", "neg_", "negative"), "mul"),  # -x is x * -1
    **dict.fromkeys(("truediv", "__truediv__", "div", "divide", "true_divide"), "div"),
}


_IN_PLACE_ARITHMETIC = frozenset({"iadd", "__iadd__", "add_", "isub", "__isub__", "sub_", "imul", "__imul__", "mul_",
                                  "neg_"})
"""In-place additions, subtractions and products: merged only where the tensor they overwrite is their own."""
_ARITHMETIC_KINDS = frozenset({"add", "sub", "mul"})


def _passes_its_input(site: Site) -> bool:
    """A module call that returns the tensor it reads itself (``nn.Identity``, dropout in eval)."""
    return site.kind == "module" and len(site.inputs) == 1 and isinstance(site.target, nn.Module) \
        and passes_its_input(site.target)


def op_name(site: Site) -> str:
    """The plain name of an op site's function or method (``"flatten"`` for ``torch.flatten`` and ``x.flatten``)."""
    target = site.target
    if isinstance(target, str):
        return target
    return str(getattr(target, "__name__", site.name))


def _argument(site: Site, position: int, keyword: str, default: Any) -> Any:
    if keyword in site.kwargs:
        return site.kwargs[keyword]
    if len(site.args) > position:
        return site.args[position]
    return default


def _ints(value: Any) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _function_facts(site: Site) -> OpFacts:
    name = op_name(site)
    kind = _FUNCTION_KINDS.get(name, "other")
    if kind == "dropout":
        # F.dropout(x, p, training) and torch.dropout(x, p, train) both take the flag third.
        training = site.kwargs.get("training", site.kwargs.get("train", _argument(site, 2, "training", True)))
        return OpFacts(kind, {"training": training})
    if kind == "avg_pool":
        return OpFacts(kind, {
            "padding": _ints(_argument(site, 3, "padding", 0)),
            "count_include_pad": bool(_argument(site, 5, "count_include_pad", True)),
            "divisor_override": _argument(site, 6, "divisor_override", None),  # (avg_pool1d has none)
        })
    if kind == "max_pool":
        at = 2 if name.startswith("adaptive") else 6  # the position of return_indices
        return OpFacts(kind, {"return_indices": bool(_argument(site, at, "return_indices", False))})
    if kind == "mean":
        dims = _argument(site, 1, "dim", None)
        return OpFacts(kind, {"dims": None if dims is None else _ints(dims), "keepdim": bool(_argument(site, 2, "keepdim", False))})
    if kind == "permute":
        args = list(site.args[1:])
        order = site.kwargs.get("dims", args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args)
        return OpFacts(kind, {"order": tuple(order)}) if all(isinstance(d, int) for d in order) else OpFacts("other")
    if kind == "transpose":
        dims = (_argument(site, 1, "dim0", 0), _argument(site, 2, "dim1", 0))
        return OpFacts(kind, {"dims": dims}) if all(isinstance(d, int) for d in dims) else OpFacts("other")
    if kind in ("squeeze", "unsqueeze"):
        dims = _argument(site, 1, "dim", None)
        if dims is None and kind == "squeeze":
            return OpFacts(kind, {"dims": None})
        dims = (dims,) if isinstance(dims, int) and not isinstance(dims, bool) else dims
        if isinstance(dims, (tuple, list)) and all(isinstance(d, int) for d in dims):
            return OpFacts(kind, {"dims": tuple(dims)})
        return OpFacts("other")
    if kind == "div" and _argument(site, 2, "rounding_mode", None) is not None:
        return OpFacts("other")  # floor / trunc division rounds: no affine map
    if kind in ("add", "sub", "mul", "div"):
        return _arithmetic_facts(site, kind, name)
    if kind == "concat":
        axis = site.kwargs.get("dim", site.kwargs.get("axis", site.args[1] if len(site.args) > 1 else 0))
        return OpFacts(kind, {"axis": axis if isinstance(axis, int) else None})
    return OpFacts(kind)


def _arithmetic_facts(site: Site, kind: str, name: str) -> OpFacts:
    """``add`` / ``sub`` / ``mul`` / ``div`` with their operands in call order: a tensor as its position among the
    site's inputs (torch.fx lists a tensor read twice once), a number as itself; anything else (a list, None) makes
    an ``other`` op. ``rsub`` is the subtraction it computes, ``-x`` is ``x * -1``."""
    if name.lstrip("_").startswith("neg"):
        values: list[Any] = [_argument(site, 0, "input", None), -1]
    else:
        values = [_argument(site, 0, "input", None), _argument(site, 1, "other", None)]
        if name.strip("_") == "rsub":
            values.reverse()
    operands: list[Operand] = []
    for value in values:
        if isinstance(value, TensorRef) and value.site in site.inputs:
            operands.append(Operand(input=site.inputs.index(value.site)))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            operands.append(Operand(number=float(value)))
        else:
            return OpFacts("other")
    alpha = _argument(site, 2, "alpha", 1) if kind == "sub" else site.kwargs.get("alpha", 1)
    return OpFacts(kind, {"alpha": alpha, "operands": tuple(operands)})


_KIND_OF_TYPE: dict[type, str] = {}  # _MODULE_KINDS resolved once per module class


def _module_facts(module: nn.Module) -> OpFacts:
    kind = _KIND_OF_TYPE.get(type(module))
    if kind is None:
        kind = _KIND_OF_TYPE[type(module)] = next((k for types, k in _MODULE_KINDS if isinstance(module, types)), "other")
    if kind == "dropout":
        return OpFacts(kind, {"training": module.training})
    if kind == "avg_pool":
        return OpFacts(kind, {
            "padding": _ints(module.padding),  # type: ignore[attr-defined]
            "count_include_pad": bool(module.count_include_pad),  # type: ignore[attr-defined]
            "divisor_override": getattr(module, "divisor_override", None),
        })
    if kind == "max_pool":
        return OpFacts(kind, {"return_indices": bool(module.return_indices)})  # type: ignore[attr-defined]
    return OpFacts(kind)


_DESCRIPTIONS = {"module": "module '{name}' ({type})", "input": "a model input", "param": "the tensor '{name}'",
                 "output": "the model output", "op": "the operation {name}"}


def describe(site: Site) -> str:
    """How a reason names a call site."""
    return _DESCRIPTIONS[site.kind].format(name=site.name, type=type(site.target).__name__)


# ------------------------------------------------------------------- layers that compute in their own code

_FUNCTIONAL_LAYERS: dict[Any, int] = {  # functional conv / linear -> the activations' channel axis
    F.conv1d: 1, F.conv2d: 1, F.conv3d: 1, torch.conv1d: 1, torch.conv2d: 1, torch.conv3d: 1, F.linear: -1,
}


def functional_rule(module: nn.Module) -> LinearLayerRule | str:
    """The rule of a layer whose class overrides ``forward`` but ends in one functional convolution / linear call on
    its own weight and bias (smp's ``Conv2dStaticSamePadding``: pad, then ``F.conv2d(x, self.weight, self.bias,
    ...)``); else why bnfold cannot tell what it computes.

    A forward fold into such a layer is exact whatever its code does before the call (the map acts on the call's
    output channels); a backward fold only when its input reaches the call unchanged and unpadded.
    """
    try:
        graph = fx.Tracer().trace(module)
    except Exception as error:  # fx raises many kinds on code it cannot follow
        return f"its forward() cannot be read ({type(error).__name__})"
    calls = [n for n in graph.nodes if n.op == "call_function" and n.target in _FUNCTIONAL_LAYERS]
    outputs = [n for n in graph.nodes if n.op == "output"]
    if len(calls) != 1 or len(outputs) != 1 or outputs[0].args[0] is not calls[0]:
        return "its forward() does not end in exactly one convolution or linear call"
    call = calls[0]
    arguments = list(call.args) + [None] * 7
    for position, name in ((1, "weight"), (2, "bias")):
        node = arguments[position] if len(call.args) > position else call.kwargs.get(name)
        if node is None and name == "bias":
            continue
        if not isinstance(node, fx.Node) or node.op != "get_attr" or node.target != name or len(node.users) != 1:
            return f"its forward() does not use its own {name} only in its convolution / linear call"
    if len(call.users) != 1:
        return "its forward() uses the convolution's output more than once"
    channel_dim = _FUNCTIONAL_LAYERS[call.target]
    groups = int(call.kwargs.get("groups", arguments[6] if arguments[6] is not None else 1)) if channel_dim == 1 else 1
    padding = call.kwargs.get("padding", arguments[4] if arguments[4] is not None else 0)
    source = call.args[0]
    while isinstance(source, fx.Node) and source.op == "call_module" and isinstance(
        module.get_submodule(str(source.target)), nn.Identity
    ):
        source = source.args[0]
    padded = None
    if not (isinstance(source, fx.Node) and source.op == "placeholder"):
        padded = PADS_BEFORE_THE_LAYER
    elif channel_dim == 1 and padding != "valid" and any(v != 0 for v in _ints(padding)):
        padded = PADS_ZEROS
    return LinearLayerRule(
        types=(type(module),), out_axis=0, activation_channel_dim=channel_dim, groups=lambda m: groups,
        input_padding=lambda m: padded,
    )


def layer_rule(module: nn.Module, registry: LayerRegistry) -> tuple[LinearLayerRule | None, str | None]:
    """The rule for ``module`` as a linear layer: the registry's, or one read off its own forward code; else
    ``(None, reason)`` (``(None, None)``: not a linear layer at all)."""
    match = registry.layer(module)
    if isinstance(match.rule, LinearLayerRule):
        return match.rule, None
    if match.reason is None:
        return None, None
    read = functional_rule(module)
    if isinstance(read, LinearLayerRule):
        return read, None
    return None, f"{match.reason} ({read})"


def geometry(module: nn.Module, rule: LinearLayerRule) -> Geometry | None:
    """Where the layer's kernel reads its input, for the built-in convolutions and Linear; ``None`` for a layer
    whose padding or kernel is decided by its own code (registered layers, timm's ``Conv2dSame``)."""
    if rule is LINEAR_RULE:
        return Geometry()
    if rule not in (CONV_RULE, CONV_TRANSPOSE_RULE) or not isinstance(module, nn.modules.conv._ConvNd):
        return None
    padding = module.padding if isinstance(module.padding, str) else _sizes(module.padding)
    return conv_geometry(_sizes(module.kernel_size), _sizes(module.stride), padding, _sizes(module.dilation),
                         int(module.groups), str(module.padding_mode), bool(module.transposed))


def conv_geometry(kernel: tuple[int, ...], stride: tuple[int, ...] | None, padding: str | tuple[int, ...] | None,
                  dilation: tuple[int, ...] | None, groups: int, padding_mode: str = "zeros", transposed: bool = False
                  ) -> Geometry | None:
    """A PyTorch convolution's :class:`~bnfold.core.graph.Geometry` from its arguments (a module's, or those of an
    ATen call in a TorchScript or torch.export graph): ``padding`` is ``"valid"``, ``"same"`` (the odd one at the
    end, as PyTorch pads) or one int per spatial axis; ``None`` where an argument could not be read."""
    if stride is None or padding is None or dilation is None:
        return None
    if padding == "valid":
        pairs = tuple((0, 0) for _ in kernel)
    elif padding == "same":
        pairs = same_padding(kernel, dilation) or ()
    else:
        pairs = tuple((p, p) for p in padding)
    return Geometry(kernel, stride, pairs, dilation, groups, padding_mode, transposed)


def _sizes(values: tuple[Any, ...]) -> tuple[int, ...]:
    """A conv's sizes as a tuple of Python ints (what they are already, unless code set them otherwise)."""
    if type(values) is tuple and all(type(v) is int for v in values):
        return values
    return tuple(int(v) for v in values)


# -------------------------------------------------------------------------------------------- translation


class _Translator:
    """The units (layers and norms the registry knows, with their facts) and the dataflow of a captured model."""

    def __init__(self, model: nn.Module, flow: Dataflow, registry: LayerRegistry, tree: ModuleTree) -> None:
        self.model = model
        self.flow = flow
        self.registry = registry
        self.tree = tree
        self.calls = flow.by_name("module")
        self.param_reads = flow.by_name("param")
        self.gammas: dict[str, torch.Tensor] = {}  # each foldable norm's gamma, by name

    def problem_of(self, name: str, module: nn.Module, what: str) -> str | None:
        """Why ``module`` (a ``what``: layer or norm) must not be changed whatever it is paired with:
        parametrizations, hooks, a parameter another module holds too, a tensor of its own that the forward code
        reads directly; or ``None``."""
        if _may_be_parametrized(module) and parametrize.is_parametrized(module):
            return (
                f"{what} '{name}' has parametrizations (torch.nn.utils.parametrize, weight_norm or spectral_norm): "
                f"its weight is recomputed at every call"
            )
        tables = {"forward pre-hooks": module._forward_pre_hooks, "forward hooks": module._forward_hooks}
        if hooks := [kind for kind, table in tables.items() if table]:
            return f"{what} '{name}' has {' and '.join(hooks)} (weight_norm, spectral_norm or your own), which may change what it computes"
        aliases = self.tree.names_of.get(id(module), [name])
        holders = self.tree.census.holders
        for own_name, tensor in module._parameters.items():
            if tensor is None or holders.get(id(tensor), 1) <= 1:  # held by this slot only: the common case
                continue
            own_names = {f"{alias}.{own_name}" if alias else own_name for alias in aliases}
            owners = [f"{holder_name}.{slot}" if holder_name else slot for holder_name, holder in self.tree.by_name.items()
                      for slot, held in holder._parameters.items() if held is tensor]  # (rare: tied weights)
            others = [owner for owner in owners if owner not in own_names]
            if others:
                return f"the {what} '{name}' shares its parameter '{own_name}' with '{others[0]}'"
        if not self.param_reads:
            return None
        own_tensors = [  # in declaration order, so the reason names the same tensor in every run
            f"{alias}.{tensor_name}" if alias else tensor_name
            for alias in aliases
            for tensor_name, _ in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False))
        ]
        for tensor_name in (t for t in own_tensors if t in self.param_reads):
            read = self.param_reads[tensor_name][0]
            user = self.flow.sites[read.users[0]] if read.users else read
            return f"its tensor '{tensor_name}' is also read directly by {describe(user)} in the forward code"
        return None

    def layer_facts(self, name: str, module: nn.Module) -> LayerFacts | None:
        rule, reason = layer_rule(module, self.registry)
        if rule is None:
            return None if reason is None else LayerFacts(0, 0, 1, not_a_rule=reason)
        weight = getattr(module, rule.weight_name, None)
        if isinstance(weight, nn.parameter.UninitializedParameter):
            return LayerFacts(0, 0, rule.activation_channel_dim, problem=(
                f"the layer '{name}' is a lazy module whose weight is not materialised yet; run one forward pass first"
            ))
        unbatched = [
            site.shape for site in self.calls.get(name, [])
            if weight is not None and rule.activation_channel_dim == 1 and site.shape is not None
            and len(site.shape) == weight.dim() - 1
        ]
        if weight is None or not weight.is_floating_point():
            problem = f"the layer '{name}' has no floating-point weight to fold into"
        elif unbatched:
            problem = (
                f"'{name}' runs on an unbatched input (output shape {tuple(unbatched[0])}): its channels are on axis 0, "
                f"not on the axis 1 a norm normalises"
            )
        else:
            problem = self.problem_of(name, module, "layer")
        return LayerFacts(
            out_channels=rule.out_channels(module),
            in_channels=rule.in_channels(module),
            channel_dim=rule.activation_channel_dim,
            problem=problem,
            input_fold_blocker=rule.input_fold_blocker(module),
            geometry=geometry(module, rule),
            input_padding=rule.input_padding(module),
        )

    def norm_facts(self, name: str, module: nn.Module) -> NormFacts:
        match = self.registry.norm(module)
        rule = match.rule
        if not isinstance(rule, NormRule):
            return NormFacts(channels=_channels_guess(module), problem=match.reason or "bnfold has no rule for it")
        problem, batch = rule.unfoldable(module), None
        if problem is None and not rule.keeps_running_statistics(module):
            batch = NO_RUNNING_STATISTICS
        elif problem is None and module.training and rule.depends_on_training:
            batch = IN_TRAINING_MODE
        if problem is not None or batch is not None:
            return NormFacts(_channels_guess(module), rule.channel_dim, problem=problem, batch_statistics=batch)
        if name in self.calls:
            problem = self.problem_of(name, module, "norm")
        statistics = rule.statistics(module)
        if statistics.gamma is not None:
            self.gammas[name] = statistics.gamma  # its negative scales are counted with all the others'
        return NormFacts(
            channels=int(statistics.mean.shape[0]),
            channel_dim=rule.channel_dim,
            problem=problem,
            backward_blocker=rule.backward_blocker(module),
        )

    def translate(self) -> Graph:
        graph = Graph(method=self.flow.method, shapes_known=self.flow.shapes_known, notes=list(self.flow.notes))
        for name, module in self.tree.unique:
            if self.registry.is_norm_candidate(module):
                graph.add_unit(name, NORM, type(module).__name__, norm=self.norm_facts(name, module))
            elif (facts := self.layer_facts(name, module)) is not None:
                graph.add_unit(name, LAYER, type(module).__name__, layer=facts)
        for name, negatives in zip(self.gammas, _count_negatives(list(self.gammas.values())), strict=True):
            if negatives:
                unit = graph.units[name]
                unit.norm = replace(unit.norm, negative_scales=negatives)  # type: ignore[type-var]
        for site in self.flow.sites:
            label = describe(site)
            if site.kind == "param":
                graph.add_node(CONSTANT, label, site.inputs, shape=site.shape or _constant_shape(self.model, site.name))
            elif site.kind in ("input", "output"):
                graph.add_node(INPUT if site.kind == "input" else OUTPUT, label, site.inputs, shape=site.shape)
            elif site.kind == "module" and site.name in graph.units:
                graph.add_node(graph.units[site.name].kind, label, site.inputs, shape=site.shape, unit=site.name)
            elif site.kind == "module":
                graph.add_node(OP, label, site.inputs, shape=site.shape, op=_module_facts(site.target))
            else:
                facts = _with_constants(_function_facts(site), site, self.flow, self.model)
                if facts.kind in ("add", "sub", "mul") and op_name(site) in _IN_PLACE_ARITHMETIC \
                        and not _overwritable(site, self.flow, graph):
                    facts = OpFacts("other")
                graph.add_node(OP, label, site.inputs, shape=site.shape, op=facts)
        return graph


def _constant_shape(model: nn.Module, name: str) -> tuple[int, ...] | None:
    """The shape of the parameter or buffer ``name`` of the model, or None."""
    try:
        return tuple(read_constant(model, name).shape)
    except (AttributeError, TypeError):
        return None


def _all_zero(model: nn.Module, name: str) -> bool:
    """Whether every value of the parameter or buffer ``name`` is 0 (False when it cannot be read)."""
    try:
        return not bool(torch.any(read_constant(model, name)))
    except (AttributeError, TypeError, RuntimeError):
        return False


def _with_constants(facts: OpFacts, site: Site, flow: Dataflow, model: nn.Module) -> OpFacts:
    """Arithmetic facts with what the dataflow knows of their operands (a parameter or buffer read is a constant by
    name, with its shape and whether it is all zeros; a computed tensor has its shape, where recorded), as the core
    decides them (:func:`~bnfold.core.arithmetic.linear_combination`)."""
    operands = facts.attributes.get("operands")
    if operands is None:
        return facts
    named = []
    for operand in operands:
        source = flow.sites[site.inputs[operand.input]] if operand.input is not None else None
        if source is not None and source.kind == "param":
            shape = source.shape or _constant_shape(model, source.name)
            zero = facts.kind in ("add", "sub") and _all_zero(model, source.name)
            operand = Operand(input=operand.input, constant=source.name, shape=shape, zero=zero)
        elif source is not None:
            operand = Operand(input=operand.input, shape=source.shape)
        named.append(operand)
    return linear_combination(facts.kind, named, alpha=facts.attributes.get("alpha", 1), shape=site.shape)


def _overwritable(site: Site, flow: Dataflow, graph: Graph) -> bool:
    """Whether the tensor an in-place addition, subtraction or product (``x += y``, ``x.add_(y)``, ``x -= y``,
    ``x.mul_(gamma)``) overwrites is its own, so that the op may be merged like ``x + y``.

    torch.fx records later reads of an overwritten tensor as reads of the value before the op, while at run time
    they see its result; once the op is merged away they would not. So the tensor must be computed by a layer, a
    norm or another such op (not an input, a parameter or a view of another tensor), and read before the op only by
    layers, norms and out-of-place arithmetic (none of which makes a view of it), and never after it.
    """
    first = site.args[0] if site.args else None
    if not isinstance(first, TensorRef):
        return False
    # The overwritten tensor, and the identities it passed through (nn.Identity, a folded norm, dropout in eval: each
    # returns the very tensor it reads).
    chain = [flow.sites[first.site]]
    while _passes_its_input(chain[-1]):
        chain.append(flow.sites[chain[-1].inputs[0]])
    own = chain[-1]
    in_place = own.kind == "op" and op_name(own) in _IN_PLACE_ARITHMETIC  # a chain of in-place ops: x += y; x += z
    if not (_overwritable(own, flow, graph) if in_place else _reads_without_aliasing(own, graph)):
        return False
    allowed = {site.index} | {member.index for member in chain[:-1]}
    return all(user in allowed or (user < site.index and _reads_without_aliasing(flow.sites[user], graph))
               for member in chain for user in member.users)


def _reads_without_aliasing(site: Site, graph: Graph) -> bool:
    """A layer, a norm, or out-of-place arithmetic: a reader that makes no view of the tensor it reads."""
    if site.kind == "module":
        return site.name in graph.units
    return (site.kind == "op" and _FUNCTION_KINDS.get(op_name(site)) in _ARITHMETIC_KINDS
            and op_name(site) not in _IN_PLACE_ARITHMETIC)


def _may_be_parametrized(module: nn.Module) -> bool:
    """Whether ``module`` has an attribute ``parametrizations`` at all (where torch.nn.utils.parametrize keeps
    them: a submodule), without the failed attribute lookup ``is_parametrized`` makes on every other module."""
    return "parametrizations" in module._modules or "parametrizations" in module.__dict__ \
        or hasattr(type(module), "parametrizations")


def read_constant(model: nn.Module, name: str) -> torch.Tensor:
    """The parameter, buffer or tensor attribute ``name`` (a qualified name, as a torch.fx ``get_attr`` reads it)."""
    owner_name, _, attribute = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    value = getattr(owner, attribute)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"'{name}' is not a tensor")
    return value


def _count_negatives(arrays: list[torch.Tensor]) -> list[int]:
    """How many values of each array are negative, in one comparison over all of them joined (see
    :mod:`bnfold.segments`)."""
    if not arrays:
        return []
    negative = (TorchNumerics().concat64(arrays) < 0).numpy()
    return span_counts(negative, list(itertools.accumulate((a.numel() for a in arrays), initial=0)))


def _small_numpy(array: torch.Tensor, limit: int) -> np.ndarray | None:
    """``array`` as a numpy view, when it is a CPU array of fewer than ``limit`` values in a dtype numpy has.

    On a few hundred or thousand values, one numpy call is several times cheaper than torch's dispatch (and, above
    its grain size, the wake-up of its thread pool); bnfold checks and bounds many such small arrays per fold.
    """
    if array.device.type != "cpu" or array.numel() >= limit or array.dtype == torch.bfloat16:
        return None
    return array.detach().numpy()


def _channels_guess(module: nn.Module) -> int:
    if isinstance(getattr(module, "num_features", None), int):
        return module.num_features  # type: ignore[return-value]
    mean = getattr(module, "running_mean", None)
    if not isinstance(mean, torch.Tensor) or isinstance(mean, nn.parameter.UninitializedTensorMixin) or mean.dim() != 1:
        return 0
    return int(mean.shape[0])


def norm_modes(modules: Iterable[nn.Module]) -> NormModes:
    """The training-mode fact of a live model (an ``nn.Module`` or a ScriptModule), from its ``modules``: those
    that hold running statistics, and how many of them are in training mode. A frozen module (folded before) has
    none: its mode was fixed when it was frozen."""
    modes = [m.training for m in modules if getattr(m, "running_mean", None) is not None]
    return NormModes(len(modes), sum(modes))


def to_graph(model: nn.Module, flow: Dataflow, registry: LayerRegistry, tree: ModuleTree | None = None) -> Graph:
    """The core graph of ``model`` as ``flow`` captured it (``tree``: the model's :class:`ModuleTree`, if made)."""
    return _Translator(model, flow, registry, tree if tree is not None else ModuleTree(model)).translate()


# --------------------------------------------------------------------------------------------- writing back


class TorchNumerics:
    """:class:`bnfold.core.apply.Numerics` for torch tensors."""

    def float64(self, array: torch.Tensor) -> torch.Tensor:
        return array.detach().to(torch.float64)

    def compute(self, weight: torch.Tensor) -> torch.Tensor:
        weight = weight.detach()
        return weight if weight.dtype in (torch.float32, torch.float64) else weight.to(torch.float32)

    def cast(self, array: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return array.to(device=like.device, dtype=like.dtype)

    def finite(self, array: torch.Tensor) -> bool:
        small = _small_numpy(array, 1 << 20)  # up to a million values, waking torch's thread pool costs more
        if small is not None:
            return bool(np.isfinite(small).all())
        # One reduction instead of isfinite + all: a sum is finite only if every term is (NaN and inf propagate);
        # a sum that overflows although every term is finite is checked element by element.
        return bool(torch.isfinite(array.sum())) or bool(torch.isfinite(array).all())

    def dtype_name(self, array: torch.Tensor) -> str:
        return str(array.dtype).removeprefix("torch.")

    def concat64(self, arrays: list[torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():  # no detach() per array: on arrays this small, every call counts
            flat = arrays if all(a.dim() == 1 for a in arrays) else [a.reshape(-1) for a in arrays]
            try:
                # One conversion, not one per array. Mixed float dtypes are promoted to the widest, exactly.
                return torch.cat(flat).to(device="cpu", dtype=torch.float64)
            except RuntimeError:  # arrays on several devices
                return torch.cat([a.to(device="cpu", dtype=torch.float64) for a in flat])

    def repeat64(self, values: list[float], counts: list[int]) -> torch.Tensor:
        return torch.from_numpy(np.repeat(np.asarray(values, dtype=np.float64), counts))

    def scalable_in_place(self, weight: torch.Tensor) -> bool:
        return weight.dtype in (torch.float32, torch.float64) and weight.is_contiguous() and not weight.is_inference()

    def max_abs(self, array: torch.Tensor) -> float:
        small = _small_numpy(array, 1 << 16)
        if small is not None:
            return float(np.abs(small).max(initial=0.0))  # a norm's scales: no thread pool
        low, high = torch.aminmax(array.detach())  # one pass, no copy (vector_norm(inf) is ~10x slower on CPU)
        return max(float(high), -float(low))

    def segment_max_abs(self, array: torch.Tensor, bounds: list[int]) -> list[float]:
        return span_max_abs(self.float64(array).cpu().numpy(), bounds)

    def segment_finite(self, array: torch.Tensor, bounds: list[int]) -> list[bool]:
        # Checked in the array's own dtype: an entry that overflowed when cast to it is inf there.
        return span_all_finite(self.float64(array).cpu().numpy(), bounds)

    def max_finite(self, array: torch.Tensor) -> float:
        return float(torch.finfo(array.dtype).max)

    def zeros(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.float64, device=like.device)


@dataclass
class Rollback:
    """Undo information for a fold made on a module tree.

    Swapped tensor values and module slots come back bit for bit. Weights multiplied in place (only where no
    verification may have to undo the fold: a copy, or ``inplace=True`` without example inputs) are divided back,
    which restores them to within one rounding; that path is several times faster on large models, because no
    second copy of every weight is allocated.
    """

    swapped: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    slots: list[tuple[dict[str, Any], str, object]] = field(default_factory=list)  # (owner's table, name, old)
    scaled: list[tuple[torch.Tensor, torch.Tensor, int, int]] = field(default_factory=list)

    def swap(self, tensor: torch.Tensor, new_value: torch.Tensor) -> None:
        self.swapped.append((tensor, tensor.data))
        tensor.data = new_value

    def set_slot(self, owner: nn.Module, name: str, value: object) -> None:
        """Set a child module or parameter slot of ``owner`` (bypassing nn.Module's type checks on re-assignment)."""
        table = owner._modules if name in owner._modules else owner._parameters
        self.slots.append((table, name, table.get(name)))
        table[name] = value  # type: ignore[assignment]

    def scale(self, weight: torch.Tensor, factors: torch.Tensor, axis: int, groups: int) -> None:
        affine.scale_channels_in_place(weight.data, factors, axis, groups)
        self.scaled.append((weight, factors, axis, groups))

    def replacements(self) -> list[tuple[object, object]]:
        """Each slot changed, as ``(old value, value now)``: what a tensor count needs to know."""
        return [(old, table.get(name)) for table, name, old in self.slots]

    def restore(self) -> None:
        """Undo the fold. Once: the undo information is used up, so a second call changes nothing (dividing the
        scaled weights again would corrupt them)."""
        for weight, factors, axis, groups in reversed(self.scaled):
            affine.scale_channels_in_place(weight.data, 1 / factors, axis, groups)
        for tensor, old in reversed(self.swapped):
            tensor.data = old
        for table, name, value in reversed(self.slots):
            table[name] = value
        self.scaled, self.swapped, self.slots = [], [], []


class ModuleWeights:
    """:class:`bnfold.core.apply.WeightAccess` on a module tree, recording a :class:`Rollback`."""

    numerics = TorchNumerics()

    def __init__(
        self,
        model: nn.Module,
        registry: LayerRegistry,
        rollback: Rollback | None = None,
        *,
        in_place: bool = False,
        tree: ModuleTree | None = None,
    ) -> None:
        self.model = model
        self.registry = registry
        self.rollback = rollback or Rollback()
        self.in_place = in_place  # weights may be multiplied where they are (see Rollback)
        self.rules: dict[str, LinearLayerRule] = {}
        self.tree = tree if tree is not None else ModuleTree(model)

    def _layer(self, name: str) -> tuple[nn.Module, LinearLayerRule]:
        module = self.tree.get(name)
        if name not in self.rules:
            rule, _ = layer_rule(module, self.registry)
            assert rule is not None, f"'{name}' was planned as a layer"
            self.rules[name] = rule
        return module, self.rules[name]

    def _norm(self, name: str) -> tuple[nn.Module, NormRule]:
        module = self.tree.get(name)
        rule = self.registry.norm(module).rule
        assert isinstance(rule, NormRule)
        return module, rule

    def statistics(self, norm: str) -> Statistics:
        module, rule = self._norm(norm)
        stats = rule.statistics(module)
        return stats if type(stats) is Statistics else Statistics(*stats)  # a rule's own tuple: the core's type

    def read(self, layer: str) -> LayerTensors:
        module, rule = self._layer(layer)
        return LayerTensors(getattr(module, rule.weight_name), getattr(module, rule.bias_name, None), rule.out_axis,
                            rule.groups(module))

    def write(self, layer: str, weight: torch.Tensor, bias: torch.Tensor) -> None:
        module, rule = self._layer(layer)
        self.rollback.swap(getattr(module, rule.weight_name), weight)
        self.write_bias(layer, bias)

    def scale_in_place(self, layer: str, factors: torch.Tensor, axis: int, groups: int) -> None:
        module, rule = self._layer(layer)
        self.rollback.scale(getattr(module, rule.weight_name), factors, axis, groups)

    def write_bias(self, layer: str, bias: torch.Tensor) -> None:
        module, rule = self._layer(layer)
        old_bias: torch.Tensor | None = getattr(module, rule.bias_name, None)
        if old_bias is not None:
            self.rollback.swap(old_bias, bias)
            return
        old_weight = getattr(module, rule.weight_name)
        self.rollback.set_slot(module, rule.bias_name, nn.Parameter(bias, requires_grad=old_weight.requires_grad))

    def constant(self, name: str) -> torch.Tensor:
        """A parameter or buffer the model reads directly (a layer scale), for merges."""
        return read_constant(self.model, name).detach()

    def remove_norm(self, norm: str) -> None:
        module, rule = self._norm(norm)
        replacement = rule.replacement(module)
        for parent, child_name in self.tree.slots.get(id(module), []):
            self.rollback.set_slot(parent, child_name, replacement)


