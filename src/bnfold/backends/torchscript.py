"""The TorchScript adapter: a frozen JIT graph translated into the core graph (:func:`to_graph`), and the core's
folds written back into that graph's constants (:class:`ScriptWeights`); branch merges are written by
:mod:`bnfold.backends.script_merges`.

A TorchScript archive carries no Python classes to rebuild, so the module tree cannot be folded: the model is
frozen instead (:func:`freeze`: submodule calls inlined, weights turned into graph constants; a module called at two
sites is inlined twice, so each call can absorb its own norm). The result keeps only ``forward``; parameter counts
are projected from the original's ``parameters()``, as for an ``nn.Module``.

Constants are never changed in place (the frozen graph may share their storage with the caller's module), so a
constant read by several nodes is no ``problem`` here, unlike a parameter shared by two modules: the folded layer
gets constants of its own and every other reader keeps the old value. (Freezing also merges constants that are
merely *equal*, such as a conv's zero bias and a fresh norm's zero beta, so refusing shared constants would refuse
ordinary models.)
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from ..core import pipeline
from ..core.apply import LayerTensors, Statistics
from ..core.arithmetic import linear_combination
from ..core.commuting import ARITHMETIC_KINDS as _ARITHMETIC_KINDS
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
from ..errors import InvalidInputError
from ..report import FoldReport, NormEntry
from .aten_facts import ARITHMETIC, LAYERS, OP_KINDS, aten_pad_facts, layer_geometry, op_kind
from .capture import as_input_tuple
from .modules import TorchNumerics, norm_modes
from .script_merges import ScriptMerges

CAPTURE = "torchscript graph"

# ------------------------------------------------------------------------------------------- the facts table

# Linear layers: ATen op -> how its weight is laid out (:data:`~.aten_facts.LAYERS`); ``_convolution_mode`` is
# what tracing records of a convolution with a string padding ("same" / "valid"; scripting keeps ``conv2d``).
_LAYERS = {f"aten::{name}": layout
           for name, layout in {**LAYERS, "_convolution": "convolution", "_convolution_mode": "conv"}.items()}

_NORM = "aten::batch_norm"

_OP_KINDS: dict[str, str] = {f"aten::{name}": kind for name, kind in {
    **OP_KINDS, **ARITHMETIC, **dict.fromkeys(("squeeze", "squeeze_"), "squeeze"),
    **dict.fromkeys(("unsqueeze", "unsqueeze_"), "unsqueeze"),
}.items()}
_NEGATIONS = frozenset({"aten::neg", "aten::neg_", "aten::negative"})
_IN_PLACE_ARITHMETIC = frozenset({"aten::add_", "aten::sub_", "aten::mul_", "aten::neg_"})
"""In-place additions, subtractions and products: arithmetic only where the tensor they overwrite is their own."""

# Uses that read only a tensor's metadata, which folding does not change (a norm's input-rank check reads dim()).
_METADATA_READS = frozenset({
    "aten::dim", "aten::size", "aten::sizes", "prim::shape", "aten::numel", "prim::dtype", "prim::device",
    "prim::layout", "prim::is_cuda", "aten::is_floating_point", "aten::len", "aten::__is__", "aten::__isnot__",
})
# Containers: a reader of the container reads its elements.
_CONTAINERS = frozenset({"prim::ListConstruct", "prim::TupleConstruct"})

_NOT_CONSTANT = object()


def _constant(value: Any) -> Any:
    """The value of a ``prim::Constant`` argument, or ``_NOT_CONSTANT``."""
    node = value.node()
    return node.output().toIValue() if node.kind() == "prim::Constant" else _NOT_CONSTANT


def _ints(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
        return tuple(value)
    return None


def _op_facts(node: Any, shape_of: Any) -> OpFacts:
    """The core's name and attributes of one JIT op (see :class:`bnfold.core.graph.OpFacts`)."""
    name = node.kind()
    kind = op_kind(_OP_KINDS, name) or "other"
    inputs = list(node.inputs())
    if kind == "dropout":
        training = _constant(inputs[2])
        return OpFacts(kind, {"training": training if isinstance(training, bool) else None})
    if kind == "avg_pool":
        padding = _ints(_constant(inputs[3]))
        include = _constant(inputs[5])
        divisor = _constant(inputs[6]) if len(inputs) > 6 else None
        if padding is None or not isinstance(include, bool) or divisor is _NOT_CONSTANT:
            return OpFacts("other")
        return OpFacts(kind, {"padding": padding, "count_include_pad": include, "divisor_override": divisor})
    if kind == "max_pool":
        # the *_with_indices and adaptive variants also output indices: a problem only when something reads them
        indices_read = any(_real_uses(output) for output in list(node.outputs())[1:])
        return OpFacts(kind, {"return_indices": indices_read})
    if kind == "mean":
        if len(inputs) < 3:
            return OpFacts(kind, {"dims": None, "keepdim": False})
        dims, keepdim = _constant(inputs[1]), _constant(inputs[2])
        if not isinstance(keepdim, bool) or (dims is not None and _ints(dims) is None):
            return OpFacts("other")
        return OpFacts(kind, {"dims": None if dims is None or dims == [] else _ints(dims), "keepdim": keepdim})
    if kind == "permute":
        order = _ints(_constant(inputs[1]))
        return OpFacts("other") if order is None else OpFacts(kind, {"order": order})
    if kind == "transpose":
        dims = (_constant(inputs[1]), _constant(inputs[2]))
        return OpFacts("other") if _ints(list(dims)) is None else OpFacts(kind, {"dims": dims})
    if kind == "concat":
        axis = _constant(inputs[1])
        return OpFacts(kind, {"axis": axis if isinstance(axis, int) and not isinstance(axis, bool) else None})
    if kind == "pad":
        mode, shape = _constant(inputs[2]) if name == "aten::pad" else None, shape_of(inputs[0])
        return aten_pad_facts(name.removeprefix("aten::"), mode if isinstance(mode, str) else "unknown",
                              _ints(_constant(inputs[1])), None if shape is None else len(shape))
    if kind in ("squeeze", "unsqueeze"):
        if len(inputs) < 2:
            return OpFacts(kind, {"dims": None})
        dims = _ints(_constant(inputs[1]))
        return OpFacts("other") if dims is None else OpFacts(kind, {"dims": dims})
    if kind in _ARITHMETIC_KINDS:
        return _arithmetic_facts(node, shape_of)
    return OpFacts(kind)


