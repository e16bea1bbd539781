"""The torch.export adapter: a program's ATen graph translated into the core graph (:func:`to_graph`), and the
core's folds written back into it (:class:`ExportedWeights`); the folded module is then exported again.

An ``ExportedProgram`` carries no Python classes to rebuild, so its unlifted module (``program.module()``: an fx
``GraphModule`` whose weights are ``get_attr`` nodes, a copy of the program) is what bnfold reads and rewrites.
Every ATen call becomes a core node (layers and norms units named after their state's owner, ``layer1.0.bn1``), and
the core plans (:mod:`bnfold.core.plan`). Parameter counts are those of the program's ``parameters()``.
"""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from ..core import pipeline
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
    PADDING_UNKNOWN,
    Geometry,
    Graph,
    LayerFacts,
    NormFacts,
    Operand,
    OpFacts,
    weight_channels,
)
from ..core.merge_rounds import merge_rounds
from ..core.pipeline import NormModes
from ..core.plan import FoldPlan
from ..errors import CaptureError, InvalidInputError, first_line
from ..report import FoldReport
from .aten_facts import ARITHMETIC, LAYERS, OP_KINDS, _ints, aten_pad_facts, layer_geometry, op_kind
from .exported_merges import ExportedMerges, Translation
from .modules import TorchNumerics

CAPTURE = "torch.export graph"

# ------------------------------------------------------------------------------------------- the facts table

# Linear layers: ATen op name -> how its weight is laid out.
_LAYERS: dict[str, str] = {**LAYERS, "convolution": "convolution"}

# Norms: ATen op name -> how it decides between running and batch statistics ("flag": its ``training`` argument,
# "running": always running statistics, "batch": always batch statistics).
_NORMS: dict[str, str] = {
    **dict.fromkeys(("batch_norm", "native_batch_norm", "_native_batch_norm_legit_functional"), "flag"),
    "_native_batch_norm_legit_no_training": "running",
    "_native_batch_norm_legit": "batch",
}

# Every other op the core can reason about: ATen op name -> OpFacts kind (:func:`~.aten_facts.op_kind`).
_OP_KINDS: dict[str, str] = {
    **OP_KINDS,
    **dict.fromkeys(("lift_fresh_copy", "_to_copy", "to"), "identity"),
    "native_dropout": "dropout",
    **dict.fromkeys(("_unsafe_view", "squeeze", "unsqueeze", "view_copy", "reshape_as", "view_as"), "reshape"),
    "t": "transpose",
}

# Ops whose outputs are tuples of which ``getitem 0`` is the tensor the core sees.
_TUPLE_VALUED = frozenset({
    "native_batch_norm", "_native_batch_norm_legit_functional", "_native_batch_norm_legit_no_training",
    "_native_batch_norm_legit", "native_dropout", "max_pool1d_with_indices", "max_pool2d_with_indices",
    "max_pool3d_with_indices", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
})

# Uses that read only a tensor's metadata (shape checks), which folding does not change.
_METADATA_READS = frozenset({
    "sym_size", "sym_numel", "sym_stride", "sym_storage_offset", "dim", "_assert_tensor_metadata",
    "_assert_scalar", "sym_constrain_range", "sym_constrain_range_for_size",
})

# Arguments read only for their shape, dtype or device (``y.reshape_as(x)`` reads x's shape): not uses.
_METADATA_ARGUMENTS: dict[str, str] = {
    **dict.fromkeys(("reshape_as", "view_as", "expand_as", "type_as"), "other"),
    **dict.fromkeys(("zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like"), "self"),
}

# Linear combinations the merge planner reads (overloads ``Tensor``, ``Scalar`` and ``default``); the in-place forms
# (``_``) only under the rule of :func:`_overwritable`.
_ARITHMETIC: dict[str, str] = {**ARITHMETIC, "subtract_": "sub", "multiply_": "mul", "negative_": "mul"}

# Ops through which a stored tensor is still that tensor's values in the same order (``torch.tensor([...])`` in a
# forward is a lifted constant read through ``lift_fresh_copy`` / ``detach_`` / ``view``): a product by their output
# is a product by a constant, named after the stored tensor.
_CONSTANT_VIEWS = frozenset({
    "lift_fresh_copy", "detach", "detach_", "clone", "alias", "contiguous", "view", "reshape", "_unsafe_view",
    "unsqueeze", "squeeze", "flatten", "unflatten",
})

# Ops a decomposition makes out of a linear layer, which bnfold does not fold into.
_DECOMPOSED_LINEAR = frozenset({"addmm", "mm"})


def op_name(node: fx.Node) -> str:
    """The ATen op name of a call (``"avg_pool2d"`` for ``aten.avg_pool2d.default``), or ``""``."""
    if node.op != "call_function":
        return ""
    return str(getattr(node.target, "_opname", getattr(node.target, "__name__", "")))