def _computed(value: Any) -> bool:
    """A tensor the graph computes (not a ``prim::Constant``): what the core node of an op reads."""
    return _is_tensor(value) and _constant(value) is _NOT_CONSTANT


def _arithmetic_facts(node: Any, shape_of: Any) -> OpFacts:
    """``aten::add`` / ``sub`` / ``rsub`` / ``mul`` / ``neg`` / ``div`` (and their in-place forms) in the core's terms
    (the core decides: :func:`~bnfold.core.arithmetic.linear_combination`), with their operands
    (:class:`~bnfold.core.graph.Operand`) in the order the op computes them: a computed tensor by its position among
    the JIT node's computed tensor inputs (``y + y`` is two inputs); a number or a 0-d constant tensor (what tracing
    makes of ``x * 0.5``) as its number; another constant tensor by its JIT value, ``%name``
    (:meth:`ScriptWeights.constant` reads it). ``other`` where an operand is none of these, or a complex or boolean
    constant. An in-place form is arithmetic only when it writes into a fresh tensor nobody else reads
    (:func:`_private_result`), so that computing the result elsewhere changes no other reader's value.
    """
    name = node.kind()
    kind = _OP_KINDS[name]
    inputs = list(node.inputs())
    values: list[Any]
    alpha: Any = 1
    if name in _NEGATIONS:
        if len(inputs) != 1:
            return OpFacts("other")
        values = [inputs[0], -1.0]
    else:
        if kind == "div" and len(inputs) == 3 and _constant(inputs[2]) is None:
            inputs = inputs[:2]  # rounding_mode=None: a true division
        if len(inputs) != (2 if kind in ("mul", "div") else 3):
            return OpFacts("other")
        values = inputs[:2] if name != "aten::rsub" else [inputs[1], inputs[0]]
        if kind not in ("mul", "div"):
            alpha = _constant(inputs[2])
    if name in _IN_PLACE_ARITHMETIC and not _private_result(inputs[0]):
        return OpFacts("other")
    computed = [value for value in inputs if _computed(value)]
    operands: list[Operand] = []
    for value in values:
        constant = value if isinstance(value, float) else _constant(value)  # (-1.0: neg's factor)
        if constant is _NOT_CONSTANT:
            if not _is_tensor(value):
                return OpFacts("other")
            taken = {o.input for o in operands}  # ``y + y``: the second operand is the second input
            operands.append(Operand(input=next(i for i, v in enumerate(computed)
                                               if v.unique() == value.unique() and i not in taken),
                                    shape=shape_of(value)))
        elif isinstance(constant, (int, float)) and not isinstance(constant, bool):
            operands.append(Operand(number=float(constant)))
        elif isinstance(constant, torch.Tensor):
            if constant.dtype == torch.bool or constant.is_complex():
                return OpFacts("other")
            if constant.dim() == 0:
                operands.append(Operand(number=float(constant)))
                continue
            operands.append(Operand(constant=f"%{value.debugName()}", shape=tuple(constant.shape),
                                    zero=not bool(torch.any(constant))))
        else:
            return OpFacts("other")
    return linear_combination(kind, operands, alpha=alpha, shape=shape_of(node.output()))