def _argument(node: fx.Node, name: str) -> Any:
    """Argument ``name`` of an aten call: positional, keyword, or the schema's default."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return None
    for index, spec in enumerate(schema.arguments):
        if spec.name == name:
            if index < len(node.args):
                return node.args[index]
            if name in node.kwargs:
                return node.kwargs[name]
            return spec.default_value if spec.has_default_value() else None
    return None


def _set_argument(node: fx.Node, name: str, value: Any) -> None:
    index = [spec.name for spec in node.target._schema.arguments].index(name)  # type: ignore[union-attr]
    if index < len(node.args):
        node.update_arg(index, value)
    elif index == len(node.args):
        node.args = (*node.args, value)
    else:
        node.update_kwarg(name, value)


def _value(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _rank(node: Any) -> int | None:
    value = _value(node)
    return value.dim() if isinstance(value, torch.Tensor) else None


def _op_facts(node: fx.Node, name: str) -> OpFacts:
    """The node in the core's vocabulary, with the attributes that decide whether an affine map passes it."""
    kind = op_kind(_OP_KINDS, name)
    if kind is None:
        return OpFacts("other")
    source = node.args[0] if node.args else None
    if kind == "identity" and name in ("_to_copy", "to"):
        before, after = _value(source), _value(node)
        same = isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor) and before.dtype == after.dtype
        return OpFacts("identity" if same else "other")  # a dtype change rounds: the fold would not be exact
    if kind == "dropout":
        return OpFacts(kind, {"training": _argument(node, "train") is not False})
    if kind == "avg_pool":
        return OpFacts(kind, {
            "padding": _ints(_argument(node, "padding")) or (0,),
            "count_include_pad": bool(_argument(node, "count_include_pad")),
            "divisor_override": _argument(node, "divisor_override"),
        })
    if kind == "max_pool":
        indices_used = name.endswith("_with_indices") or name.startswith("adaptive_")
        return OpFacts(kind, {"return_indices": indices_used and _outputs_used(node) != {0}})
    if kind == "mean":
        dims = _argument(node, "dim")
        rank = _rank(source)
        if dims is None or dims == []:
            dims = None if rank is None else tuple(range(rank))
        return OpFacts(kind, {"dims": None if dims is None else _ints(dims), "keepdim": bool(_argument(node, "keepdim"))})
    if kind == "permute":
        order = _argument(node, "dims")
        return OpFacts(kind, {"order": _ints(order)}) if order is not None else OpFacts("other")
    if kind == "transpose":
        if name == "t":
            return OpFacts(kind, {"dims": (0, 1)}) if _rank(source) == 2 else OpFacts("identity")
        dims = tuple(node.args[1:3])
        plain = len(dims) == 2 and all(isinstance(d, int) for d in dims)
        return OpFacts(kind, {"dims": dims}) if plain else OpFacts("other")
    if kind == "concat":
        axis = _argument(node, "dim")
        return OpFacts(kind, {"axis": axis if isinstance(axis, int) else None})
    if kind == "pad":
        widths = _argument(node, "padding" if name.startswith(("reflection", "replication")) else "pad")
        return aten_pad_facts(name, str(_argument(node, "mode") or "constant"), widths, _rank(source))
    return OpFacts(kind)


def _outputs_used(node: fx.Node) -> set[int | None]:
    """Which elements of a tuple-valued node are read (``None``: the tuple itself is passed on)."""
    used: set[int | None] = set()
    for user in node.users:
        if user.target is operator.getitem and isinstance(user.args[1], int):
            if user.users:
                used.add(user.args[1])
        else:
            used.add(None)
    return used


def _aliases(node: fx.Node) -> bool:
    """Whether the output of a call may be a view of one of its inputs (an ATen op whose schema says so, or a call
    bnfold cannot look up: ``getitem`` of a tuple, a Python function)."""
    schema = getattr(node.target, "_schema", None)
    return schema is None or any(result.alias_info is not None for result in schema.returns)


def _is_metadata(node: fx.Node) -> bool:
    """A node that only looks at shapes, or computes sizes: not a use of the tensors it reads."""
    if node.op == "call_module":
        return str(node.target).startswith("_guards")
    sizes = (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)
    return node.op == "call_function" and (op_name(node) in _METADATA_READS or isinstance(_value(node), sizes))


# -------------------------------------------------------------------------------------------- translation


@dataclass
class _LayerSite:
    node: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    out_axis: int
    groups: int


@dataclass
class _NormSite:
    node: fx.Node
    output: fx.Node  # the norm itself, or its getitem 0
    statistics: tuple[Any, Any, Any, Any]  # gamma, beta, mean, var argument nodes (gamma / beta may be None)
    eps: float
    training: bool  # batch statistics although it has running statistics (the program was exported in train mode)


def _fetch(module: nn.Module, target: str) -> torch.Tensor:
    owner, _, name = target.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, name)


def _is_stored(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr"


def _symbolic_sizes(module: fx.GraphModule) -> dict[Any, int]:
    """A stand-in integer for every size symbol: large and distinct, so that no real size equals it by accident,
    and consistent, so that ``s0 * 8`` in one shape equals the same product in another."""
    tensors = [value for value in map(_value, module.graph.nodes) if isinstance(value, torch.Tensor)]
    symbols = {symbol for tensor in tensors for size in tensor.shape if isinstance(size, torch.SymInt)
               for symbol in size.node.expr.free_symbols}
    return {symbol: 1_000_003 + 2 * i for i, symbol in enumerate(sorted(symbols, key=str))}


def _layer_facts(node: fx.Node, name: str, unit: str, translation: ExportedGraph
                 ) -> tuple[LayerFacts, _LayerSite]:
    """What the planner needs of an ATen conv / linear call ``unit``, and where its weight and bias are
    (``translation`` knows who else reads them)."""
    layout = _LAYERS[name]
    weight, bias = _argument(node, "weight"), _argument(node, "bias")
    weight_value = _value(weight)
    if not isinstance(weight_value, torch.Tensor) or not weight_value.is_floating_point():
        problem = f"the layer '{unit}' has no floating-point weight to fold into"
    elif not _is_stored(weight) or (bias is not None and not _is_stored(bias)):
        problem = f"the weight or bias of the layer '{unit}' is computed in the program, not a stored tensor"
    else:
        problem = translation.sharing(weight, "weight", unit) or (
            bias is not None and translation.sharing(bias, "bias", unit)) or None
    transposed = layout == "conv_transpose" or (layout == "convolution" and bool(_argument(node, "transposed")))
    groups = 1 if layout == "linear" else int(_argument(node, "groups") or 1)
    shape = tuple(weight_value.shape) if isinstance(weight_value, torch.Tensor) else (0, 0)
    if layout == "linear":  # (out, in) or a 1-D (in,): F.linear accepts a vector weight
        out_channels, in_channels = shape[0], shape[-1]
    else:
        out_channels, in_channels = weight_channels(shape, 1 if transposed else 0, groups)
    channel_dim = -1 if layout == "linear" else 1
    rank = _rank(node.args[0])
    if layout != "linear" and rank is not None and rank == len(shape) - 1:
        channel_dim = 0  # an unbatched input: (channels, spatial...)
    geometry = Geometry() if layout == "linear" else layer_geometry(
        shape, _argument(node, "stride"), _argument(node, "padding"), _argument(node, "dilation"), groups, transposed)
    facts = LayerFacts(out_channels, in_channels, channel_dim, problem=problem, geometry=geometry,
                       input_padding=PADDING_UNKNOWN if geometry is None else None)
    return facts, _LayerSite(node, weight, bias, 1 if transposed else 0, groups)


def _norm_facts(node: fx.Node, name: str, module: fx.GraphModule, input_shape: tuple[int, ...] | None
                ) -> tuple[NormFacts, _NormSite]:
    """What the planner needs of an ATen batch norm call reading a tensor of ``input_shape``, and where its
    statistics are (a tuple-valued norm: the ``getitem 0`` that stands for its output)."""
    mode = _NORMS[name]
    statistics = tuple(_argument(node, a) for a in ("weight", "bias", "running_mean", "running_var"))
    gamma, beta, mean, var = statistics
    has_running = mean is not None and var is not None
    batch = (mode == "batch") or (mode == "flag" and _argument(node, "training") is not False) or not has_running
    channels_from = next((s for s in statistics if isinstance(_value(s), torch.Tensor)), None)
    channels = int(_value(channels_from).numel()) if channels_from is not None else (
        input_shape[1] if input_shape and len(input_shape) > 1 else 0)
    output: fx.Node = node
    problem = None
    if name in _TUPLE_VALUED:
        used = _outputs_used(node)
        zero = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
        if used - {0}:
            problem = "its saved mean / inverse standard deviation outputs are used; only its normalised output can be folded"
        elif len(zero) == 1:
            output = zero[0]
        elif zero:
            problem = "its normalised output is read through several getitem nodes"
    if batch:
        problem = None
    elif problem is None and any(s is not None and not _is_stored(s) for s in statistics):
        problem = "its statistics or affine parameters are computed in the program, not stored tensors (get_attr)"
    negative = 0
    if problem is None and not batch and gamma is not None:
        negative = int((_fetch(module, str(gamma.target)).detach() < 0).sum())
    batch_statistics = (NO_RUNNING_STATISTICS if not has_running or mode == "batch" else IN_TRAINING_MODE) if batch else None
    facts = NormFacts(channels, 1, problem=problem, batch_statistics=batch_statistics, negative_scales=negative)
    eps = _argument(node, "eps")
    return facts, _NormSite(node, output, statistics, float(eps) if eps is not None else 1e-5,
                            training=batch and has_running)


def _constant_of(node: fx.Node) -> str | None:
    """The stored tensor ``node`` is, read directly or through :data:`_CONSTANT_VIEWS` (its values in the same order),
    by its target; None for a tensor the program computes."""
    while (node.op == "call_function" and op_name(node) in _CONSTANT_VIEWS and node.args
           and isinstance(node.args[0], fx.Node) and node.all_input_nodes == [node.args[0]]):
        node = node.args[0]
    return str(node.target) if node.op == "get_attr" else None


def _overwritable(node: fx.Node, order: dict[fx.Node, int]) -> bool:
    """Whether the tensor an in-place ``add_`` (``sub_``, ``mul_``, ``neg_``) overwrites is its own: computed in the
    program (not an input or a stored tensor), not a view of another tensor, and read before the op only (``order``:
    the nodes' positions), by ops that do not make views of it. torch.export makes every later read of it read the
    in-place node instead; a view would still see the result at run time, which a merge (it no longer computes that
    result in place) would change. A chain of in-place ops (``out += branch`` in a loop, ``(a - b).mul_(gamma)``)
    overwrites one tensor of its own."""
    target = node.args[0]
    if not isinstance(target, fx.Node) or target.op != "call_function":
        return False
    in_place = op_name(target).endswith("_") and op_name(target) in _ARITHMETIC
    if _aliases(target) and not (in_place and _overwritable(target, order)):
        return False
    return all(user is node or _is_metadata(user) or (order[user] < order[node] and not _aliases(user))
               for user in target.users)


class ExportedGraph:
    """The core graph of an unlifted program module (:func:`to_graph`), and where each unit lives in the fx graph:
    every fx node is a core node reading the core nodes of the tensors it reads."""

    def __init__(self, module: fx.GraphModule) -> None:
        self.module = module
        self.graph = Graph(method=CAPTURE, shapes_known=True)
        self.index: dict[fx.Node, int] = {}  # fx node -> its core node
        self.nodes: dict[int, list[fx.Node]] = {}  # core index -> the fx nodes it stands for
        self.layers: dict[str, _LayerSite] = {}
        self.norms: dict[str, _NormSite] = {}
        self.symbols = _symbolic_sizes(module)
        self.order = {node: position for position, node in enumerate(module.graph.nodes)}
        self.readers: dict[str, int] = {}  # stored tensor (get_attr target) -> how many nodes read it
        for node in module.graph.nodes:
            if node.op == "get_attr":
                self.readers[node.target] = self.readers.get(node.target, 0) + len(node.users)
        self.aliases: dict[int, list[str]] = {}  # id(stored tensor) -> its every name
        for name, tensor in (*module.named_parameters(remove_duplicate=False),
                             *module.named_buffers(remove_duplicate=False)):
            self.aliases.setdefault(id(tensor), []).append(name)
        self.translate()

    def shape(self, node: Any) -> tuple[int, ...] | None:
        value = _value(node)
        if not isinstance(value, torch.Tensor):
            return None
        sizes = [s.node.expr.subs(self.symbols) if isinstance(s, torch.SymInt) else s for s in value.shape]
        return tuple(int(s) for s in sizes) if all(isinstance(s, int) or s.is_Integer for s in sizes) else None

    def tensor_inputs(self, node: fx.Node) -> list[int]:
        """The graph nodes of the tensors ``node`` reads, in argument order (nested lists flattened)."""
        skipped = _METADATA_ARGUMENTS.get(op_name(node))
        names = [spec.name for spec in node.target._schema.arguments] if skipped else []  # type: ignore[union-attr]
        arguments = [a for i, a in enumerate(node.args) if i >= len(names) or names[i] != skipped]
        keywords = {k: v for k, v in node.kwargs.items() if k != skipped}
        leaves = pytree.tree_leaves((arguments, keywords))
        return [self.index[a] for a in leaves if isinstance(a, fx.Node) and a in self.index]

    def sharing(self, attribute: fx.Node, what: str, layer: str) -> str | None:
        """Why the stored tensor read by ``attribute`` must not change: read elsewhere too, or an alias."""
        target = str(attribute.target)
        if self.readers.get(target, 0) != 1:
            return (
                f"the {what} '{target}' of the layer '{layer}' is also read by another node of the program; folding "
                f"would change that use too"
            )
        tensor = _fetch(self.module, target)
        others = [n for n in self.aliases.get(id(tensor), [target]) if n != target]
        if others:
            return f"the layer '{layer}' shares its {what} '{target}' with '{others[0]}'"
        return None

    def label(self, node: fx.Node, name: str) -> str:
        if name in _DECOMPOSED_LINEAR:
            return (
                f"the operation aten.{name} (%{node.name}, a linear layer after run_decompositions(), which bnfold "
                f"does not fold into: fold the program before run_decompositions())"
            )
        return f"the operation aten.{name} (%{node.name})" if name else f"the operation {node.target} (%{node.name})"

    def add_unit(self, node: fx.Node, name: str) -> None:
        """A layer or norm call: its unit, named after the module path of its state (made unique by the node's name
        when a module, or a tensor the model owns directly, is called at several nodes), and its node, reading its
        input and any weight or statistic the program computes."""
        held = ("weight",) if name in _LAYERS else ("running_mean", "weight")
        stored = next((a for a in (_argument(node, h) for h in held) if _is_stored(a)), None)
        owner = str(stored.target).rpartition(".")[0] if stored is not None else ""
        unit = node.name if not owner else owner if owner not in self.graph.units else f"{owner}@{node.name}"
        source, output = node.args[0], node
        if name in _LAYERS:
            layer, site = _layer_facts(node, name, unit, self)
            self.graph.add_unit(unit, LAYER, f"aten.{name}", layer=layer)
            self.layers[unit], kind, tensors = site, LAYER, (site.weight, site.bias)
        else:
            norm, norm_site = _norm_facts(node, name, self.module, self.shape(source))
            self.graph.add_unit(unit, NORM, f"aten.{name}", norm=norm)
            self.norms[unit], kind, tensors, output = norm_site, NORM, norm_site.statistics, norm_site.output
        computed = [self.index[a] for a in tensors if isinstance(a, fx.Node) and not _is_stored(a) and a in self.index]
        inputs = ([self.index[source]] if isinstance(source, fx.Node) and source in self.index else []) + computed
        self.index[node] = self.index[output] = self.graph.add_node(
            kind, f"'{unit}' (aten.{name}, %{node.name})", inputs, shape=self.shape(output), unit=unit).index

    def arithmetic_facts(self, node: fx.Node, name: str) -> tuple[OpFacts, list[int]]:
        """``aten.add`` / ``sub`` / ``rsub`` / ``mul`` / ``neg`` / ``div`` (and their in-place forms) in the core's
        terms (:func:`~bnfold.core.arithmetic.linear_combination`), with their operands in the order the op combines
        them (:class:`~bnfold.core.graph.Operand`; a stored tensor also by its target), and the node's inputs; or
        ``other`` with every tensor it reads. A product that changes the scaled tensor's dtype is no scale of it; an
        in-place form is arithmetic only when the tensor it overwrites is its own (:func:`_overwritable`).
        """
        other = OpFacts("other"), self.tensor_inputs(node)
        if getattr(node.target, "_overloadname", "") not in ("Tensor", "Scalar", "default"):
            return other
        kind = _ARITHMETIC[name]
        if name.startswith("neg"):
            values: list[Any] = [_argument(node, "self"), -1.0]
        else:
            values = [_argument(node, "self"), _argument(node, "other")]
            if name == "rsub":
                values.reverse()
        alpha = 1 if kind in ("mul", "div") else _argument(node, "alpha")
        operands: list[Operand] = []
        inputs: list[int] = []
        scaled: list[fx.Node] = []
        for value in values:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                operands.append(Operand(number=float(value)))
                continue
            if not isinstance(value, fx.Node) or value not in self.index or not isinstance(_value(value), torch.Tensor):
                return other  # a size symbol, a list, ...
            constant = _constant_of(value)
            if constant is None:
                scaled.append(value)
            zero = constant is not None and kind in ("add", "sub") and not torch.any(_fetch(self.module, constant))
            operands.append(Operand(input=len(inputs), constant=constant, shape=self.shape(value), zero=bool(zero)))
            inputs.append(self.index[value])
        if kind in ("mul", "div") and len(scaled) == 1 and _value(scaled[0]).dtype != _value(node).dtype:
            return other
        if name.endswith("_") and not _overwritable(node, self.order):
            return other
        facts = linear_combination(kind, operands, alpha=1 if alpha is None else alpha, shape=self.shape(node))
        return (facts, inputs) if facts.kind != "other" else other

    def translate(self) -> None:
        for node in self.module.graph.nodes:
            if node.op == "placeholder":
                self.index[node] = self.graph.add_node(INPUT, "a program input", shape=self.shape(node)).index
            elif node.op == "get_attr":
                self.index[node] = self.graph.add_node(
                    CONSTANT, f"the stored tensor '{node.target}'", shape=self.shape(node)).index
            elif node.op == "output":
                self.graph.add_node(OUTPUT, "the program output", self.tensor_inputs(node))
            elif node in self.index or _is_metadata(node):
                continue  # a getitem 0 already standing for its norm; a shape query
            elif node.target is operator.getitem and node.args[0] in self.index and op_name(node.args[0]) in _TUPLE_VALUED \
                    and node.args[1] == 0:
                self.index[node] = self.index[node.args[0]]
            else:
                name = op_name(node)
                if name in _LAYERS or name in _NORMS:
                    self.add_unit(node, name)
                    continue
                if name in _ARITHMETIC:
                    facts, inputs = self.arithmetic_facts(node, name)
                else:
                    facts = _op_facts(node, name) if node.op == "call_function" else OpFacts("other")
                    inputs = self.tensor_inputs(node)
                self.index[node] = self.graph.add_node(
                    OP, self.label(node, name), inputs, shape=self.shape(node), op=facts).index
        for fx_node, index in self.index.items():
            self.nodes.setdefault(index, []).append(fx_node)


def to_graph(module: fx.GraphModule) -> ExportedGraph:
    """The core graph of an unlifted program module (``program.module()``)."""
    return ExportedGraph(module)


# --------------------------------------------------------------------------------------------- writing back


def _replace(module: nn.Module, target: str, value: torch.Tensor, like: torch.Tensor | None) -> None:
    """Store ``value`` at ``target`` as a parameter (or a buffer, when ``like`` is one), keeping ``requires_grad``.

    A new object, never an in-place change: the program the module was unlifted from shares its tensors.
    """
    owner_name, _, name = target.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if like is None or isinstance(like, nn.Parameter):
        requires_grad = True if like is None else like.requires_grad
        if hasattr(owner, name) and name not in owner._parameters:
            delattr(owner, name)
        owner.register_parameter(name, nn.Parameter(value, requires_grad=requires_grad))
    elif name in owner._buffers:
        owner._buffers[name] = value
    else:
        setattr(owner, name, value)


def _free_name(module: nn.Module, owner: str, name: str) -> str:
    prefix = f"{owner}." if owner else ""
    parent = module.get_submodule(owner) if owner else module
    candidate, number = name, 0
    while hasattr(parent, candidate):
        number += 1
        candidate = f"{name}_{number}"
    return prefix + candidate


class ExportedWeights:
    """:class:`bnfold.core.apply.WeightAccess` on an unlifted program module."""

    numerics = TorchNumerics()

    def __init__(self, exported: ExportedGraph) -> None:
        self.exported = exported
        self.module = exported.module
        self.removed_state: list[str] = []

    def statistics(self, norm: str) -> Statistics:
        site = self.exported.norms[norm]
        gamma, beta, mean, var = (None if n is None else _fetch(self.module, str(n.target)) for n in site.statistics)
        assert mean is not None and var is not None  # a norm without running statistics is never planned
        return Statistics(mean, var, site.eps, gamma, beta)

    def read(self, layer: str) -> LayerTensors:
        site = self.exported.layers[layer]
        bias = None if site.bias is None else _fetch(self.module, str(site.bias.target))
        return LayerTensors(_fetch(self.module, str(site.weight.target)), bias, site.out_axis, site.groups)

    def write(self, layer: str, weight: torch.Tensor, bias: torch.Tensor) -> None:
        site = self.exported.layers[layer]
        old_weight = _fetch(self.module, str(site.weight.target))
        _replace(self.module, str(site.weight.target), weight.contiguous(), old_weight)
        if site.bias is not None:
            target = str(site.bias.target)
            _replace(self.module, target, bias.contiguous(), _fetch(self.module, target))
            return
        owner = str(site.weight.target).rpartition(".")[0]
        target = _free_name(self.module, owner, "bias")
        _replace(self.module, target, bias.contiguous(), old_weight if isinstance(old_weight, nn.Parameter) else None)
        with self.module.graph.inserting_before(site.node):
            site.bias = self.module.graph.get_attr(target)
        _set_argument(site.node, "bias", site.bias)

    def constant(self, name: str) -> torch.Tensor:
        """The stored tensor ``name`` (a layer scale a merge multiplies a term by: a parameter, a buffer, a lifted
        constant), for :func:`bnfold.core.apply.merge_one`."""
        return _fetch(self.module, name).detach()

    def remove_norm(self, norm: str) -> None:
        site = self.exported.norms[norm]
        site.output.replace_all_uses_with(site.node.args[0])
        graph = self.module.graph
        if site.output is not site.node:
            graph.erase_node(site.output)
        for user in list(site.node.users):  # getitem nodes of unused outputs
            if not user.users:
                graph.erase_node(user)
        graph.erase_node(site.node)
        self.removed_state.extend(str(n.target) for n in site.statistics if n is not None)


def _delete_unused(module: fx.GraphModule, targets: list[str]) -> None:
    """Delete the folded norms' state no node reads any more (and their ``num_batches_tracked`` counters)."""
    read = {node.target for node in module.graph.nodes if node.op == "get_attr"}
    owners = {t.rpartition(".")[0] for t in targets}
    candidates = list(dict.fromkeys(targets + [f"{o}.num_batches_tracked" if o else "num_batches_tracked" for o in owners]))
    for target in candidates:
        owner_name, _, name = target.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if target not in read and hasattr(owner, name):
            delattr(owner, name)


# ------------------------------------------------------------------------------------------------- the driver


class ExportedBackend:
    """:class:`bnfold.core.pipeline.FoldBackend` for an unlifted program module (``program.module()``, a copy): the
    folds replace its tensors and erase the norms' nodes. Counts before are the program's; after, the caller counts
    the program exported again."""

    exported = True
    measures_counts = True

    def __init__(self, module: fx.GraphModule, name: str, program: torch.export.ExportedProgram | None = None) -> None:
        self.module, self.name, self.program = module, name, program
        self.exported_graph = to_graph(module)  # norm_modes() reads it too, before translate()
        self.access = ExportedWeights(self.exported_graph)

    def norm_modes(self) -> NormModes:
        sites = [site for site in self.exported_graph.norms.values() if site.statistics[2] is not None]
        return NormModes(len(sites), sum(site.training for site in sites))

    def translate(self) -> Graph:
        return self.exported_graph.graph

    def weights(self) -> ExportedWeights:
        return self.access

    def counts(self) -> tuple[int, int]:
        if self.program is None:
            return 0, 0
        return parameter_count(self.program), sum(b.numel() for b in self.program.buffers())

    def released(self, norm: str) -> tuple[int, int]:
        """Its affine parameters, when nothing else reads them, and its running statistics."""
        stats, site = self.access.statistics(norm), self.exported_graph.norms[norm]
        affine = [t.numel() for t, n in zip((stats.gamma, stats.beta), site.statistics, strict=False)
                  if isinstance(t, nn.Parameter) and self.exported_graph.readers[str(n.target)] == 1]
        return sum(affine), int(stats.mean.numel() + stats.var.numel())

    def lacks_bias(self, layer: str) -> bool:
        return self.exported_graph.layers[layer].bias is None

    def finish(self) -> None:
        self.module.graph.eliminate_dead_code()
        _delete_unused(self.module, self.access.removed_state)
        self.module.recompile()


def plan_exported(program: torch.export.ExportedProgram, *, name: str = "exported program") -> FoldReport:
    """Dry run: the report of what :func:`fold_exported` would do, without folding anything.

    Raises:
        TrainingModeError: the program was exported in training mode.
        NonFiniteStatisticsError: a norm that would fold has NaN or infinite statistics.
    """
    with torch.no_grad():
        return pipeline.dry_run(ExportedBackend(program.module(), name, program)).report


def _translation(module: fx.GraphModule) -> Translation:
    exported = to_graph(module)
    return exported.graph, exported.nodes, ExportedWeights(exported)


def _merge(module: fx.GraphModule, report: FoldReport) -> None:
    """Merge the summed branches of the folded ``module`` in place (:mod:`bnfold.backends.exported_merges`),
    folding what each round makes foldable; ``report`` gets the blocks, and the norms folded or absorbed on the way."""

    def fold_again(current: fx.GraphModule) -> FoldPlan:
        planned, entries = pipeline.refold(ExportedBackend(current, report.model))
        report.absorb_merged_norms({}, entries)
        return planned.made()

    merges = ExportedMerges(module, _translation, fold_again)
    with torch.no_grad():
        outcome = merge_rounds(merges)
    _delete_unused(module, merges.removed_state)
    module.recompile()
    report.absorb_merged_norms(outcome.absorbed_norms)
    report.merges = outcome.entries


def fold_exported(
    program: torch.export.ExportedProgram,
    *,
    example_inputs: Any = None,
    name: str = "exported program",
    merge_branches: bool = False,
) -> tuple[torch.export.ExportedProgram, FoldReport]:
    """Fold every foldable batch norm of a torch.export program; returns ``(folded program, report)``.

    The decisions are the core planner's (:mod:`bnfold.core.plan`), the same as for the ``nn.Module`` it was exported
    from. ``example_inputs`` (a tensor or a tuple) are used to export the folded module again; by default the
    program's own. The caller's program is not changed (``program.module()`` is a copy, and tensors are replaced,
    never changed in place).

    With ``merge_branches=True`` the folded graph's re-parameterisable blocks (``conv3x3(x) + conv1x1(x) + BN(x)``)
    are then merged into one convolution each, as ``bnfold.fold(module, x, merge_branches=True)`` merges them
    (:mod:`bnfold.core.merge`); ``report.merges`` lists every block merged or left, with the reason. The merged
    program is an ordinary ``ExportedProgram``: what the merges removed is gone from its state_dict and graph
    signature.

    Raises:
        TrainingModeError: the program was exported in training mode.
        NonFiniteStatisticsError: a norm that would fold has NaN or infinite statistics.
        InvalidInputError: no example inputs to export the folded module again.
        CaptureError: exporting the folded module again failed.
    """
    args, kwargs = _example_inputs(program, example_inputs)
    backend = ExportedBackend(program.module(), name, program)
    with torch.no_grad():
        report = pipeline.fold(backend).report  # counted again once exported again
    module = backend.module
    if merge_branches:
        _merge(module, report)
    dynamic_shapes = dynamic_shapes_of(program)
    if dynamic_shapes is None and any(
        isinstance(d, torch.SymInt) for shape in _user_input_shapes(program) if shape for d in shape
    ):
        report.notes.append("the program's dynamic dimensions were not kept (keyword inputs); it was exported with static shapes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            folded = torch.export.export(module, args, kwargs, dynamic_shapes=dynamic_shapes)
    except Exception as error:  # torch.export raises many types (UserError, GuardOnDataDependentSymNode, ...)
        raise CaptureError(
            f"exporting the folded program again failed ({first_line(error)}); check that the example inputs match the program, "
            "or fold the nn.Module with bnfold.fold and export that"
        ) from error
    report.parameters_after = parameter_count(folded)
    report.buffers_after = sum(b.numel() for b in folded.buffers())
    return folded, report


# ------------------------------------------------------------------------------- program inputs and shapes


def _user_input_shapes(program: torch.export.ExportedProgram) -> list[tuple[Any, ...] | None]:
    names = set(program.graph_signature.user_inputs)
    return [
        tuple(node.meta["val"].shape) if isinstance(node.meta.get("val"), torch.Tensor) else None
        for node in program.graph.nodes if node.op == "placeholder" and node.name in names
    ]


def dynamic_shapes_of(program: torch.export.ExportedProgram) -> tuple[Any, ...] | None:
    """The ``dynamic_shapes`` that reproduce the program's dynamic dimensions (with their ranges), or ``None``.

    Only positional inputs are handled (a program with keyword inputs gets ``None``, with its shapes static).
    """
    dims: dict[str, Any] = {}
    leaves = [{axis: _dim(size, program, dims) for axis, size in enumerate(shape or ()) if isinstance(size, torch.SymInt)}
              or None for shape in _user_input_shapes(program)]
    if not any(leaves):
        return None
    args, kwargs = pytree.tree_unflatten(leaves, program.call_spec.in_spec)
    return None if kwargs else tuple(args)


def _dim(size: torch.SymInt, program: torch.export.ExportedProgram, dims: dict[str, Any]) -> Any:
    expr = size.node.expr
    if not expr.is_Symbol:
        return torch.export.Dim.DYNAMIC
    name = str(expr)
    if name not in dims:
        bounds = program.range_constraints.get(expr)
        low = int(bounds.lower) if bounds is not None and bounds.lower.is_finite else None
        high = int(bounds.upper) if bounds is not None and bounds.upper.is_finite else None
        dims[name] = torch.export.Dim(f"d_{name}", min=low, max=high)
    return dims[name]


def _example_inputs(program: torch.export.ExportedProgram, given: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if given is not None:
        return (given if isinstance(given, tuple) else (given,)), {}
    stored = getattr(program, "example_inputs", None)
    if stored is None:
        raise InvalidInputError(
            "the exported program carries no example inputs (torch.export.load of an older file, or they were dropped); "
            "pass example_inputs= (a tensor or a tuple of them), or --input-shape on the command line"
        )
    args, kwargs = stored
    return tuple(args), dict(kwargs)


def parameter_count(program: torch.export.ExportedProgram) -> int:
    """Trainable parameters of the program (buffers excluded), as the report counts them."""
    return sum(p.numel() for p in program.parameters())


def _allowed(program: torch.export.ExportedProgram, size: Any, value: int) -> bool:
    """Whether a program exported with dimension ``size`` (an int, or a symbol with a range) accepts ``value``."""
    if not isinstance(size, torch.SymInt):
        return int(size) == value
    bounds = program.range_constraints.get(size.node.expr)
    return bounds is None or (bounds.lower <= value and (not bounds.upper.is_finite or value <= bounds.upper))


def check_input_shape(program: torch.export.ExportedProgram, shape: tuple[int, ...]) -> None:
    """Refuse an input shape the program's guards would reject, naming the shapes it accepts."""
    expected = next(iter(_user_input_shapes(program)), None)
    if expected is None:
        return
    if len(expected) != len(shape) or not all(_allowed(program, s, v) for s, v in zip(expected, shape, strict=False)):
        accepted = ", ".join(str(s) if not isinstance(s, torch.SymInt) else "*" for s in expected)
        raise InvalidInputError(
            f"the program was exported for inputs of shape ({accepted}), not {tuple(shape)}; pass a matching "
            "--input-shape, or export it with dynamic_shapes for the dimensions that vary"
        )


def check_batch_sizes(program: torch.export.ExportedProgram, batch_sizes: tuple[int, ...]) -> None:
    """Refuse batch sizes outside what the program's first input accepts (a static batch accepts one size)."""
    expected = next(iter(_user_input_shapes(program)), None)
    if not expected:
        return
    refused = [b for b in batch_sizes if not _allowed(program, expected[0], b)]
    if refused:
        raise InvalidInputError(
            f"the program was exported with batch dimension {expected[0]}, which does not accept batch sizes "
            f"{refused}; pass matching --batch-sizes, or export it with a dynamic batch (dynamic_shapes)"
        )


__all__ = [
    "ExportedGraph", "ExportedWeights", "check_batch_sizes", "check_input_shape", "dynamic_shapes_of",
    "fold_exported", "parameter_count", "plan_exported", "to_graph",
]