def _private_result(value: Any) -> bool:
    """Whether ``value`` is a new tensor (a layer's, a norm's, or an addition's, subtraction's or product's) that
    only the in-place op writing into it reads, so that an in-place write into it is seen by nobody else."""
    if len(_real_uses(value)) != 1:
        return False
    producer = value.node()
    kind = producer.kind()
    if kind in _LAYERS or kind == _NORM or (kind in _OP_KINDS and _OP_KINDS[kind] in _ARITHMETIC_KINDS
                                            and kind not in _IN_PLACE_ARITHMETIC):
        return True
    return kind in _IN_PLACE_ARITHMETIC and _private_result(producer.inputsAt(0))


def _real_uses(value: Any) -> list[Any]:
    return [use for use in value.uses() if use.user.kind() not in _METADATA_READS]


def _is_tensor(value: Any) -> bool:
    return isinstance(value.type(), torch._C.TensorType)


# ---------------------------------------------------------------------------------------------- freezing


def freeze(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """Freeze a copy of ``module`` (``torch._C._freeze_module``) without ``torch.jit.freeze``'s optimisation passes:
    they fold conv + BN themselves, silently and without a report."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frozen = torch.jit.RecursiveScriptModule(torch._C._freeze_module(module._c, []))
        torch.jit.RecursiveScriptModule._finalize_scriptmodule(frozen)
    return frozen


def _recorded_shapes(frozen: torch.jit.ScriptModule, inputs: tuple[Any, ...]) -> dict[int, tuple[int, ...]]:
    """The shape of every tensor the top-level block computes, from one run on ``inputs``: position of the node in
    the block -> shape of its first output.

    A copy of the graph returns every such tensor as an extra output; the frozen module itself is not changed.
    """
    graph = frozen.graph.copy()
    recorded = [(position, node.outputsAt(0)) for position, node in enumerate(graph.nodes())
                if node.kind() != "prim::Constant" and node.outputsSize() and _is_tensor(node.outputsAt(0))]
    for _, value in recorded:
        graph.registerOutput(value)
    graph.makeMultiOutputIntoTuple()
    function = torch._C._create_function_from_graph("bnfold_record_shapes", graph)
    try:
        with torch.no_grad():
            results = function(frozen._c, *inputs)
    except Exception as error:
        first = (str(error).strip().splitlines() or [""])[0]
        raise InvalidInputError(
            f"the example inputs do not run through the TorchScript model ({type(error).__name__}: {first}); pass "
            f"inputs of the shape and dtype its forward expects"
        ) from error
    extra = results[len(results) - len(recorded):]
    return {position: tuple(t.shape) for (position, _), t in zip(recorded, extra, strict=True) if isinstance(t, torch.Tensor)}


# -------------------------------------------------------------------------------------------- translation


_HIERARCHY_PART = re.compile(r"([^.()]+)\(([^()]*)\)")


def _module_path(node: Any) -> tuple[str, str]:
    """``(path, class name)`` of the module whose code made ``node`` (``("layer1.0.bn1", "BatchNorm2d")``); ``("", "")``
    when unknown.

    A traced graph keeps each node's scope, whose innermost part is the module's full name. The inlined call stack
    (what a scripted graph keeps) names the modules that were *called*, so it skips containers that are only
    iterated or indexed (``nn.ModuleList``, ``nn.ModuleDict``: ``stages.0.1.0.conv`` for
    ``stages.0.1.conv_kxk.0.conv``); it gives the class name, and the path where there is no scope (see
    :meth:`_Translation.unit_name` for how a layer's own constants complete it).
    """
    try:
        hierarchy = node.getModuleHierarchy()
    except Exception:  # older torch: no call stack on the node
        hierarchy = ""
    called = [(name, kind) for name, kind in _HIERARCHY_PART.findall(hierarchy or "")
              if name not in ("SELF", "UNKNOWN_INSTANCE")]
    return _traced_scope(node) or ".".join(name for name, _ in called), called[-1][1] if called else ""


def _traced_scope(node: Any) -> str:
    """The full name of the module whose code made ``node`` in a traced graph, or ``""``."""
    innermost = (node.scopeName() or "").rsplit("/", 1)[-1]
    return innermost.removeprefix("__module.") if innermost.startswith("__module.") else ""


# Where a layer's / norm's constants are in its arguments, and the attribute names freezing gives them.
_LAYER_TENSORS = ((1, ".weight"), (2, ".bias"))
_NORM_TENSORS = ((3, ".running_mean"), (4, ".running_var"), (1, ".weight"), (2, ".bias"))


def _completes(full: str, called: str) -> bool:
    """Whether ``full`` is ``called`` with the containers the call stack skips put back: the names of ``called`` in
    order among those of ``full``, ending with the same one."""
    remaining = iter(full.split("."))
    parts = called.split(".")
    return full.split(".")[-1] == parts[-1] and all(part in remaining for part in parts)


def _attribute_path(value: Any, suffix: str) -> str:
    """``"conv"`` from a frozen constant named ``self.conv.weight``; ``""`` when the name does not say."""
    name = value.debugName() if value.node().kind() == "prim::Constant" else ""
    if name.startswith("self.") and name.endswith(suffix):
        return name.removeprefix("self.").removesuffix(suffix)
    return ""


def _groups_transposed(node: Any) -> tuple[Any, Any]:
    """A layer node's groups and whether it is transposed (``_NOT_CONSTANT`` where the graph computes them)."""
    layout = _LAYERS[node.kind()]
    groups = 1 if layout == "linear" else _constant(node.namedInput("groups"))
    return groups, _constant(node.namedInput("transposed")) if layout == "convolution" else layout == "conv_transpose"


def _layer_facts(node: Any, name: str) -> LayerFacts:
    """What the planner needs of a layer node ``name``: its weight, bias and groups must be graph constants."""
    kind = node.kind()
    weight, bias = _constant(node.inputsAt(1)), _constant(node.inputsAt(2))
    if not isinstance(weight, torch.Tensor):
        return LayerFacts(0, 0, 1, problem=f"the weight of '{name}' is not a constant of the frozen graph")
    groups, transposed = _groups_transposed(node)
    if not isinstance(groups, int) or not isinstance(transposed, bool):
        return LayerFacts(0, 0, 1, problem=f"the groups of '{name}' are not a constant of the frozen graph")
    out_axis = 1 if transposed else 0
    channel_dim = -1 if kind == "aten::linear" else 1
    if weight.dim() < 2:
        return LayerFacts(0, 0, channel_dim, problem=f"the weight of '{name}' is not a matrix or a kernel")
    out_channels, in_channels = weight_channels(tuple(int(n) for n in weight.shape), out_axis, groups)
    problem = None
    if not weight.is_floating_point():
        problem = f"the layer '{name}' has no floating-point weight to fold into"
    elif bias is _NOT_CONSTANT or not (bias is None or isinstance(bias, torch.Tensor)):
        problem = f"the bias of '{name}' is not a constant of the frozen graph"
    geometry = Geometry() if kind == "aten::linear" else layer_geometry(
        tuple(weight.shape), *(_constant(node.namedInput(a)) for a in ("stride", "padding", "dilation")), groups,
        transposed)
    return LayerFacts(out_channels, in_channels, channel_dim, problem=problem, geometry=geometry,
                      input_padding=PADDING_UNKNOWN if geometry is None else None)


def _norm_facts(node: Any) -> NormFacts:
    """What the planner needs of an ``aten::batch_norm`` node: its statistics and flags must be graph constants."""
    inputs = list(node.inputs())
    gamma, beta, mean, var = (_constant(v) for v in inputs[1:5])
    training, eps = _constant(inputs[5]), _constant(inputs[7])
    channels = int(mean.numel()) if isinstance(mean, torch.Tensor) else 0
    if training is True:
        return NormFacts(channels, batch_statistics=NO_RUNNING_STATISTICS if mean is None else IN_TRAINING_MODE)
    if training is not False:
        return NormFacts(channels, problem="its training flag is not a constant of the frozen graph")
    if not isinstance(mean, torch.Tensor) or not isinstance(var, torch.Tensor) or not isinstance(eps, float):
        return NormFacts(channels, problem="its running statistics are not constants of the frozen graph")
    if any(p is _NOT_CONSTANT or not (p is None or isinstance(p, torch.Tensor)) for p in (gamma, beta)):
        return NormFacts(channels, problem="its weight or bias is not a constant of the frozen graph")
    negative = 0 if gamma is None else int((gamma.detach() < 0).sum())
    return NormFacts(channels, channel_dim=1, negative_scales=negative)


class _Translation:
    """The core graph of a frozen graph's top-level block (:func:`to_graph`), the names of its units, and where each
    unit lives in the JIT graph."""

    def __init__(self, frozen: torch.jit.ScriptModule, shapes: dict[int, tuple[int, ...]] | None,
                 inputs: tuple[Any, ...] | None, names: dict[int, str] | None) -> None:
        self.jit = frozen.graph
        self.known_names = names or {}
        self.shapes = shapes or {}
        self.inputs = inputs
        self.graph = Graph(method=CAPTURE, shapes_known=shapes is not None)
        self.jit_nodes: dict[str, Any] = {}  # unit name -> its JIT node
        self.node_of: dict[int, Any] = {}  # core index of an op / layer / norm -> its JIT node
        self.value_nodes: dict[int, list[int]] = {}  # JIT value -> the core nodes it stands for (a list: elements)
        self.constants: dict[str, torch.Tensor] = {}  # "%name" -> the constant tensor it holds
        self.shape_of_value: dict[int, tuple[int, ...]] = {}
        self.translate()

    def names(self) -> dict[int, str]:
        """Unit names by the JIT value each unit's node computes (stable while the node lives; read it before a
        fold deletes norm nodes)."""
        return {node.outputsAt(0).unique(): name for name, node in self.jit_nodes.items()}

    # names ------------------------------------------------------------------------------------------------

    def unit_name(self, node: Any, fallback: str) -> tuple[str, str]:
        path, type_name = _module_path(node)
        if node.outputsAt(0).unique() in self.known_names:  # named by an earlier translation of the same graph
            return self.graph.free_name(self.known_names[node.outputsAt(0).unique()]), type_name or node.kind()
        # The name freezing gave a layer's or norm's constants is its full module path, unless the constant was
        # pooled with an equal one of another module (a fresh norm's zero mean): trusted where it agrees with the
        # call stack.
        tensors = _NORM_TENSORS if node.kind() == _NORM else _LAYER_TENSORS
        for at, suffix in tensors if not _traced_scope(node) else ():  # a traced scope is the full name already
            attribute = _attribute_path(node.inputsAt(at), suffix)
            if attribute and (not path or _completes(attribute, path)):
                path = attribute
                break
        return self.graph.free_name(path or fallback), type_name or node.kind()

    # dataflow ---------------------------------------------------------------------------------------------

    def read(self, values: Iterable[Any]) -> list[int]:
        """The core nodes behind JIT ``values`` (a list stands for its elements); untracked values read nothing."""
        return [index for value in values for index in self.value_nodes.get(value.unique(), [])]

    def nested_reads(self, node: Any) -> list[Any]:
        """Every value a node and its sub-blocks read that was defined outside it."""
        values = list(node.inputs())
        for block in node.blocks():
            for inner in block.nodes():
                if inner.kind() not in _METADATA_READS:
                    values.extend(self.nested_reads(inner))
            values.extend(block.returnNode().inputs())
        return values

    def bind(self, node: Any, core_index: int, position: int) -> None:
        self.node_of[core_index] = node
        for output in node.outputs():
            self.value_nodes[output.unique()] = [core_index]
        shape = self.shapes.get(position)
        if shape is not None:
            self.shape_of_value[node.outputsAt(0).unique()] = shape

    def translate(self) -> None:
        graph = self.graph
        jit_inputs = list(self.jit.inputs())[1:]  # the first is the module itself
        for index, value in enumerate(jit_inputs):
            example = self.inputs[index] if self.inputs is not None and index < len(self.inputs) else None
            shape = tuple(example.shape) if isinstance(example, torch.Tensor) else None
            core = graph.add_node(INPUT, "a model input", shape=shape)
            self.value_nodes[value.unique()] = [core.index]
            if shape is not None:
                self.shape_of_value[value.unique()] = shape
        counts = [0, 0]  # layers, norms: a unit without a module path is named by its op and number
        for position, node in enumerate(self.jit.nodes()):
            kind = node.kind()
            outputs = list(node.outputs())
            if kind == "prim::Constant":
                if outputs and _is_tensor(outputs[0]) and isinstance(outputs[0].toIValue(), torch.Tensor):
                    tensor = outputs[0].toIValue()
                    core = graph.add_node(CONSTANT, f"the constant %{outputs[0].debugName()}", shape=tuple(tensor.shape))
                    self.constants[f"%{outputs[0].debugName()}"] = tensor
                    self.value_nodes[outputs[0].unique()] = [core.index]
                continue
            if kind in _METADATA_READS:
                continue
            if kind in _CONTAINERS:
                self.value_nodes[node.output().unique()] = self.read(node.inputs())
                continue
            if kind in _LAYERS or kind == _NORM:
                counts[kind == _NORM] += 1
                self.add_unit(node, position, f"{kind.removeprefix('aten::')}#{counts[kind == _NORM]}")
                continue
            reads = self.read(self.nested_reads(node))
            produces_tensor = any(_is_tensor(o) or "Tensor" in str(o.type()) for o in outputs)
            if not reads and not produces_tensor:
                continue
            facts = _op_facts(node, lambda v: self.shape_of_value.get(v.unique())) if not list(node.blocks()) else OpFacts("other")
            if facts.kind in _ARITHMETIC_KINDS:  # its operands say which computed input each reads
                computed = [v for v in node.inputs() if _computed(v)]
                if all(len(self.value_nodes.get(v.unique(), [])) == 1 for v in computed):
                    reads = self.read(computed)
                else:  # an operand that is no single node of the dataflow: not a term bnfold can place
                    facts = OpFacts("other")
            core = graph.add_node(OP, f"the operation {kind}", reads, shape=self.shapes.get(position), op=facts)
            self.bind(node, core.index, position)
        graph.add_node(OUTPUT, "the model output", self.read(self.jit.return_node().inputs()))
        self.nested_norms()

    def add_unit(self, node: Any, position: int, fallback: str) -> None:
        """A layer or norm node: its unit, and its core node reading its input (and any weight or statistic computed
        in the graph)."""
        name, type_name = self.unit_name(node, fallback)
        if node.kind() == _NORM:
            kind = self.graph.add_unit(name, NORM, type_name, norm=_norm_facts(node)).kind
        else:
            kind = self.graph.add_unit(name, LAYER, type_name, layer=_layer_facts(node, name)).kind
        inputs = list(node.inputs())
        reads = self.read(inputs[:1]) + self.read(v for v in inputs[1:] if v.node().kind() != "prim::Constant")
        core = self.graph.add_node(kind, f"'{name}' ({node.kind()})", reads, shape=self.shapes.get(position), unit=name)
        self.bind(node, core.index, position)
        self.jit_nodes[name] = node

    def nested_norms(self) -> None:
        """Norms inside control flow (a ``prim::If`` / ``prim::Loop`` block): reported, never folded."""
        top = self.jit.block()
        for index, node in enumerate(self.jit.findAllNodes(_NORM)):
            if node.owningBlock() == top:
                continue
            name, type_name = self.unit_name(node, f"batch_norm#{index + 1}")
            facts = dataclasses.replace(_norm_facts(node), problem=(
                "it runs inside control flow (prim::If / prim::Loop) of the TorchScript graph, which bnfold does not "
                "rewrite; fold the nn.Module before scripting it"
            ))
            self.graph.add_unit(name, NORM, type_name, norm=facts)


def to_graph(
    frozen: torch.jit.ScriptModule, example_inputs: tuple[Any, ...] | None = None, names: dict[int, str] | None = None
) -> _Translation:
    """The core graph of a frozen module (shapes recorded from one run on ``example_inputs`` when given).

    ``names`` (:meth:`_Translation.names`) keeps the units' names of an earlier translation of the same graph: a
    scripted graph's names come partly from its constants, which folds replace.
    """
    shapes = _recorded_shapes(frozen, example_inputs) if example_inputs is not None else None
    return _Translation(frozen, shapes, example_inputs, names)


# --------------------------------------------------------------------------------------------- writing back


class ScriptWeights:
    """:class:`bnfold.core.apply.WeightAccess` on a frozen graph: new constants in, folded norms out."""

    numerics = TorchNumerics()

    def __init__(self, translation: _Translation) -> None:
        self.graph = translation.jit
        self.jit_nodes = dict(translation.jit_nodes)  # folded norms are taken out
        self.constants = translation.constants

    def constant(self, name: str) -> torch.Tensor:
        """The tensor of the graph constant ``name`` (``%name``, as :func:`_arithmetic_facts` names an operand): a
        layer scale a merge multiplies terms by (:class:`bnfold.core.apply.ConstantAccess`)."""
        return self.constants[name]

    def statistics(self, norm: str) -> Statistics:
        gamma, beta, mean, var = (_constant(v) for v in list(self.jit_nodes[norm].inputs())[1:5])
        eps = float(_constant(self.jit_nodes[norm].inputsAt(7)))
        return Statistics(mean, var, eps, gamma, beta)

    def read(self, layer: str) -> LayerTensors:
        node = self.jit_nodes[layer]
        groups, transposed = _groups_transposed(node)
        return LayerTensors(_constant(node.inputsAt(1)), _constant(node.inputsAt(2)), 1 if transposed else 0, int(groups))

    def write(self, layer: str, weight: torch.Tensor, bias: torch.Tensor) -> None:
        node = self.jit_nodes[layer]
        self.graph.setInsertPoint(node)
        node.replaceInput(1, self.graph.insertConstant(weight.contiguous()))
        node.replaceInput(2, self.graph.insertConstant(bias.contiguous()))
        self.graph.setInsertPoint(self.graph.return_node())

    def remove_norm(self, norm: str) -> None:
        node = self.jit_nodes.pop(norm)
        node.output().replaceAllUsesWith(node.inputsAt(0))
        node.destroy()


# ------------------------------------------------------------------------------------------------ the API


class ScriptBackend:
    """:class:`bnfold.core.pipeline.FoldBackend` for a frozen module (a copy): the folds rewrite its graph's
    constants. Counts are projected as if it were the module (a frozen module holds its weights as constants)."""

    exported = False
    measures_counts = False

    def __init__(self, module: torch.jit.ScriptModule, frozen: torch.jit.ScriptModule | None, name: str,
                 inputs: tuple[Any, ...] | None, names: dict[int, str] | None = None) -> None:
        if not isinstance(module, torch.jit.ScriptModule):
            raise InvalidInputError(
                f"fold_script folds TorchScript modules (torch.jit.script / torch.jit.trace / torch.jit.load), got "
                f"{type(module).__name__}; for an nn.Module call bnfold.fold"
            )
        self.module, self.frozen, self.name, self.inputs, self.names = module, frozen, name, inputs, names

    def norm_modes(self) -> NormModes:
        return norm_modes(self.module.modules())

    def translate(self) -> Graph:
        if self.frozen is None:
            self.frozen = freeze(self.module)
        translation = to_graph(self.frozen, self.inputs, self.names)
        self.names = translation.names()  # read before folds delete nodes
        self.access = ScriptWeights(translation)
        return translation.graph

    def weights(self) -> ScriptWeights:
        return self.access

    def counts(self) -> tuple[int, int]:
        return sum(p.numel() for p in self.module.parameters()), sum(b.numel() for b in self.module.buffers())

    def released(self, norm: str) -> tuple[int, int]:
        stats = self.access.statistics(norm)
        affine = sum(int(t.numel()) for t in (stats.gamma, stats.beta) if t is not None)
        return affine, int(stats.mean.numel() + stats.var.numel())

    def lacks_bias(self, layer: str) -> bool:
        return self.access.read(layer).bias is None

    def finish(self) -> None:
        assert self.frozen is not None
        torch._C._jit_pass_dce(self.frozen.graph)
        torch._C._jit_pass_constant_pooling(self.frozen.graph)


def _as_frozen(report: FoldReport, module: torch.jit.ScriptModule) -> FoldReport:
    """The report of a fold whose result is frozen, with the note that says so.

    A module frozen before bnfold saw it (``torch.jit.freeze``) holds its weights as graph constants: it has no
    parameters or buffers to count (counted as such, a fold would read ``0 -> -4,800``). Its report counts the
    elements of its constant tensors as its parameters, and what the folds and merges remove comes out of them."""
    report.notes.append("the folded model is frozen: weights are graph constants and only forward() is kept")
    if next(module.parameters(), None) is None and next(module.buffers(), None) is None:
        removed = report.parameters_removed + report.buffers_before - report.buffers_after
        report.parameters_before = sum(node.t("value").numel() for node in module.graph.findAllNodes("prim::Constant")
                                       if node.hasAttribute("value") and node.kindOf("value") == "t")
        report.parameters_after = report.parameters_before - removed
        report.buffers_before = report.buffers_after = 0
    return report


def _block_name(node: Any) -> str:
    """How the report names the sum a JIT node computes: ``%out.3 = aten::add_ in stages.0.1``."""
    path, _ = _module_path(node)
    site = f"%{node.outputsAt(0).debugName()} = {node.kind()}"
    return f"{site} in {path}" if path else site


def _merge(
    frozen: torch.jit.ScriptModule, inputs: tuple[Any, ...] | None, names: dict[int, str], report: FoldReport,
    parameters: frozenset[str],
) -> None:
    """Merge the summed branches of the folded ``frozen`` (owned here) in place, folding what each round makes
    foldable; the report gets the blocks, the norms folded or absorbed on the way, and the new counts. ``names``:
    the units' names in the report of the folds (:meth:`_Translation.names`); ``parameters``: as
    :class:`~bnfold.backends.script_merges.ScriptMerges` takes them."""

    def translate() -> tuple[_Translation, ScriptWeights]:
        translation = to_graph(frozen, inputs, names)
        return translation, ScriptWeights(translation)

    def fold_again() -> tuple[dict[str, NormEntry], int, int]:
        planned, entries = pipeline.refold(ScriptBackend(frozen, frozen, "", inputs, names))
        report = planned.report
        return entries, report.parameters_before - report.parameters_after, report.buffers_before - report.buffers_after

    merges = ScriptMerges(frozen.graph, translate, fold_again, _block_name, parameters)
    with torch.no_grad(), torch.inference_mode(False):  # new constants must be usable outside inference mode
        outcome = merge_rounds(merges)
    report.absorb_merged_norms(outcome.absorbed_norms, merges.folded_norms)
    report.merges = outcome.entries
    report.parameters_after -= merges.parameters_removed
    report.buffers_after -= merges.buffers_removed


def plan_script(
    module: torch.jit.ScriptModule,
    *,
    example_inputs: torch.Tensor | Sequence[Any] | None = None,
    name: str = "TorchScript model",
) -> FoldReport:
    """Dry run: what :func:`fold_script` would do with every batch norm, without folding anything.

    ``example_inputs`` (a tensor or a tuple of the forward's positional arguments) let bnfold record the shapes a
    scripted graph does not carry, so folds through reshapes and permutes can be checked. Branch merges are
    previewed by :func:`bnfold.plan` with ``merge_branches=True``.

    Raises:
        TrainingModeError: the model is in training mode.
        NonFiniteStatisticsError: a norm that would be folded has NaN or infinite statistics.
        InvalidInputError: not a TorchScript module, or example inputs it cannot run on.
    """
    with torch.no_grad():
        planned = pipeline.dry_run(ScriptBackend(module, None, name, as_input_tuple(example_inputs)))
    return _as_frozen(planned.report, module)


def fold_script(
    module: torch.jit.ScriptModule,
    *,
    example_inputs: torch.Tensor | Sequence[Any] | None = None,
    name: str = "TorchScript model",
    merge_branches: bool = False,
) -> tuple[torch.jit.ScriptModule, FoldReport]:
    """Fold every foldable batch norm of a TorchScript model; returns ``(frozen folded module, report)``.

    The planner is the one every format shares (:mod:`bnfold.core.plan`). The caller's module is not changed
    (freezing works on a copy). A fold that would overflow the layer's dtype is left, with the reason. With
    ``merge_branches=True`` blocks that sum parallel branches are then merged, as for the ``nn.Module``
    (:mod:`bnfold.backends.script_merges`; ``report.merges`` lists every block merged or left, with the reason):
    ``example_inputs`` are not needed for that, but give the planner the shapes of the terms to check.
    """
    inputs = as_input_tuple(example_inputs)
    backend = ScriptBackend(module, None, name, inputs)
    with torch.no_grad():
        report = pipeline.fold(backend).report
    assert backend.frozen is not None and backend.names is not None
    if merge_branches:
        _merge(backend.frozen, inputs, backend.names, report,
               frozenset(f"%self.{name}" for name, _ in module.named_parameters()))
    return backend.frozen, _as_frozen(report, module)
